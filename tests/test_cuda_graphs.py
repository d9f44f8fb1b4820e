"""The ops under CUDA graphs: a decode step captured once with torch.cuda.graph replays
correctly after block_table, seq_lens, slot_mapping (and the tokens) change in place,
and torch.compile(mode="reduce-overhead") of a decode step matches eager. The grids
depend only on shapes and every metadata value is read on the device, which is what
makes this hold. A small model built from the ops (two layers, fused QKV projection,
GQA) keeps the test self-contained. Skipped without a GPU."""
import math

import pytest
import torch
from torch import nn

import torch_pagedkv as pk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

HEADS, KV_HEADS, HEAD, LAYERS, VOCAB = 8, 2, 64, 2, 97
BLOCK, NUM_BLOCKS, COLUMNS = 16, 400, 80  # 80 columns x 16 = 1280 keys: 3 decode partitions


class TinyPagedModel(nn.Module):
    """Embedding -> LAYERS x (fused QKV, reshape_and_cache, paged_attention, out proj,
    MLP) -> logits. The caches are buffers, so compiled graphs may mutate them in place."""

    def __init__(self, dtype=torch.bfloat16, cache_dtype=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        hidden = HEADS * HEAD

        def weight(rows, cols, scale):
            w = torch.randn(rows, cols, generator=g) * scale
            return nn.Parameter(w.to(dtype), requires_grad=False)

        self.embed = weight(VOCAB, hidden, 0.5)
        self.qkv = nn.ParameterList([weight(hidden, (HEADS + 2 * KV_HEADS) * HEAD, hidden ** -0.5)
                                     for _ in range(LAYERS)])
        self.o = nn.ParameterList([weight(hidden, hidden, hidden ** -0.5) for _ in range(LAYERS)])
        self.mlp = nn.ParameterList([weight(hidden, hidden, hidden ** -0.5) for _ in range(LAYERS)])
        self.out = weight(hidden, VOCAB, hidden ** -0.5)
        cache_dtype = cache_dtype or dtype
        for i in range(LAYERS):
            for kind in ("k", "v"):
                self.register_buffer(f"{kind}{i}", torch.zeros(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD,
                                                                dtype=cache_dtype))
        fp8 = cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        # Scales are float32 tensors (never cast with the model), only for fp8 caches.
        self.register_buffer("k_scale", torch.tensor([0.05]) if fp8 else None)
        self.register_buffer("v_scale", torch.tensor([0.04]) if fp8 else None)

    def caches(self):
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(LAYERS)]

    def forward(self, tokens, slot_mapping, block_table, seq_lens, query_start_loc):
        x = self.embed[tokens]
        n = tokens.shape[0]
        for i, (kc, vc) in enumerate(self.caches()):
            qkv = x @ self.qkv[i]
            q = qkv[:, : HEADS * HEAD].view(n, HEADS, HEAD)
            k = qkv[:, HEADS * HEAD: (HEADS + KV_HEADS) * HEAD].view(n, KV_HEADS, HEAD)
            v = qkv[:, (HEADS + KV_HEADS) * HEAD:].view(n, KV_HEADS, HEAD)
            pk.reshape_and_cache(k, v, kc, vc, slot_mapping, self.k_scale, self.v_scale)
            o = pk.paged_attention(q, kc, vc, block_table, seq_lens, query_start_loc,
                                   HEAD ** -0.5, k_scale=self.k_scale, v_scale=self.v_scale)
            x = x + o.reshape(n, -1) @ self.o[i]
            x = x + torch.relu(x @ self.mlp[i])
        return x.float() @ self.out.float()


class Sequences:
    """Host-side bookkeeping for a few sequences: block tables and lengths."""

    def __init__(self, lengths, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(NUM_BLOCKS - 1, generator=self.gen).add(1).tolist()  # 0: pad
        self.lengths = list(lengths)
        self.tables = [[self.free.pop() for _ in range(math.ceil(n / BLOCK))] for n in lengths]
        self.tokens = [torch.randint(0, VOCAB, (n,), generator=self.gen).tolist() for n in lengths]

    def slot(self, i, pos):
        while pos // BLOCK >= len(self.tables[i]):
            self.tables[i].append(self.free.pop())
        return self.tables[i][pos // BLOCK] * BLOCK + pos % BLOCK

    def prefill_inputs(self):
        tokens, slots, qsl = [], [], [0]
        for i, n in enumerate(self.lengths):
            tokens += self.tokens[i]
            slots += [self.slot(i, p) for p in range(n)]
            qsl.append(qsl[-1] + n)
        self.positions = torch.cat([torch.arange(n) for n in self.lengths]).cuda()
        return self.metadata(tokens, slots, qsl, self.lengths)

    def decode_inputs(self, pad_rows=0):
        """Next token of every sequence (then grown by one), plus padding rows that write
        nothing (slot -1) and read one position of the reserved block 0."""
        tokens, slots = [], []
        for i, n in enumerate(self.lengths):
            tokens.append(torch.randint(0, VOCAB, (1,), generator=self.gen).item())
            slots.append(self.slot(i, n))
            self.lengths[i] = n + 1
        lengths = self.lengths + [1] * pad_rows
        self.positions = torch.tensor([n - 1 for n in lengths], device="cuda")
        tokens += [0] * pad_rows
        slots += [-1] * pad_rows
        return self.metadata(tokens, slots, list(range(len(lengths) + 1)), lengths, pad_rows)

    def metadata(self, tokens, slots, qsl, lengths, pad_rows=0):
        table = torch.zeros(len(lengths), COLUMNS, dtype=torch.int32)
        for i, t in enumerate(self.tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return (torch.tensor(tokens, device="cuda"), torch.tensor(slots, device="cuda"),
                table.cuda(), torch.tensor(lengths, dtype=torch.int32, device="cuda"),
                torch.tensor(qsl, dtype=torch.int32, device="cuda"))

    def move_blocks(self, caches):
        """Moves every sequence's blocks to fresh physical blocks (copy_blocks), as a
        copy-on-write would: the block table then changes, not just grows."""
        pairs = []
        for t in self.tables:
            for j, b in enumerate(t):
                new = self.free.pop()
                pairs.append((b, new))
                t[j] = new
        keys, values = zip(*caches)
        pk.copy_blocks(list(keys), list(values), torch.tensor(pairs, device="cuda"))


def close(a, b, dtype):
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                               (torch.float16, torch.float8_e4m3fn)])
def test_captured_decode_step_replays_with_new_metadata(dtype, cache_dtype):
    model = TinyPagedModel(dtype, cache_dtype).cuda()
    # Lengths near the 512-key partition edges, so replays cross them.
    seqs = Sequences([509, 37, 1020, 5])
    with torch.no_grad():
        model(*seqs.prefill_inputs())
        static = [t.clone() for t in seqs.decode_inputs(pad_rows=1)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the capture, as torch.cuda.graph asks
            model(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(*static)

        for step in range(8):
            if step == 4:
                seqs.move_blocks(model.caches())
            inputs = seqs.decode_inputs(pad_rows=1)
            eager = model(*inputs)  # writes the same K/V to the same slots as the replay
            for buf, new in zip(static, inputs):
                buf.copy_(new)  # block_table, seq_lens, slot_mapping, tokens: in place
            graph.replay()
            close(static_out[:4], eager[:4], dtype)
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_reduce_overhead_decode_matches_eager(dtype):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = TinyPagedModel(dtype).cuda()
    seqs = Sequences([300, 513, 64, 1])
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        model(*seqs.prefill_inputs())
        for step in range(6):
            if step == 3:
                seqs.move_blocks(model.caches())
            inputs = seqs.decode_inputs()
            got = compiled(*inputs).clone()  # cudagraph outputs are reused by the next replay
            want = model(*inputs)
            close(got, want, dtype)
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])


def test_tiny_llama_decode_step_reduce_overhead_matches_eager():
    """The engine's tiny Llama (rotary, fused QKV views, GQA) over a KVCache whose tensors
    are marked static, so the captured graphs update the caches in place."""
    from torch_pagedkv.layers.metadata import AttentionMetadata
    from torch_pagedkv.models import LlamaConfig, TinyLlama

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    cfg = LlamaConfig(num_layers=2, num_heads=8, num_kv_heads=2, head_size=64, hidden_size=512)
    model = TinyLlama(cfg, dtype=torch.bfloat16, device="cuda")
    cache = pk.KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_size, BLOCK,
                       num_blocks=NUM_BLOCKS, dtype=torch.bfloat16, device="cuda")
    caches = cache.kv_caches
    for k, v in caches:
        torch._dynamo.mark_static_address(k)
        torch._dynamo.mark_static_address(v)

    def step(input_ids, positions, slot_mapping, block_table, seq_lens, qsl):
        metadata = AttentionMetadata(slot_mapping, block_table, seq_lens, qsl)
        return model.compute_logits(model(input_ids, positions, caches, metadata))

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    seqs = Sequences([100, 530, 7])
    with torch.no_grad():
        inputs = seqs.prefill_inputs()
        step(inputs[0], seqs.positions, *inputs[1:])
        for i in range(6):
            if i == 3:
                seqs.move_blocks(caches)
            inputs = seqs.decode_inputs()
            got = compiled(inputs[0], seqs.positions, *inputs[1:]).clone()
            want = step(inputs[0], seqs.positions, *inputs[1:])
            close(got, want, torch.bfloat16)
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
