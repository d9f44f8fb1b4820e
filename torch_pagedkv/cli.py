"""`python -m torch_pagedkv.cli ...`: the `pagedkv` command (pagedkv_cli.py at the top level,
so that `pagedkv --help` does not import torch)."""
import sys

from pagedkv_cli import main

if __name__ == "__main__":
    sys.exit(main())
