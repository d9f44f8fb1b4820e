"""Integrations with other libraries. Each submodule imports its library itself, so
`import torch_pagedkv` never needs them: `torch_pagedkv.integrations.hf` needs the
`hf` extra (`pip install torch_pagedkv[hf]`, which pins transformers)."""
