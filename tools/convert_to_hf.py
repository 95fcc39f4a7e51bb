"""Convert a sad3 checkpoint to a HuggingFace transformers directory: a thin wrapper of `sad3 export`.

    python tools/convert_to_hf.py runs/demo runs/demo/hf [--no-ema] [--dtype bf16] [--max-shard-size 2GB]
"""

import sys

from sad3_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
