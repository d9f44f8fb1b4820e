"""Decode steps padded to CUDA-graph capture sizes: the bucketing, the static buffers and
the outputs, on the CPU (no capture) and, with a GPU, replayed graphs."""
import pytest
import torch

from torch_pagedkv.engine import LLM, RequestOutput, SamplingParams
from torch_pagedkv.engine.cuda_graphs import capture_sizes
from torch_pagedkv.models.llama import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16)


def prompts(n, seed=0, shared=20):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(512, (shared,), generator=g).tolist()
    return [system + torch.randint(512, (int(3 + 5 * i % 11),), generator=g).tolist()
            for i in range(n)]


@pytest.mark.parametrize("max_num_seqs, sizes", [
    (1, [1]), (3, [1, 2, 4]), (6, [1, 2, 4, 8]), (8, [1, 2, 4, 8]),
    (20, [1, 2, 4, 8, 16, 24]), (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
])
def test_capture_sizes_are_vllms(max_num_seqs, sizes):
    assert capture_sizes(max_num_seqs) == sizes


def run(device, cuda_graphs, compile=False, max_tokens=9, **options):
    """Requests with forks (n=2), a shared prefix and late arrivals (prefix hits, batch
    composition changing step to step). Returns the outputs, the (sequences, padded
    tokens, padded rows) of each decode-shaped step, the buffer addresses and the engine."""
    llm = LLM(TinyLlama(CFG, device=device), num_blocks=160, block_size=4, max_num_seqs=12,
              compile=compile, cuda_graphs=cuda_graphs, **options)
    shapes, addresses = [], set()
    reqs = [llm.add_request(p, SamplingParams(max_tokens=max_tokens, n=1 + (i % 3 == 0)))
            for i, p in enumerate(prompts(7))]
    late = prompts(3, seed=1)  # arrive mid-run: batch composition changes, prefix hits
    steps = 0
    while llm.has_unfinished():
        if steps == 4:
            reqs += [llm.add_request(p, SamplingParams(max_tokens=max_tokens // 2))
                     for p in late]
        out = llm.step()
        steps += 1
        md = llm.runner.last_metadata
        if all(s.num_new == 1 for s in out.scheduled.scheduled):
            shapes.append((len(out.scheduled.scheduled), md.slot_mapping.shape[0],
                           md.seq_lens.shape[0]))
            addresses.add((md.slot_mapping.data_ptr(), md.block_table.data_ptr(),
                           md.seq_lens.data_ptr(), md.query_start_loc.data_ptr()))
    outputs = [[c.token_ids for c in RequestOutput.of(r).outputs] for r in reqs]
    return outputs, shapes, addresses, llm


def test_padded_decode_steps_match_the_unpadded_run_on_cpu():
    plain, plain_shapes, _, _ = run("cpu", cuda_graphs=False)
    padded, shapes, addresses, llm = run("cpu", cuda_graphs=True)
    assert padded == plain
    sizes = llm.runner.graphs.sizes
    assert shapes and all(tokens == max(2, min(s for s in sizes if s >= n)) and seqs == tokens + 1
                          for n, tokens, seqs in shapes)
    assert any(n != tokens for n, tokens, _ in shapes)  # padding really happened
    assert len(addresses) == 1  # every decode step reads the same static buffers
    assert all(tokens == max(2, n) for n, tokens, _ in plain_shapes)


def test_cuda_graphs_need_no_gpu_to_be_off():
    llm = LLM(TinyLlama(CFG), num_blocks=16, block_size=4, compile=False)
    assert llm.runner.graphs is None  # None: on only for a CUDA model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_replayed_graphs_match_eager_without_recapture_or_recompile():
    eager, _, _, _ = run("cuda", cuda_graphs=False, max_tokens=48)
    graphed, shapes, addresses, llm = run("cuda", cuda_graphs=True, compile=True, max_tokens=48)
    assert graphed == eager
    assert len(shapes) >= 50 and len(addresses) == 1
    graphs = llm.runner.graphs
    assert graphs.num_captures == len({tokens for _, tokens, _ in shapes})  # once per size
    assert graphs.num_replays == len(shapes)
    # A second engine of the same architecture compiles nothing more.
    again, _, _, llm2 = run("cuda", cuda_graphs=True, compile=True, max_tokens=48)
    assert again == eager and llm2.num_compiled_graphs == 0


def test_padded_cascade_decode_steps_match_the_unpadded_plain_run_on_cpu():
    """Cascade on padded decode steps (the shared prefix read once): the plain run's tokens."""
    plain, _, _, _ = run("cpu", cuda_graphs=False, enable_cascade=False)
    padded, shapes, addresses, llm = run("cpu", cuda_graphs=True, enable_cascade=True)
    assert padded == plain
    assert llm.stats.num_cascade_steps > 0 and len(addresses) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cascade_decode_steps_replay_graphs_of_their_own():
    """A size's cascade steps and plain steps each replay their own graph (the cascade
    tensors are filled on cascade steps only), and match eager plain attention."""
    eager, _, _, _ = run("cuda", cuda_graphs=False, max_tokens=48, enable_cascade=False)
    graphed, shapes, _, llm = run("cuda", cuda_graphs=True, compile=True, max_tokens=48,
                                  enable_cascade=True)
    assert graphed == eager
    graphs = llm.runner.graphs
    assert llm.stats.num_cascade_steps > 0
    assert len({t for _, t, _ in shapes}) < graphs.num_captures <= 2 * len({t for _, t, _ in shapes})
    assert graphs.num_replays == len(shapes)
