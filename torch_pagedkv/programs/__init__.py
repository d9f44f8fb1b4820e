"""The programs the `pagedkv` command runs (pagedkv_cli.py dispatches here): demo (and
demo --tiers), trace, tune (CUDA launch configs, or --cpu the CPU tuning table). They
build on the engine and the tuning rooms; nothing in the library imports them."""
