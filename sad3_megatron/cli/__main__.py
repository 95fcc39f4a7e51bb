"""`python -m sad3_megatron.cli` is the `sad3` command (what the launchers run under torchrun)."""

import sys

from sad3_megatron.cli import main

code = main()
if "torch.distributed" in sys.modules:  # a training or evaluation that started process groups ends them
    from sad3_megatron.engine.distributed import shutdown_distributed

    if code == 0:  # after an error the other ranks may never reach the barrier
        shutdown_distributed()
sys.exit(code)
