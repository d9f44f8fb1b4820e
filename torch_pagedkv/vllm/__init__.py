"""torch_pagedkv inside vLLM: `vllm.LLM(..., attention_backend="CUSTOM")` or
`vllm serve ... --attention-backend CUSTOM` runs vLLM's attention on our ops.

plugin.py   the vllm.general_plugins entry point (registration, CPU selection, start check)
backend.py  the AttentionBackend / metadata builder / AttentionImpl over torch_pagedkv.ops

Nothing here is imported by `import torch_pagedkv`; backend.py needs vLLM.
"""
