"""Bad input: every op raises RuntimeError naming the argument with expected vs actual,
and a rejected call changes nothing (all checks run before the first write)."""
import pytest
import torch

from torch_pagedkv import ops

expecttest = pytest.importorskip("expecttest")  # the GPU machine's image lacks it

NB, BS, KVH, D, H = 6, 16, 2, 64, 4


def valid(op: str) -> dict:
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(NB, BS, KVH, D, generator=g), torch.randn(NB, BS, KVH, D, generator=g)
    if op == "reshape_and_cache":
        return dict(key=torch.randn(5, KVH, D, generator=g), value=torch.randn(5, KVH, D, generator=g),
                    key_cache=kc, value_cache=vc, slot_mapping=torch.tensor([0, 17, -1, 40, 95]),
                    k_scale=None, v_scale=None)
    if op == "paged_attention":
        return dict(query=torch.randn(4, H, D, generator=g), key_cache=kc, value_cache=vc,
                    block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                    seq_lens=torch.tensor([20, 30], dtype=torch.int32),
                    query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32), scale=0.125,
                    alibi_slopes=None, sliding_window=-1, softcap=0.0, k_scale=None, v_scale=None)
    if op == "paged_attention_lse":
        return dict(valid("paged_attention"), causal=True)
    if op == "merge_attn_states":
        return dict(out_a=torch.randn(4, H, D, generator=g), lse_a=torch.randn(4, H, generator=g),
                    out_b=torch.randn(4, H, D, generator=g), lse_b=torch.randn(4, H, generator=g))
    if op == "copy_blocks":
        return dict(key_caches=[kc, kc.clone()], value_caches=[vc, vc.clone()],
                    block_mapping=torch.tensor([[0, 4], [1, 5]]))
    return dict(src=kc, dst=vc.clone(), block_mapping=torch.tensor([[0, 4], [1, 5]]))


def with_(op, **changes):
    def make():
        args = valid(op)
        for k, v in changes.items():
            args[k] = v(args) if callable(v) else v
        return args
    return make


CASES = {
    # reshape_and_cache
    "rc_key_2d": ("reshape_and_cache", "key", with_("reshape_and_cache", key=lambda a: a["key"].flatten(1))),
    "rc_key_heads": ("reshape_and_cache", "key", with_("reshape_and_cache", key=torch.randn(5, 3, D))),
    "rc_key_head_size": ("reshape_and_cache", "key", with_("reshape_and_cache", key=torch.randn(5, KVH, 32))),
    "rc_value_shape": ("reshape_and_cache", "value", with_("reshape_and_cache", value=torch.randn(4, KVH, D))),
    "rc_key_dtype": ("reshape_and_cache", "key", with_("reshape_and_cache", key=lambda a: a["key"].half(), value=lambda a: a["value"].half())),
    "rc_value_dtype": ("reshape_and_cache", "value", with_("reshape_and_cache", value=lambda a: a["value"].double())),
    "rc_key_int": ("reshape_and_cache", "key", with_("reshape_and_cache", key=torch.ones(5, KVH, D, dtype=torch.int32))),
    "rc_key_strides": ("reshape_and_cache", "key", with_("reshape_and_cache", key=torch.randn(5, D, KVH).transpose(1, 2))),
    "rc_slot_dtype": ("reshape_and_cache", "slot_mapping", with_("reshape_and_cache", slot_mapping=lambda a: a["slot_mapping"].int())),
    "rc_slot_len": ("reshape_and_cache", "slot_mapping", with_("reshape_and_cache", slot_mapping=torch.tensor([0, 1, 2]))),
    "rc_slot_range": ("reshape_and_cache", "slot_mapping", with_("reshape_and_cache", slot_mapping=torch.tensor([0, 1, 2, 3, NB * BS]))),
    "rc_slot_dup": ("reshape_and_cache", "slot_mapping", with_("reshape_and_cache", slot_mapping=torch.tensor([0, 7, 3, 7, -1]))),
    "rc_cache_3d": ("reshape_and_cache", "key_cache", with_("reshape_and_cache", key_cache=lambda a: a["key_cache"].flatten(2))),
    "rc_value_cache_shape": ("reshape_and_cache", "value_cache", with_("reshape_and_cache", value_cache=torch.randn(NB + 1, BS, KVH, D))),
    "rc_cache_dtype": ("reshape_and_cache", "key_cache", with_("reshape_and_cache", key_cache=torch.zeros(NB, BS, KVH, D, dtype=torch.int8), value_cache=torch.zeros(NB, BS, KVH, D, dtype=torch.int8))),
    "rc_cache_contiguous": ("reshape_and_cache", "key_cache", with_("reshape_and_cache", key_cache=torch.randn(BS, NB, KVH, D).transpose(0, 1))),
    "rc_head_size_8": ("reshape_and_cache", "head_size", with_("reshape_and_cache", key=torch.randn(5, KVH, 12), value=torch.randn(5, KVH, 12), key_cache=torch.randn(NB, BS, KVH, 12), value_cache=torch.randn(NB, BS, KVH, 12))),
    "rc_block_size": ("reshape_and_cache", "block_size", with_("reshape_and_cache", key_cache=torch.randn(1, 300, KVH, D), value_cache=torch.randn(1, 300, KVH, D))),
    "rc_k_scale_numel": ("reshape_and_cache", "k_scale", with_("reshape_and_cache", k_scale=torch.ones(2))),
    "rc_v_scale_dtype": ("reshape_and_cache", "v_scale", with_("reshape_and_cache", v_scale=torch.ones(1, dtype=torch.float64))),
    # paged_attention
    "pa_query_2d": ("paged_attention", "query", with_("paged_attention", query=torch.randn(4, H * D))),
    "pa_query_dtype": ("paged_attention", "query", with_("paged_attention", query=lambda a: a["query"].bfloat16())),
    "pa_query_head_size": ("paged_attention", "query", with_("paged_attention", query=torch.randn(4, H, 32))),
    "pa_num_heads": ("paged_attention", "num_heads", with_("paged_attention", query=torch.randn(4, 3, D))),
    "pa_block_table_dtype": ("paged_attention", "block_table", with_("paged_attention", block_table=lambda a: a["block_table"].long())),
    "pa_block_table_1d": ("paged_attention", "block_table", with_("paged_attention", block_table=torch.tensor([0, 1], dtype=torch.int32))),
    "pa_seq_lens_len": ("paged_attention", "seq_lens", with_("paged_attention", seq_lens=torch.tensor([20], dtype=torch.int32))),
    "pa_seq_lens_dtype": ("paged_attention", "seq_lens", with_("paged_attention", seq_lens=torch.tensor([20, 30]))),
    "pa_qsl_len": ("paged_attention", "query_start_loc", with_("paged_attention", query_start_loc=torch.tensor([0, 4], dtype=torch.int32))),
    "pa_qsl_start": ("paged_attention", "query_start_loc", with_("paged_attention", query_start_loc=torch.tensor([1, 1, 4], dtype=torch.int32))),
    "pa_qsl_end": ("paged_attention", "query_start_loc", with_("paged_attention", query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32))),
    "pa_qsl_decreasing": ("paged_attention", "query_start_loc", with_("paged_attention", query_start_loc=torch.tensor([0, 5, 4], dtype=torch.int32))),
    "pa_q_len_gt_seq_len": ("paged_attention", "seq_lens", with_("paged_attention", seq_lens=torch.tensor([20, 2], dtype=torch.int32))),
    "pa_seq_len_columns": ("paged_attention", "seq_lens", with_("paged_attention", seq_lens=torch.tensor([20, 33], dtype=torch.int32))),
    "pa_block_id_range": ("paged_attention", "block_table", with_("paged_attention", block_table=torch.tensor([[0, NB], [2, 3]], dtype=torch.int32))),
    "pa_block_id_negative": ("paged_attention", "block_table", with_("paged_attention", block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32))),
    "pa_alibi_size": ("paged_attention", "alibi_slopes", with_("paged_attention", alibi_slopes=torch.ones(H + 1))),
    "pa_alibi_dtype": ("paged_attention", "alibi_slopes", with_("paged_attention", alibi_slopes=torch.ones(H, dtype=torch.float16))),
    "pa_v_scale_numel": ("paged_attention", "v_scale", with_("paged_attention", v_scale=torch.ones(1, 2))),
    "pa_value_cache_dtype": ("paged_attention", "value_cache", with_("paged_attention", value_cache=lambda a: a["value_cache"].half())),
    # paged_attention_lse: the paged_attention checks under its own name, and causal=False
    # only without a window or ALiBi (a query length above seq_len is then fine)
    "pal_query_dtype": ("paged_attention_lse", "query", with_("paged_attention_lse", query=lambda a: a["query"].half())),
    "pal_q_len_gt_seq_len": ("paged_attention_lse", "seq_lens", with_("paged_attention_lse", seq_lens=torch.tensor([20, 2], dtype=torch.int32))),
    "pal_block_id_range": ("paged_attention_lse", "block_table", with_("paged_attention_lse", causal=False, block_table=torch.tensor([[0, NB], [2, 3]], dtype=torch.int32))),
    "pal_seq_lens_negative": ("paged_attention_lse", "seq_lens", with_("paged_attention_lse", causal=False, seq_lens=torch.tensor([-1, 2], dtype=torch.int32))),
    "pal_window_not_causal": ("paged_attention_lse", "sliding_window", with_("paged_attention_lse", causal=False, sliding_window=8)),
    "pal_window_0_not_causal": ("paged_attention_lse", "sliding_window", with_("paged_attention_lse", causal=False, sliding_window=0)),
    "pal_alibi_not_causal": ("paged_attention_lse", "alibi_slopes", with_("paged_attention_lse", causal=False, alibi_slopes=torch.ones(H))),
    # merge_attn_states
    "ms_out_a_2d": ("merge_attn_states", "out_a", with_("merge_attn_states", out_a=torch.randn(4, H * D))),
    "ms_out_a_dtype": ("merge_attn_states", "out_a", with_("merge_attn_states", out_a=torch.ones(4, H, D, dtype=torch.int32))),
    "ms_out_b_shape": ("merge_attn_states", "out_b", with_("merge_attn_states", out_b=torch.randn(4, H, D + 8))),
    "ms_out_b_dtype": ("merge_attn_states", "out_b", with_("merge_attn_states", out_b=lambda a: a["out_b"].double())),
    "ms_lse_a_dtype": ("merge_attn_states", "lse_a", with_("merge_attn_states", lse_a=lambda a: a["lse_a"].half())),
    "ms_lse_b_shape": ("merge_attn_states", "lse_b", with_("merge_attn_states", lse_b=torch.randn(4, H + 1))),
    "ms_lse_a_rows": ("merge_attn_states", "lse_a", with_("merge_attn_states", lse_a=torch.randn(3, H))),
    "ms_lse_b_3d": ("merge_attn_states", "lse_b", with_("merge_attn_states", lse_b=torch.randn(4, H, 1))),
    # copy_blocks
    "cb_mapping_shape": ("copy_blocks", "block_mapping", with_("copy_blocks", block_mapping=torch.tensor([[0, 4, 1]]))),
    "cb_mapping_dtype": ("copy_blocks", "block_mapping", with_("copy_blocks", block_mapping=torch.tensor([[0, 4]], dtype=torch.int32))),
    "cb_src_range": ("copy_blocks", "block_mapping", with_("copy_blocks", block_mapping=torch.tensor([[0, 4], [NB, 5]]))),
    "cb_dst_negative": ("copy_blocks", "block_mapping", with_("copy_blocks", block_mapping=torch.tensor([[0, 4], [1, -2]]))),
    "cb_dst_duplicate": ("copy_blocks", "block_mapping", with_("copy_blocks", block_mapping=torch.tensor([[0, 4], [1, 4]]))),
    "cb_chain": ("copy_blocks", "block_mapping", with_("copy_blocks", block_mapping=torch.tensor([[0, 4], [4, 5]]))),
    "cb_layers": ("copy_blocks", "value_caches", with_("copy_blocks", value_caches=lambda a: a["value_caches"][:1])),
    "cb_value_shape": ("copy_blocks", "value_caches", with_("copy_blocks", value_caches=lambda a: [a["value_caches"][0], torch.randn(NB, BS, KVH, 8)])),
    # swap_blocks
    "sb_block_shape": ("swap_blocks", "dst", with_("swap_blocks", dst=torch.randn(NB, BS, KVH, 8))),
    "sb_dtype": ("swap_blocks", "dst", with_("swap_blocks", dst=lambda a: a["dst"].half())),
    "sb_src_range": ("swap_blocks", "block_mapping", with_("swap_blocks", block_mapping=torch.tensor([[NB, 0]]))),
    "sb_dst_range": ("swap_blocks", "block_mapping", with_("swap_blocks", block_mapping=torch.tensor([[0, NB + 3]]))),
    "sb_same_tensor_chain": ("swap_blocks", "block_mapping", with_("swap_blocks", dst=lambda a: a["src"], block_mapping=torch.tensor([[0, 1], [1, 2]]))),
    "sb_same_tensor_dst_duplicate": ("swap_blocks", "block_mapping", with_("swap_blocks", dst=lambda a: a["src"], block_mapping=torch.tensor([[0, 3], [1, 3]]))),
    "sb_mapping_dtype": ("swap_blocks", "block_mapping", with_("swap_blocks", block_mapping=torch.tensor([[0, 1]], dtype=torch.int32))),
}


def tensors_of(args):
    out = []
    for v in args.values():
        out += [t for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def raise_message(op, args) -> str:
    with pytest.raises(RuntimeError) as info:
        getattr(ops, op)(**args)
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_with_argument_name_and_nothing_written(case):
    op, arg, make = CASES[case]
    args = make()
    before = [t.clone() for t in tensors_of(args)]
    message = raise_message(op, args)
    assert message.startswith(op + ":") and arg in message, message
    for t, b in zip(tensors_of(args), before):
        assert torch.equal(bits(t), bits(b)), f"{case} changed a tensor"


class TestMessages(expecttest.TestCase):
    def test_messages(self):
        lines = [f"{case}: {raise_message(CASES[case][0], CASES[case][2]())}" for case in sorted(CASES)]
        self.assertExpectedInline("\n".join(lines), """\
cb_chain: copy_blocks: block_mapping must not use a block both as a source and as a destination (every copy reads the block as it was before the call), got block 4 as src of pair 1 and dst of pair 0
cb_dst_duplicate: copy_blocks: block_mapping destinations must be distinct, got dst 4 in pairs 0 and 1
cb_dst_negative: copy_blocks: block_mapping[1, 1] (dst) must be in [0, 6), got -2
cb_layers: copy_blocks: value_caches must have as many layers as key_caches (2), got 1
cb_mapping_dtype: copy_blocks: block_mapping dtype must be int64, got int32
cb_mapping_shape: copy_blocks: block_mapping.size(1) ((src, dst)) must be 2, got 3 (shape [1, 3])
cb_src_range: copy_blocks: block_mapping[1, 0] (src) must be in [0, 6), got 6
cb_value_shape: copy_blocks: value_caches[1] shape must equal key_caches[1] shape [6, 16, 2, 64], got [6, 16, 2, 8]
ms_lse_a_dtype: merge_attn_states: lse_a dtype must be float32, got float16
ms_lse_a_rows: merge_attn_states: lse_a.size(0) (num_tokens = out_a.size(0)) must be 4, got 3 (shape [3, 4])
ms_lse_b_3d: merge_attn_states: lse_b must be 2-D [num_tokens, num_heads], got 3-D with shape [4, 4, 1]
ms_lse_b_shape: merge_attn_states: lse_b.size(1) (num_heads = out_a.size(1)) must be 4, got 5 (shape [4, 5])
ms_out_a_2d: merge_attn_states: out_a must be 3-D [num_tokens, num_heads, head_size], got 2-D with shape [4, 256]
ms_out_a_dtype: merge_attn_states: out_a dtype must be float32, float16 or bfloat16, got int32
ms_out_b_dtype: merge_attn_states: out_b dtype must be float32, float16 or bfloat16, got float64
ms_out_b_shape: merge_attn_states: out_b shape must equal out_a shape [4, 4, 64], got [4, 4, 72]
pa_alibi_dtype: paged_attention: alibi_slopes dtype must be float32, got float16
pa_alibi_size: paged_attention: alibi_slopes.size(0) (num_heads) must be 4, got 5 (shape [5])
pa_block_id_negative: paged_attention: block_table[1, 0] must be in [0, num_blocks = 6), got -1
pa_block_id_range: paged_attention: block_table[0, 1] must be in [0, num_blocks = 6), got 6
pa_block_table_1d: paged_attention: block_table must be 2-D [num_seqs, max_blocks_per_seq], got 1-D with shape [2]
pa_block_table_dtype: paged_attention: block_table dtype must be int32, got int64
pa_num_heads: paged_attention: num_heads (query.size(1)) must be a positive multiple of num_kv_heads 2, got 3
pa_q_len_gt_seq_len: paged_attention: seq_lens[1] must be >= its query length 3 (seq_lens counts the query tokens), got 2
pa_qsl_decreasing: paged_attention: query_start_loc must be non-decreasing, got query_start_loc[1] = 5 > query_start_loc[2] = 4
pa_qsl_end: paged_attention: query_start_loc[2] must be num_q_tokens = 4, got 3
pa_qsl_len: paged_attention: query_start_loc.size(0) (num_seqs + 1) must be 3, got 2 (shape [2])
pa_qsl_start: paged_attention: query_start_loc[0] must be 0, got 1
pa_query_2d: paged_attention: query must be 3-D [num_q_tokens, num_heads, head_size], got 2-D with shape [4, 256]
pa_query_dtype: paged_attention: query dtype must equal the cache dtype float32 (or the cache must be fp8), got bfloat16
pa_query_head_size: paged_attention: query.size(2) (head_size = key_cache.size(3)) must be 64, got 32 (shape [4, 4, 32])
pa_seq_len_columns: paged_attention: seq_lens[1] = 33 needs 3 blocks but block_table has 2 columns
pa_seq_lens_dtype: paged_attention: seq_lens dtype must be int32, got int64
pa_seq_lens_len: paged_attention: seq_lens.size(0) (num_seqs = block_table.size(0)) must be 2, got 1 (shape [1])
pa_v_scale_numel: paged_attention: v_scale must have exactly 1 element, got 2 (shape [1, 2])
pa_value_cache_dtype: paged_attention: value_cache dtype must be float32, got float16
pal_alibi_not_causal: paged_attention_lse: alibi_slopes must be None when causal=False, got a tensor of shape [4]
pal_block_id_range: paged_attention_lse: block_table[0, 1] must be in [0, num_blocks = 6), got 6
pal_q_len_gt_seq_len: paged_attention_lse: seq_lens[1] must be >= its query length 3 (seq_lens counts the query tokens), got 2
pal_query_dtype: paged_attention_lse: query dtype must equal the cache dtype float32 (or the cache must be fp8), got float16
pal_seq_lens_negative: paged_attention_lse: seq_lens[0] must be >= 0, got -1
pal_window_0_not_causal: paged_attention_lse: sliding_window must be -1 when causal=False, got 0
pal_window_not_causal: paged_attention_lse: sliding_window must be -1 when causal=False, got 8
rc_block_size: reshape_and_cache: block_size (key_cache.size(1)) must be in [1, 256], got 300
rc_cache_3d: reshape_and_cache: key_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_size], got 3-D with shape [6, 16, 128]
rc_cache_contiguous: reshape_and_cache: key_cache must be contiguous, got strides [128, 768, 64, 1] for shape [6, 16, 2, 64]
rc_cache_dtype: reshape_and_cache: key_cache dtype must be float32, float16, bfloat16, float8_e4m3fn or float8_e5m2, got int8
rc_head_size_8: reshape_and_cache: head_size (key_cache.size(3)) must be a multiple of 8 in [8, 512], got 12
rc_k_scale_numel: reshape_and_cache: k_scale must have exactly 1 element, got 2 (shape [2])
rc_key_2d: reshape_and_cache: key must be 3-D [num_tokens, num_kv_heads, head_size], got 2-D with shape [5, 128]
rc_key_dtype: reshape_and_cache: key dtype must equal the cache dtype float32 (or the cache must be fp8), got float16
rc_key_head_size: reshape_and_cache: key.size(2) (head_size) must be 64, got 32 (shape [5, 2, 32])
rc_key_heads: reshape_and_cache: key.size(1) (num_kv_heads) must be 2, got 3 (shape [5, 3, 64])
rc_key_int: reshape_and_cache: key dtype must be float32, float16 or bfloat16, got int32
rc_key_strides: reshape_and_cache: key must have strides [*, 64, 1] (head_size-contiguous heads), got [128, 1, 2]
rc_slot_dtype: reshape_and_cache: slot_mapping dtype must be int64, got int32
rc_slot_dup: reshape_and_cache: slot_mapping must hold distinct non-negative slots, got slot 7 more than once
rc_slot_len: reshape_and_cache: slot_mapping.size(0) (num_tokens = key.size(0)) must be 5, got 3 (shape [3])
rc_slot_range: reshape_and_cache: slot_mapping[4] must be < num_blocks * block_size = 96 (or negative to skip), got 96
rc_v_scale_dtype: reshape_and_cache: v_scale dtype must be float32, got float64
rc_value_cache_shape: reshape_and_cache: value_cache shape must equal key_cache shape [6, 16, 2, 64], got [7, 16, 2, 64]
rc_value_dtype: reshape_and_cache: value dtype must be float32, got float64
rc_value_shape: reshape_and_cache: value shape must equal key shape [5, 2, 64], got [4, 2, 64]
sb_block_shape: swap_blocks: dst block shape must equal src block shape [16, 2, 64], got [16, 2, 8]
sb_dst_range: swap_blocks: block_mapping[0, 1] (dst) must be in [0, 6), got 9
sb_dtype: swap_blocks: dst dtype must be float32, got float16
sb_mapping_dtype: swap_blocks: block_mapping dtype must be int64, got int32
sb_same_tensor_chain: swap_blocks: block_mapping must not use a block both as a source and as a destination (every copy reads the block as it was before the call), got block 1 as src of pair 1 and dst of pair 0
sb_same_tensor_dst_duplicate: swap_blocks: block_mapping destinations must be distinct, got dst 3 in pairs 0 and 1
sb_src_range: swap_blocks: block_mapping[0, 0] (src) must be in [0, 6), got 6""")
