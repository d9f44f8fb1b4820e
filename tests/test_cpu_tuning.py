"""The CPU tuning table: its key, its file (corrupt, foreign, stale, concurrent writers),
that a planted table changes the engine's choices, that "off" is the defaults, and that
no tuned choice changes the engine's fp32 tokens."""
import json
import multiprocessing as mp
import warnings
from dataclasses import replace

import pytest
import torch

from torch_pagedkv.cpu_tuning import identity, policy, resolve, table
from torch_pagedkv.cpu_tuning.choices import (ALL_ROWS, CascadeChoice, LinearChoice,
                                              attention_context, default_for, linear_context)

CTX = [linear_context(torch.float32, 64, 32), attention_context("cascade", torch.float32, 4, 2, 16, 8)]


@pytest.fixture(autouse=True)
def _clean():
    table._warned.clear()
    yield
    policy.clear()


def test_key_names_every_field_and_changes_with_threads():
    a = identity.probe(threads=2)
    assert a.key != identity.probe(threads=1).key
    assert identity.CpuIdentity.from_dict(a.as_dict()) == a
    assert a.model.lower().replace(" ", "-")[:8] in a.key or a.key.startswith("cpu")
    d = identity.describe(threads=3)
    assert "3 threads" in d and f"torch {torch.__version__}" in d


def _plant(path, entries, ident=None, library=None, **override):
    doc = {"format": table.FORMAT, "version": table.VERSION,
           "identity": (ident or identity.probe()).as_dict(),
           "library": library or table.library_id(), "entries": entries, **override}
    path.write_text(json.dumps(doc))


def test_planted_file_is_read_and_measures_nothing(tmp_path):
    p = tmp_path / "t.json"
    _plant(p, {CTX[0]: {"choice": {"packed_max_rows": 0, "packed_min_rows": 1}, "measured": {}},
               CTX[1]: {"choice": {"min_seqs": 2, "min_shared_tokens": 8}}})
    t = resolve.resolve(p, CTX, progress=lambda line: pytest.fail(f"measured: {line}"))
    assert t.choice(CTX[0]) == LinearChoice(0) and t.choices[CTX[0]].source == "table"
    assert t.choice(CTX[1]) == CascadeChoice(2, 8)
    t.apply()
    assert not policy.linear_runs_packed(torch.float32, 64, 32, 4)


@pytest.mark.parametrize("kind", ["not json", "wrong format", "bad choice", "foreign", "stale library",
                                  "stale version"])
def test_corrupt_foreign_stale_warn_once_and_remeasure(tmp_path, kind, monkeypatch):
    p = tmp_path / "t.json"
    good = {CTX[0]: {"choice": {"packed_max_rows": 4, "packed_min_rows": 1}}}
    if kind == "not json":
        p.write_text('{"format": ')
    elif kind == "wrong format":
        p.write_text('{"format": "something else"}')
    elif kind == "bad choice":
        _plant(p, {CTX[0]: {"choice": {"packed_max_rows": -3, "packed_min_rows": 1}}})
    elif kind == "foreign":
        _plant(p, good, ident=replace(identity.probe(), model="Some Other CPU"))
    elif kind == "stale library":
        _plant(p, good, library="0" * 16)
    else:
        _plant(p, good, version=table.VERSION + 1)
    calls = []
    from torch_pagedkv.cpu_tuning import measure
    monkeypatch.setattr(measure, "measure", lambda c, d, b: calls.append(c) or (LinearChoice(7), {"x": 1}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = resolve.resolve(p, CTX[:1], progress=lambda line: None)
    assert len([x for x in w if "CPU tuning" in str(x.message)]) == 1
    word = {"not json": "corrupt", "wrong format": "corrupt", "bad choice": "corrupt",
            "foreign": "foreign"}.get(kind, "stale")
    assert word in str(w[0].message)
    assert calls == CTX[:1] and t.choice(CTX[0]) == LinearChoice(7)
    # rewritten: valid now, and read back without a warning or a measurement
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = resolve.resolve(p, CTX[:1], progress=lambda line: pytest.fail("measured"))
    assert again.choice(CTX[0]) == LinearChoice(7)


def _writer(path, i):
    ident, lib = identity.probe(threads=2), "lib"
    for k in range(20):
        table.save(path, ident, lib, {linear_context(torch.float32, 8 + i, 8 + k):
                                      table.Entry(LinearChoice(k))})


def test_concurrent_writers_keep_every_entry_and_a_valid_file(tmp_path):
    p = tmp_path / "t.json"
    procs = [mp.get_context("fork").Process(target=_writer, args=(p, i)) for i in range(3)]
    for x in procs:
        x.start()
    for x in procs:
        x.join()
        assert x.exitcode == 0
    entries = table.parse(p.read_text(), identity.probe(threads=2), "lib", str(p))
    assert len(entries) == 60
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_unwritable_folder_is_reported_not_raised(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        note = table.save(ro / "sub" / "t.json", identity.probe(), "lib", {})
    finally:
        ro.chmod(0o700)
    import os
    assert note is not None or os.geteuid() == 0  # root writes anywhere


def test_off_is_the_documented_defaults():
    t = resolve.resolve("off", CTX)
    assert t.path is None
    assert t.choice(CTX[0]) == default_for(CTX[0], identity.probe().threads)
    assert t.choice(CTX[1]) == CascadeChoice()
    assert default_for(linear_context(torch.bfloat16, 8, 8), 2) == LinearChoice(ALL_ROWS)
    assert default_for(CTX[0], 1) == LinearChoice(0)


def test_measured_choice_keeps_default_on_noise(monkeypatch):
    from torch_pagedkv.cpu_tuning import measure
    same = lambda: sum(range(2000))  # noqa: E731
    res = measure.compare(same, same, measure.Budget(5))
    assert res["verdict"] == "tie"
    # The rule itself on fixed timings (a loaded machine must not decide this test): each
    # "function" returns the seconds its sample takes.
    monkeypatch.setattr(measure, "_sample", lambda fn, reps: fn())
    def timer(seq):
        it = iter(seq)
        return lambda: next(it, 1e-3)

    fast, slow = timer([1e-3] * 20), timer([3e-3] * 20)
    assert measure.compare(slow, fast, measure.Budget(5))["verdict"] == "alt"
    fast, slow = timer([1e-3] * 20), timer([3e-3] * 20)
    assert measure.compare(fast, slow, measure.Budget(5))["verdict"] == "base"
    # 3% apart, or faster in only 4 of 7 rounds: noise, the default stays.
    a, b = timer([1e-3] * 20), timer([0.97e-3] * 20)
    assert measure.compare(a, b, measure.Budget(5))["verdict"] == "tie"
    # (warm-up and sizing take each one's first two samples; then 7 rounds)
    a = timer([1e-3] * 20)
    b = timer([0.5e-3, 0.5e-3] + [0.5e-3, 2e-3] * 3 + [0.5e-3] * 10)
    res = measure.compare(a, b, measure.Budget(5))
    assert res["verdict"] == "tie" and res["agree"] < measure.AGREEMENT, res


def _tiny_llm(**kw):
    from torch_pagedkv.engine import LLM
    from torch_pagedkv.models.llama import LlamaConfig, TinyLlama
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_size=16, seed=0)
    return LLM(TinyLlama(cfg), num_blocks=256, block_size=8, compile=False, **kw)


def _run(llm):
    from torch_pagedkv.engine import SamplingParams
    shared = list(range(1, 41))
    prompts = [shared + [50 + i, 60 + i] for i in range(6)]
    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=6))]


def test_planted_table_changes_the_engine_choice_and_no_output(tmp_path):
    off = _tiny_llm(cpu_tuning="off")
    base = _run(off)
    assert off.stats.num_cascade_steps == 0  # 6 sequences: fewer than the default 16
    p = tmp_path / "t.json"
    ctx = attention_context("cascade", torch.float32, 4, 2, 16, 8)
    entries = {ctx: {"choice": {"min_seqs": 2, "min_shared_tokens": 8}}}
    for m in off.model.modules():
        if isinstance(m, torch.nn.Linear):  # every linear to aten: the other GEMM path
            entries[linear_context(torch.float32, *m.weight.shape)] = {
                "choice": {"packed_max_rows": 0, "packed_min_rows": 1}}
    _plant(p, entries)
    planted = _tiny_llm(cpu_tuning=p)
    assert planted.cpu_tuning.choice(ctx) == CascadeChoice(2, 8)
    assert _run(planted) == base  # fp32 tokens identical with the tuned choices
    assert planted.stats.num_cascade_steps > 0
    assert not policy.linear_runs_packed(torch.float32, 256, 64, 2)


def test_pagedkv_tune_cpu_show_prints_what_is_in_force(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PAGEDKV_TUNING_DIR", str(tmp_path))
    from torch_pagedkv.programs import tune
    assert tune.main(["--cpu", "--show"]) == 0
    out = capsys.readouterr().out
    assert identity.probe().key in out and "[default (not measured)]" in out
    assert "linear/float32/8192x512" in out and "cascade/float32/8x2x64/b16" in out
    assert not list(tmp_path.iterdir())  # --show measures and writes nothing
