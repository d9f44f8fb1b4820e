"""layers/packed_linear.py: nn.Linear through oneDNN-packed weights on the CPU. Checked
against float64 on random data over shapes, dtypes and bias; opcheck; one graph across
batch sizes under torch.compile; never a stale packed copy; and the engine's use."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from torch_pagedkv.layers import packed_linear as pl
from torch_pagedkv.cpu_tuning.choices import FLOAT32_PACKED_MAX_ROWS

pytestmark = pytest.mark.skipif(not pl.available(), reason="this torch cannot pack for oneDNN")


@pytest.fixture(autouse=True)
def two_threads():
    """float32 runs packed only with 2+ threads (one thread: aten's, measured faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_float32_prefill_sized_products_take_aten():
    lin = nn.Linear(16, 8)
    pl.pack_linear_weights(lin)
    calls = []
    real = pl.packed_weight
    pl.packed_weight = lambda w: calls.append(w.dtype) or real(w)
    try:
        with torch.inference_mode():
            for m in (FLOAT32_PACKED_MAX_ROWS, FLOAT32_PACKED_MAX_ROWS + 1):
                x = torch.randn(m, 16)
                torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    finally:
        pl.packed_weight = real
    assert calls == [torch.float32]  # the first only


def test_one_thread_float32_takes_aten_half_stays_packed():
    lin32, lin16 = nn.Linear(16, 8), nn.Linear(16, 8).bfloat16()
    pl.pack_linear_weights(nn.Sequential(lin32, lin16))
    torch.set_num_threads(1)
    calls = []
    real = pl.packed_weight
    pl.packed_weight = lambda w: calls.append(w.dtype) or real(w)
    try:
        with torch.inference_mode():
            lin32(torch.randn(3, 16)), lin16(torch.randn(3, 16).bfloat16())
    finally:
        pl.packed_weight = real
    assert calls == [torch.bfloat16]
OP = torch.ops.pagedkv_cpu.linear
# Output rounding of the dtype plus float32 accumulation over in_features <= 300.
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def close_to_float64(out, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    rtol, atol = TOL[x.dtype]
    assert out.dtype == x.dtype and out.shape == ref.shape
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * scale)


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(0, 9), min_size=0, max_size=2), m=st.integers(1, 70),
       k=st.integers(1, 300), n=st.integers(1, 300), bias=st.booleans(),
       dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**16))
def test_matches_float64(lead, m, k, n, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    pl.pack_linear_weights(lin)
    with torch.no_grad():
        out = lin(x)
    close_to_float64(out, x, lin.weight, lin.bias)


@pytest.mark.parametrize("dtype", pl.HALF)
def test_half_precision_agrees_with_aten(dtype):
    """bf16/fp16 in float32 (or natively) rounds like aten's own half kernel."""
    x, lin = torch.randn(64, 512).to(dtype), nn.Linear(512, 384).to(dtype)
    want = F.linear(x, lin.weight, lin.bias)
    pl.pack_linear_weights(lin)
    with torch.inference_mode():
        got = lin(x)
    same = (got == want).float().mean().item()
    assert same > 0.99, same


def test_opcheck():
    x, w, b = torch.randn(5, 3, 48), torch.randn(20, 48), torch.randn(20)
    torch.library.opcheck(OP.default, (x, w, b))
    torch.library.opcheck(OP.default, (x[0].bfloat16(), w.bfloat16(), None))


def test_bad_input_names_the_mismatch():
    with pytest.raises(RuntimeError, match="x has 7 features, expected weight's in_features 8"):
        OP(torch.randn(2, 7), torch.randn(3, 8), None)


def test_one_graph_across_batch_sizes_under_compile():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        assert any(n.target in (OP, OP.default) for n in gm.graph.nodes)  # packed
        return gm

    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 32))
    pl.pack_linear_weights(model)
    step = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch.inference_mode():
        for m in (2, 3, 17, 256):
            x = torch.randn(m, 64)
            torch.testing.assert_close(step(x), F.linear(F.silu(F.linear(
                x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias))
    assert len(graphs) == 1


def test_never_a_stale_packed_copy():
    lin = nn.Linear(32, 16)
    pl.pack_linear_weights(lin)
    x = torch.randn(4, 32)
    before = pl.stats["packs"]
    with torch.inference_mode():
        lin(x), lin(x)
    assert pl.stats["packs"] == before  # packed once, when the layer was converted
    with torch.no_grad():
        lin.weight.mul_(-2)  # in place: the version counter moves
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert pl.stats["packs"] == before + 1
    lin.weight = nn.Parameter(torch.randn(16, 32))  # another tensor
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    with torch.inference_mode():  # an inference tensor has no version counter: not packed
        lin.weight = nn.Parameter(torch.randn(16, 32), requires_grad=False)
        assert not pl.packable(lin.weight)
        packs = pl.stats["packs"]
        lin.weight.add_(1)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
        assert pl.stats["packs"] == packs


def test_autograd_still_records():
    lin = nn.Linear(8, 4)
    pl.pack_linear_weights(lin)
    lin(torch.randn(3, 8)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_conversion_keeps_parameters_and_skips_subclasses():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(8, 8), Custom(8, 8), nn.Linear(8, 8).double())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pl.pack_linear_weights(model) == 1
    assert [type(m) for m in model] == [pl.PackedLinear, Custom, nn.Linear]
    assert isinstance(model[0], nn.Linear) and repr(model[0]).startswith("PackedLinear(")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_engine_packs_a_cpu_model_and_gives_the_same_tokens():
    from torch_pagedkv.engine import LLM, SamplingParams
    from torch_pagedkv.models import LlamaConfig, TinyLlama
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_size=16)
    torch.manual_seed(0)
    plain, packed = TinyLlama(cfg), TinyLlama(cfg)
    packed.load_state_dict(plain.state_dict())
    prompts = [[(7 * i + j) % 128 for j in range(5 + 3 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=6)
    off = LLM(plain, num_blocks=64, block_size=8, compile=False, pack_linear_weights=False)
    on = LLM(packed, num_blocks=64, block_size=8, compile=False)
    assert off.num_packed_linears == 0 and on.num_packed_linears > 0
    assert not any(type(m) is pl.PackedLinear for m in plain.modules())
    want = [o.token_ids for o in off.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in on.generate(prompts, params, use_tqdm=False)] == want
