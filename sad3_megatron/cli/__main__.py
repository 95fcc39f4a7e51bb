"""`python -m sad3_megatron.cli` is the `sad3` command."""

import sys

from sad3_megatron.cli import main

sys.exit(main())
