"""The examples, run as modules from the checkout: `python -m examples.hf_drop_in`."""
