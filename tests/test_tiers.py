"""The tiered prefix cache through the engine (LLM(host_cache_bytes=..., disk_cache_dir=...)).

Specification: with a KV cache too small to keep what earlier requests computed, the
blocks it evicts come back from host memory or disk instead of being computed again;
greedy tokens are the same with tiers on and off (preemption, forks, cascade, chunked
prefill, fp8 caches); num_cached_tokens counts every prompt token not computed, and
stats say which tier it came from; a second engine on the same directory starts warm
and computes only the new tokens; tenants stay apart across a restart; whatever is
wrong with a file or the directory, the answer is a miss with a warning, never a crash
or a wrong token.
"""
from __future__ import annotations

import errno
import json
import os
import random
import warnings
from pathlib import Path

import pytest
import torch

from torch_pagedkv.tiers import TierWarning
from torch_pagedkv.engine import LLM, SamplingParams
from torch_pagedkv.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_size=16, max_position=1024, seed=5)
BLOCK = 4
GREEDY = SamplingParams(max_tokens=6)


@pytest.fixture(scope="module")
def model() -> TinyLlama:
    return TinyLlama(CFG)


def engine(model, **kw) -> LLM:
    args = dict(num_blocks=24, block_size=BLOCK, max_num_batched_tokens=32, compile=False)
    args.update(kw)
    return LLM(model, **args)


def roomy(model, **kw) -> LLM:
    """An engine that never evicts: every disk hit it makes is another engine's file."""
    return engine(model, num_blocks=256, **kw)


def conversations(n: int = 8, seed: int = 0) -> list[list[int]]:
    """n prompts sharing a 10-token system prompt, 5-14 tokens of their own each."""
    rng = random.Random(seed)
    system = [rng.randrange(CFG.vocab_size) for _ in range(10)]
    return [system + [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(5, 14))]
            for _ in range(n)]


def second_turns(prompts, outs, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [p + o.token_ids + [rng.randrange(CFG.vocab_size) for _ in range(rng.randint(3, 9))]
            for p, o in zip(prompts, outs)]


def two_turns(llm: LLM, params=GREEDY):
    """Every conversation's first turn, then its second (prompt + reply + a new turn)."""
    first = conversations()
    outs1 = llm.generate(first, params, use_tqdm=False)
    outs2 = llm.generate(second_turns(first, outs1), params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs1 + outs2], outs2


def computed(outs) -> int:
    return sum(o.metrics.num_prompt_tokens - o.metrics.num_cached_tokens for o in outs)


# ------------------------------------------------------------------ same tokens, fewer computed
@pytest.mark.parametrize("tier", ["host", "disk", "both"])
def test_tiers_restore_evicted_blocks_and_keep_greedy_tokens(model, tmp_path, tier):
    want, outs_off = two_turns(engine(model))
    kw = {"host": dict(host_cache_bytes=2**20), "disk": dict(disk_cache_dir=tmp_path),
          "both": dict(host_cache_bytes=2**20, disk_cache_dir=tmp_path)}[tier]
    llm = engine(model, **kw)
    got, outs_on = two_turns(llm)
    assert got == want
    st = llm.stats
    assert st.num_host_hit_tokens + st.num_disk_hit_tokens > 0
    assert (st.num_host_hit_tokens > 0) == (tier != "disk")
    if tier == "disk":
        assert st.num_disk_hit_tokens > 0
    # Every token a tier gave back is a prompt token not computed, counted as cached.
    assert computed(outs_on) < computed(outs_off)
    assert sum(o.metrics.num_cached_tokens for o in outs_on) > \
        sum(o.metrics.num_cached_tokens for o in outs_off)
    assert st.prefix_hits == llm.block_manager.stats.hits
    assert llm.block_manager.num_free_blocks == 24


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_tiers_on_and_off_agree_across_preemption_forks_cascade_and_chunks(model, tmp_path,
                                                                           cache_dtype):
    params = [SamplingParams(max_tokens=8, n=1 + (i % 3 == 0)) for i in range(8)]
    kw = dict(num_blocks=20, max_num_batched_tokens=12, enable_cascade=True,
              cache_dtype=cache_dtype, max_num_seqs=6)
    off = engine(model, **kw)
    on = engine(model, host_cache_bytes=8 * 2**10, disk_cache_dir=tmp_path, **kw)
    for llm in (off, on):
        llm.results = []
        for turn in range(3):
            outs = llm.generate(conversations(seed=turn % 2), params, use_tqdm=False)
            llm.results += [[c.token_ids for c in o.outputs] for o in outs]
    assert on.results == off.results
    for st in (on.stats, off.stats):
        assert st.num_preemptions > 0 and st.num_cow_copies > 0 and st.num_cascade_steps > 0
    assert on.stats.num_host_hit_tokens > 0 and on.stats.num_disk_hit_tokens > 0
    assert on.stats.num_prefill_tokens < off.stats.num_prefill_tokens


def test_swap_preemption_and_tiers_together(model):
    want, _ = two_turns(engine(model, num_blocks=16))
    llm = engine(model, num_blocks=16, host_cache_bytes=2**20, preemption_mode="swap")
    got, _ = two_turns(llm)
    assert got == want
    assert llm.stats.num_host_hit_tokens > 0


# ------------------------------------------------------------------ restarts
def test_a_second_engine_on_the_directory_computes_only_the_new_tokens(model, tmp_path):
    first = conversations()
    outs1 = engine(model, num_blocks=256, disk_cache_dir=tmp_path).generate(
        first, GREEDY, use_tqdm=False)
    again = second_turns(first, outs1)
    fresh = engine(TinyLlama(CFG), num_blocks=256, disk_cache_dir=tmp_path)  # same weights
    outs2 = fresh.generate(again, GREEDY, use_tqdm=False)
    want = engine(model, num_blocks=256).generate(again, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs2] == [o.token_ids for o in want]
    for p, o1, o2 in zip(first, outs1, outs2):
        written = len(p) + len(o1.token_ids) - 1  # the last sampled token was never computed
        assert o2.metrics.num_cached_tokens == written // BLOCK * BLOCK
    # The shared system prompt comes from disk once, then from the KV cache.
    assert 0 < fresh.stats.num_disk_hit_tokens <= fresh.stats.prefix_hits
    assert fresh.stats.prefix_hits == sum(o.metrics.num_cached_tokens for o in outs2)
    assert fresh.stats.num_prefill_tokens == computed(outs2)


def test_salts_stay_apart_across_a_restart(model, tmp_path):
    prompts = conversations()
    engine(model, disk_cache_dir=tmp_path).generate(prompts, GREEDY, use_tqdm=False,
                                                    cache_salts=["alice"] * len(prompts))
    bob = roomy(model, disk_cache_dir=tmp_path)
    bob.generate(prompts, GREEDY, use_tqdm=False, cache_salts=["bob"] * len(prompts))
    assert bob.stats.num_disk_hit_tokens == 0
    alice = roomy(model, disk_cache_dir=tmp_path)
    alice.generate(prompts, GREEDY, use_tqdm=False, cache_salts=["alice"] * len(prompts))
    assert alice.stats.num_disk_hit_tokens > 0


def test_another_model_or_cache_dtype_never_hits(model, tmp_path):
    prompts = conversations()
    engine(model, disk_cache_dir=tmp_path).generate(prompts, GREEDY, use_tqdm=False)
    other = TinyLlama(LlamaConfig(**{**CFG.__dict__, "seed": 6}))
    for llm in (roomy(other, disk_cache_dir=tmp_path),
                roomy(model, disk_cache_dir=tmp_path, cache_dtype=torch.float8_e5m2)):
        llm.generate(prompts, GREEDY, use_tqdm=False)
        assert llm.stats.num_disk_hit_tokens == 0
    same = roomy(model, disk_cache_dir=tmp_path)
    same.generate(prompts, GREEDY, use_tqdm=False)
    assert same.stats.num_disk_hit_tokens > 0


def test_two_engines_share_one_directory(model, tmp_path):
    """Stepped in turns on one directory, each finds what the other wrote."""
    a, b = (engine(model, disk_cache_dir=tmp_path) for _ in range(2))
    prompts = conversations()
    want = engine(model).generate(prompts, GREEDY, use_tqdm=False)
    reqs_a = [a.add_request(p, GREEDY) for p in prompts[:4]]
    while a.has_unfinished():
        a.step()
    reqs_b = [b.add_request(p, GREEDY) for p in prompts[4:] + prompts[:4]]
    reqs_a += [a.add_request(p, GREEDY) for p in prompts[4:]]
    while a.has_unfinished() or b.has_unfinished():
        for llm in (a, b):
            if llm.has_unfinished():
                llm.step()
    assert [a.output(r).token_ids for r in reqs_a] == [o.token_ids for o in want]
    assert [b.output(r).token_ids for r in reqs_b] == \
        [o.token_ids for o in want[4:] + want[:4]]
    assert b.stats.num_disk_hit_tokens > 0
    assert not list(Path(tmp_path).rglob("*.tmp"))


# ------------------------------------------------------------------ misses, never wrong
def block_files(root) -> list[Path]:
    return sorted(Path(root).rglob("*.kv"))


def corrupt(path: Path, how: str, foreign: Path) -> None:
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # another block's whole, valid file under this name
        path.write_bytes(foreign.read_bytes())


@pytest.mark.parametrize("how", ["flip", "truncate", "empty", "foreign"])
def test_a_bad_block_file_is_a_miss_with_a_warning(model, tmp_path, how):
    prompts = conversations()
    engine(model, disk_cache_dir=tmp_path).generate(prompts, GREEDY, use_tqdm=False)
    files = block_files(tmp_path)
    for f in files[::2]:
        corrupt(f, how, files[1])
    llm = engine(model, disk_cache_dir=tmp_path)
    with pytest.warns(TierWarning, match="not used"):
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    want = engine(model).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert llm.tiers.stats.failed_fetches > 0


def test_a_file_of_another_model_under_this_models_name_is_a_miss(model, tmp_path):
    prompts = conversations()
    other = TinyLlama(LlamaConfig(**{**CFG.__dict__, "seed": 6}))
    engine(other, disk_cache_dir=tmp_path).generate(prompts, GREEDY, use_tqdm=False)
    theirs = block_files(tmp_path)
    mine_dir = engine(model, disk_cache_dir=tmp_path).tiers.disk.dir
    for f in theirs:  # same salted hashes (same tokens, same directory seed)
        (mine_dir / f.name).write_bytes(f.read_bytes())
    llm = roomy(model, disk_cache_dir=tmp_path)
    with pytest.warns(TierWarning, match="another model"):
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    want = engine(model).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert llm.stats.num_disk_hit_tokens == 0


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS, errno.ENOSPC],
                         ids=["permission", "read-only file system", "disk full"])
def test_a_directory_that_takes_no_write_still_serves_reads(model, tmp_path, monkeypatch,
                                                            error):
    """Every write fails (as in a read-only directory or a full disk): the blocks already
    there still hit, nothing new is stored, one warning says so, the tokens are right."""
    engine(model, disk_cache_dir=tmp_path).generate(conversations(), GREEDY, use_tqdm=False)
    before = block_files(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr("torch_pagedkv.tiers.disk.os.replace", refuse)
    prompts = conversations() + conversations(seed=3)
    llm = roomy(model, disk_cache_dir=tmp_path)
    with pytest.warns(TierWarning, match="cannot write") as record:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert sum(issubclass(w.category, TierWarning) for w in record) == 1
    want = engine(model).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert llm.stats.num_disk_hit_tokens > 0
    assert block_files(tmp_path) == before and not list(Path(tmp_path).rglob("*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_directory_is_a_miss_with_a_warning(model, tmp_path):
    seeded = tmp_path / "cache"
    engine(model, disk_cache_dir=seeded).generate(conversations(), GREEDY, use_tqdm=False)
    for d in [seeded, *[p for p in seeded.rglob("*") if p.is_dir()]]:
        d.chmod(0o555)
    try:
        llm = engine(model, disk_cache_dir=seeded)
        with pytest.warns(TierWarning):
            llm.generate(conversations(seed=3), GREEDY, use_tqdm=False)
        llm.generate(conversations(), GREEDY, use_tqdm=False)
        assert llm.stats.num_disk_hit_tokens > 0  # reading still works
    finally:
        for d in [seeded, *[p for p in seeded.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)


def test_a_tier_too_small_for_a_block_is_a_miss_with_a_warning(model, tmp_path):
    llm = engine(model, disk_cache_dir=tmp_path, disk_cache_bytes=100)
    with pytest.warns(TierWarning, match="holds no block"):
        outs = llm.generate(conversations(), GREEDY, use_tqdm=False)
    want = engine(model).generate(conversations(), GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert not block_files(tmp_path)


def test_the_disk_tier_stays_within_its_bytes(model, tmp_path):
    engine(model, disk_cache_dir=tmp_path).generate(conversations()[:1], GREEDY,
                                                    use_tqdm=False)
    bound = 10 * block_files(tmp_path)[0].stat().st_size
    small = engine(model, disk_cache_dir=tmp_path / "small", disk_cache_bytes=bound)
    for seed in range(4):
        small.generate(conversations(seed=seed), GREEDY, use_tqdm=False)
        files = [f for f in (tmp_path / "small").rglob("*") if f.is_file()]
        assert sum(f.stat().st_size for f in files) <= bound  # the seed file included
    assert small.stats.num_disk_written_blocks > 10


def test_the_disk_tier_evicts_the_least_recently_read_file(model, tmp_path):
    llm = engine(model, disk_cache_dir=tmp_path)
    llm.generate(conversations(), GREEDY, use_tqdm=False)
    disk = llm.tiers.disk
    files = block_files(tmp_path)
    for i, f in enumerate(files):  # oldest first, but the first was read last
        os.utime(f, (1000 + i, 1000 + i))
    os.utime(files[0], (5000, 5000))
    size = files[0].stat().st_size
    disk._shrink(len(files) * size - 2 * size)
    assert files[0].exists() and not files[1].exists() and not files[2].exists()
    assert all(f.exists() for f in files[3:])


def test_fp8_blocks_are_not_restored_under_other_scales(model, tmp_path):
    kw = dict(cache_dtype=torch.float8_e4m3fn, disk_cache_dir=tmp_path)
    engine(model, **kw).generate(conversations(), GREEDY, use_tqdm=False)
    rescaled = roomy(model, **kw)
    for layer in range(CFG.num_layers):
        rescaled.kv_cache.set_scales(layer, 0.5, 0.5)
    with pytest.warns(TierWarning, match="scales"):
        rescaled.generate(conversations(), GREEDY, use_tqdm=False)
    assert rescaled.stats.num_disk_hit_tokens == 0


def test_tier_arguments_are_checked(model, tmp_path):
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        engine(model, host_cache_bytes=2**20, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="disk_cache_dir"):
        engine(model, disk_cache_bytes=2**20)
    with pytest.raises(ValueError, match="host_cache_bytes"):
        engine(model, host_cache_bytes=10)


def test_two_disk_tiers_writing_and_evicting_at_once_never_serve_a_bad_block(tmp_path):
    """Two tiers on one directory in two threads, writing the same blocks, reading them
    back and evicting under a bound of a few files: a read is the right payload or a
    miss, never a partial or another block's file."""
    import threading

    from torch_pagedkv.tiers import BlockKey
    from torch_pagedkv.tiers.disk import DiskTier

    payload = {i: bytes([i]) * 4096 for i in range(16)}
    keys = {i: BlockKey(bytes([i]) * 32, b"\0" * 32, (i, i), b"") for i in range(16)}
    tiers = [DiskTier(tmp_path, 6 * 4500, b"\1" * 32, 4096) for _ in range(2)]
    assert tiers[0].hash_seed == tiers[1].hash_seed
    errors, served = [], [0]

    def work(tier: DiskTier, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                i = rng.randrange(16)
                if rng.random() < 0.5:
                    tier.write(keys[i], (), payload[i])
                else:
                    got = tier.read(keys[i], ())
                    if got is not None:
                        assert bytes(got) == payload[i]
                        served[0] += 1
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("error", TierWarning)  # no file may ever look corrupt
        threads = [threading.Thread(target=work, args=(t, s)) for s, t in enumerate(tiers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert served[0] > 0
    assert sum(f.stat().st_size for f in block_files(tmp_path)) <= 2 * 6 * 4500


def test_pagedkv_demo_tiers_prints_the_comparison(capsys, tmp_path):
    from torch_pagedkv.programs import demo

    out_json = tmp_path / "tiers.json"
    rc = demo.main(["--tiers", "--conversations", "4", "--system-tokens", "64",
                    "--user-min", "10", "--user-max", "30", "--max-tokens", "4",
                    "--tier-blocks", "12", "--no-compile", "--quiet", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0 and "greedy outputs identical in all runs: yes" in printed
    for row in ("| prompt tokens computed |", "| restored from host / disk |",
                "| prefill wall time |"):
        assert row in printed
    res = json.loads(out_json.read_text())
    assert res["host tier"]["host_hits"] > 0 and res["disk tier"]["disk_hits"] > 0
    assert res["restart, disk tier"]["prefill_tokens"] < \
        res["restart, no disk tier"]["prefill_tokens"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_restored_block_is_the_evicted_block_bit_for_bit(tmp_path, dtype, tier):
    """Random bytes (NaN patterns included) in a 2-layer cache: evicted, overwritten,
    restored into other blocks, equal byte for byte, in every layer's keys and values."""
    from torch_pagedkv.cache import BlockManager
    from torch_pagedkv.cache.kv_cache import KVCache
    from torch_pagedkv.tiers.tiered_cache import TieredCache

    kv = KVCache(2, 2, 16, BLOCK, num_blocks=4, dtype=dtype)
    caches = kv.key_caches + kv.value_caches

    def scribble():
        for t in caches:
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape,
                                                    dtype=torch.uint8))

    scribble()
    tiers = TieredCache(kv, None, host_cache_bytes=4 * kv.block_bytes if tier == "host" else None,
                        disk_cache_dir=tmp_path if tier == "disk" else None)
    bm = BlockManager(4, BLOCK, hash_seed=tiers.hash_seed, tiers=tiers)
    prompt = list(range(3 * BLOCK + 1))
    bm.allocate("a", prompt)
    bm.commit("a", len(prompt))
    tiers.write_through()
    before = [[t[b].clone() for t in caches] for b in bm.block_table("a")[:3]]
    bm.free("a")
    bm.allocate("b", [7] * 4 * BLOCK)  # every block: the three cached ones are evicted
    tiers.save_evicted()
    scribble()
    bm.free("b")
    assert bm.allocate("c", prompt) == 3 * BLOCK
    tiers.save_evicted()
    tiers.load_restored()
    after = [[t[b] for t in caches] for b in bm.block_table("c")[:3]]
    for old, new in zip(before, after):
        for o, n in zip(old, new):
            assert torch.equal(o.view(torch.uint8), n.view(torch.uint8))
    st = tiers.stats
    assert (st.host_hit_tokens if tier == "host" else st.disk_hit_tokens) == 3 * BLOCK


def test_pagedkv_hash_seed_names_blocks_in_place_of_the_directory_seed(model, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("PAGEDKV_HASH_SEED", "7")
    roomy(model, disk_cache_dir=tmp_path / "a").generate(conversations(), GREEDY,
                                                        use_tqdm=False)
    names = {f.name for f in block_files(tmp_path / "a")}
    roomy(model, disk_cache_dir=tmp_path / "b").generate(conversations(), GREEDY,
                                                        use_tqdm=False)
    assert names and names == {f.name for f in block_files(tmp_path / "b")}


def generate_in_a_process(directory: str, bound: int, seed: int) -> tuple[list, int, int]:
    """One engine in its own process on a shared directory; any TierWarning fails it.
    Returns its tokens, the blocks it wrote and the tokens it restored from disk."""
    warnings.simplefilter("error", TierWarning)
    torch.set_num_threads(1)
    llm = engine(TinyLlama(CFG), disk_cache_dir=directory, disk_cache_bytes=bound)
    outs = []
    for turn in range(3):
        outs += llm.generate(conversations(seed=(seed + turn) % 2), GREEDY, use_tqdm=False)
    return [o.token_ids for o in outs], llm.stats.num_disk_written_blocks, \
        llm.stats.num_disk_hit_tokens


def test_two_engine_processes_share_a_small_directory(model, tmp_path):
    """Two processes at once on one directory bounded to 30 blocks: both write,
    read and evict the same blocks; neither warns, both give the tokens of an engine
    without tiers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(generate_in_a_process, str(tmp_path), 30 * 2300, s)
                   for s in (0, 1)]
        got = [f.result(timeout=300) for f in futures]
    assert sum(written for _, written, _ in got) > 30  # more than the bound holds: evictions
    assert all(hits > 0 for _, _, hits in got)
    plain = engine(model)
    for s, (tokens, _, _) in zip((0, 1), got):
        want = []
        for turn in range(3):
            want += plain.generate(conversations(seed=(s + turn) % 2), GREEDY, use_tqdm=False)
        assert tokens == [o.token_ids for o in want]
    files = block_files(tmp_path)
    assert 0 < sum(f.stat().st_size for f in files) <= 2 * 30 * 2300  # each engine's bound
    assert not list(Path(tmp_path).rglob("*.tmp"))
