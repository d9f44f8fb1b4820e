"""The backend's AttentionImpl on vLLM's cache buffer, without an engine (fast).

Specification: given vLLM's per-layer view of an LHBNC cache ([num_blocks, 2, block_size,
num_kv_heads * head_size] over K-plane-then-V-plane memory), `do_kv_cache_update` writes
each token's K/V in place at its slot (slot -1 writes nothing; fp8 caches hold
`x / scale`, allocated by vLLM as uint8) and `forward` writes `paged_attention`'s result
into vLLM's output for the request rows, for every cache dtype, GQA/MQA, sliding window,
ALiBi and softcap, equal to torch_pagedkv.reference on the same cache.
"""
import pytest
import torch

from torch_pagedkv import reference
from torch_pagedkv.vllm.backend import PagedKVBackend, PagedKVImpl, PagedKVMetadata

BLOCK = 16
CASES = {  # name -> (model dtype, kv_cache_dtype, heads, kv heads, head size, impl kwargs)
    "fp32-gqa-window": (torch.float32, "auto", 8, 2, 64, dict(sliding_window=20)),
    "bf16-mqa-softcap": (torch.bfloat16, "auto", 4, 1, 128, dict(logits_soft_cap=5.0)),
    "fp16-alibi": (torch.float16, "auto", 4, 4, 32,
                   dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625])),
    "fp8_e4m3-gqa": (torch.float32, "fp8_e4m3", 4, 2, 64, {}),
    "fp8_e5m2-bf16": (torch.bfloat16, "fp8_e5m2", 4, 2, 64, dict(sliding_window=24)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_and_forward_on_vllm_buffer(case):
    dtype, kv_dtype, heads, kv_heads, head_size, kwargs = CASES[case]
    torch.manual_seed(0)
    impl = PagedKVImpl(heads, head_size, head_size ** -0.5, kv_heads,
                       kwargs.get("alibi_slopes"), kwargs.get("sliding_window"), kv_dtype,
                       kwargs.get("logits_soft_cap"))
    fp8 = kv_dtype.startswith("fp8")
    num_blocks = 24
    raw = torch.zeros(2, num_blocks, BLOCK, kv_heads * head_size,
                      dtype=torch.uint8 if fp8 else dtype)
    kv_cache = raw.transpose(0, 1)  # vLLM's logical view of the LHBNC buffer

    class Layer:  # the scales vLLM's Attention layer carries
        _k_scale = torch.tensor(0.5 if fp8 else 1.0)
        _v_scale = torch.tensor(2.0 if fp8 else 1.0)

    # Three requests: a decode over 40 cached tokens, a 23-token prefill, a 9-token chunk
    # over 30 cached tokens; then 3 padding rows (slot -1) as vLLM may append.
    ctx, q_lens = [41, 23, 39], [1, 23, 9]
    perm = torch.randperm(num_blocks).to(torch.int32)
    block_table = torch.stack([perm[0:8], perm[8:16], perm[16:24]])
    slots = [block_table[i, p // BLOCK].item() * BLOCK + p % BLOCK
             for i, n in enumerate(ctx) for p in range(n)]
    total = len(slots)
    key = torch.randn(total + 3, kv_heads, head_size, dtype=dtype)
    value = torch.randn(total + 3, kv_heads, head_size, dtype=dtype)
    slot_mapping = torch.tensor(slots + [-1, -1, -1], dtype=torch.int64)
    impl.do_kv_cache_update(Layer, key, value, kv_cache, slot_mapping)

    key_cache, value_cache = impl._caches(kv_cache)
    assert key_cache.data_ptr() == raw.data_ptr() and key_cache.is_contiguous()
    ref_k = torch.zeros_like(key_cache)
    ref_v = torch.zeros_like(value_cache)
    reference.reshape_and_cache(key, value, ref_k, ref_v, slot_mapping,
                                Layer._k_scale, Layer._v_scale)
    assert torch.equal(key_cache.view(torch.uint8) if fp8 else key_cache,
                       ref_k.view(torch.uint8) if fp8 else ref_k)
    assert torch.equal(value_cache.view(torch.uint8) if fp8 else value_cache,
                       ref_v.view(torch.uint8) if fp8 else ref_v)

    num_q = sum(q_lens)
    query = torch.randn(num_q + 3, heads, head_size, dtype=dtype)
    qsl = torch.tensor([0, 1, 24, 33], dtype=torch.int32)
    meta = PagedKVMetadata(num_actual_tokens=num_q, query_start_loc=qsl,
                           seq_lens=torch.tensor(ctx, dtype=torch.int32),
                           block_table=block_table)
    output = torch.full((num_q + 3, heads, head_size), 7.0, dtype=dtype)
    impl.forward(Layer, query, key, value, kv_cache, meta, output)
    alibi = kwargs.get("alibi_slopes")
    expected = reference.paged_attention(
        query[:num_q], key_cache, value_cache, block_table, meta.seq_lens, qsl,
        head_size ** -0.5, None if alibi is None else torch.tensor(alibi),
        kwargs.get("sliding_window", -1), kwargs.get("logits_soft_cap", 0.0),
        Layer._k_scale if fp8 else None, Layer._v_scale if fp8 else None)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(output[:num_q], expected, atol=tol, rtol=tol)
    assert (output[num_q:] == 7.0).all()  # padding rows untouched


def test_profiling_run_without_metadata_returns_output_untouched():
    impl = PagedKVImpl(4, 32, 0.1, 2, None, None, "auto")
    output = torch.zeros(3, 4, 32)
    assert impl.forward(None, torch.randn(3, 4, 32), None, None, torch.zeros(2, 2, 16, 64),
                        None, output) is output


@pytest.mark.parametrize("kwargs, says", [
    (dict(head_size=36), "head_size 36"),
    (dict(dtype=torch.float32, kv_cache_dtype="bfloat16"), "kv_cache_dtype 'bfloat16'"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype 'int8'"),
    (dict(block_size=512), "block_size 512"),
    (dict(has_sink=True), "attention sinks"),
    (dict(use_mla=True), "MLA"),
])
def test_validate_configuration_names_torch_pagedkv(kwargs, says):
    args = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=None,
                attn_type="decoder")
    assert PagedKVBackend.validate_configuration(**args) == []
    reasons = PagedKVBackend.validate_configuration(**{**args, **kwargs})
    assert reasons and all(r.startswith("torch_pagedkv") for r in reasons)
    assert any(says in r for r in reasons), reasons


def test_cascade_over_shared_prefix_blocks_equals_plain_attention():
    """18 requests whose block tables start with the same 20 blocks (320 tokens): the
    builder's cascade plan finds them, and forward's result equals the plain one."""
    from torch_pagedkv.vllm.cascade import plan_cascade
    torch.manual_seed(0)
    heads, kv_heads, head_size, shared = 8, 2, 64, 20
    impl = PagedKVImpl(heads, head_size, 0.125, kv_heads, None, None, "auto")
    n_req, own = 18, 3
    num_blocks = shared + n_req * own
    raw = torch.randn(2, num_blocks, BLOCK, kv_heads * head_size)
    kv_cache = raw.transpose(0, 1)
    table = torch.zeros(n_req, shared + own, dtype=torch.int32)
    table[:, :shared] = torch.arange(shared, dtype=torch.int32)
    table[:, shared:] = (shared + torch.arange(n_req * own, dtype=torch.int32)).view(n_req, own)
    ctx = torch.randint(shared * BLOCK + 1, (shared + own) * BLOCK, (n_req,), dtype=torch.int32)
    q_lens = torch.ones(n_req, dtype=torch.int32)
    q_lens[5] = 7  # a chunk of prefill among the decodes
    qsl = torch.zeros(n_req + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    n = int(qsl[-1])
    query = torch.randn(n, heads, head_size)
    cascade = plan_cascade(table, ctx, qsl, BLOCK)
    assert cascade is not None and cascade.shared_tokens == (shared * BLOCK,)
    plain = torch.empty(n, heads, head_size)
    both = torch.empty(n, heads, head_size)
    for out, c in ((plain, None), (both, cascade)):
        impl.forward(None, query, None, None, kv_cache,
                     PagedKVMetadata(n, qsl, ctx, table, cascade=c), out)
    torch.testing.assert_close(both, plain, atol=2e-5, rtol=2e-5)
    assert plan_cascade(table[:4], ctx[:4], qsl[:5], BLOCK) is None  # too few to pay
