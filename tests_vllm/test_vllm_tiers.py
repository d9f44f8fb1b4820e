"""torch_pagedkv's host and disk tiers inside vLLM: the PagedKVTierConnector.

Specification (issue 27): with kv_transfer_config naming PagedKVTierConnector, every full
block a request computes is stored in the host tier and in one checksummed file per
block and rank under disk_cache_dir, and a later request with that prefix, in another
instance on the directory or after a restart, loads the blocks instead of computing
them: its greedy tokens equal the cold run's and vLLM's num_cached_tokens counts every
full prompt block (all but the last token). A request's cache_salt keeps it apart from
every other tenant's blocks, across restarts. A corrupt, truncated, foreign (other model
or layout), misnamed or half-written file is a miss with a warning naming it (its block
is computed, and stored again); a file that fails only in the worker (fp8 scales it was
not stored under) is recomputed through vLLM's failed-block path. A directory that
cannot be created or that disappears mid-run leaves the engine serving (from the host
tier where it has one). tensor_parallel_size=2 keeps one directory per rank.

Every vLLM start costs 30-60 s here: the engines are started once per module, in
fixtures that run all their workloads back to back.
"""
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from vllm import LLM, SamplingParams  # noqa: E402

from test_vllm_generate import ENGINE, prompts  # noqa: E402
from torch_pagedkv.cache.block_hash import BlockHasher, root_hash  # noqa: E402
from torch_pagedkv.tiers import block_file  # noqa: E402

BS = 32
NEW_TOKENS = 8
CONNECTOR = dict(kv_connector="PagedKVTierConnector",
                 kv_connector_module_path="torch_pagedkv.vllm.connector", kv_role="kv_both")
W = prompts([100, 130, 200, 90], seed=1)  # distinct first blocks: damaged one by one
W_NEW = prompts([150, 70], seed=5)
W_LATE = prompts([120], seed=7)
FILL = prompts([600, 600], seed=9)  # evicts W from a 40-block device cache


def full_blocks(prompt) -> int:
    """The prompt tokens a tier can supply: its full blocks, all but the last token."""
    return (len(prompt["prompt_token_ids"]) - 1) // BS * BS


def salted(workload, salt):
    return [{**p, "cache_salt": salt} for p in workload]


@contextmanager
def engine(path, extra, **overrides):
    llm = LLM(model=path, attention_backend="CUSTOM", kv_transfer_config={
        **CONNECTOR, "kv_connector_extra_config": extra},
        **{**ENGINE, "block_size": BS, **overrides})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


@contextmanager
def log_to(path: Path):
    """fds 1 and 2 (this process's and the engine processes' it starts) into a file."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def gen(llm, workload):
    """[(greedy tokens, num_cached_tokens)] per request."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [(list(o.outputs[0].token_ids), o.num_cached_tokens)
            for o in llm.generate(workload, params)]


def tokens(results):
    return [t for t, _ in results]


def cached(results):
    return [c for _, c in results]


def block_dirs(root) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if p.is_dir())


def block_files(root) -> list[Path]:
    return sorted(Path(root).rglob("*.kv"))


def whole(path: Path) -> bool:
    data = path.read_bytes()
    return hashlib.sha256(data[:-32]).digest() == data[-32:]


def chain_paths(root, prompt) -> list[Path]:
    """The files of a prompt's full blocks, as the connector names them (unsalted)."""
    (rank_dir,) = block_dirs(root)
    seed = bytes.fromhex((Path(root) / "hash_seed").read_text())
    ids = prompt["prompt_token_ids"]
    hashes = BlockHasher(BS).hash_blocks(ids, root_hash(seed))
    return [rank_dir / (h.hex() + ".kv") for h in hashes]


@pytest.fixture(scope="module")
def cold(checkpoints, tmp_path_factory):
    """A first instance on an empty directory, and a second one started beside it on
    the same directory while the first is still up."""
    root = tmp_path_factory.mktemp("tiers") / "disk"
    path = checkpoints["llama"]
    with engine(path, {"disk_cache_dir": str(root)}) as first:
        out = {"W": gen(first, W), "NEW": gen(first, W_NEW), "LATE": gen(first, W_LATE)}
        out["files"] = len(block_files(root))
        with engine(path, {"disk_cache_dir": str(root)}) as second:
            out["second W"] = gen(second, W)
            out["second W salt a"] = gen(second, salted(W, "a"))
    out["root"] = root
    return out


def test_a_cold_run_stores_every_full_block_it_computes(cold):
    assert cached(cold["W"]) == [0] * len(W) and cached(cold["NEW"]) == [0] * len(W_NEW)
    computed = [len(p["prompt_token_ids"]) + NEW_TOKENS - 1 for p in W + W_NEW + W_LATE]
    assert cold["files"] == sum(n // BS for n in computed)
    assert all(whole(f) for f in block_files(cold["root"]))


def test_two_instances_on_one_directory_reuse_each_others_blocks(cold):
    assert tokens(cold["second W"]) == tokens(cold["W"])
    assert cached(cold["second W"]) == [full_blocks(p) for p in W]


def test_a_salted_request_never_meets_unsalted_blocks(cold):
    assert cached(cold["second W salt a"]) == [0] * len(W)
    assert tokens(cold["second W salt a"]) == tokens(cold["W"])


@pytest.fixture(scope="module")
def restarted(cold, checkpoints):
    """A new instance on the directory after both cold ones stopped; at the end its
    directory is replaced by a file (a disk gone mid-run) and it keeps serving."""
    root = cold["root"]
    with engine(checkpoints["llama"], {"disk_cache_dir": str(root)}) as llm:
        out = {"W": gen(llm, W), "salt a": gen(llm, salted(W, "a")),
               "salt b": gen(llm, salted(W, "b"))}
        (rank_dir,) = block_dirs(root)
        shutil.move(rank_dir, root / "gone")
        rank_dir.write_bytes(b"not a directory")
        out["LATE, directory gone"] = gen(llm, W_LATE)
        rank_dir.unlink()
        shutil.move(root / "gone", rank_dir)
    return out


def test_a_restart_computes_only_what_no_earlier_run_computed(cold, restarted):
    assert tokens(restarted["W"]) == tokens(cold["W"])
    assert cached(restarted["W"]) == [full_blocks(p) for p in W]


def test_cache_salt_isolates_tenants_across_a_restart(cold, restarted):
    # salt "a" was computed by the second cold instance: found after the restart
    assert cached(restarted["salt a"]) == [full_blocks(p) for p in W]
    assert cached(restarted["salt b"]) == [0] * len(W)
    assert tokens(restarted["salt a"]) == tokens(restarted["salt b"]) == tokens(cold["W"])


def test_a_disk_that_goes_away_mid_run_leaves_the_engine_serving(cold, restarted):
    assert tokens(restarted["LATE, directory gone"]) == tokens(cold["LATE"])
    assert cached(restarted["LATE, directory gone"]) == [0]


def damage(root) -> dict[str, Path]:
    """One damaged file per kind, each in another request's chain."""
    chains = [chain_paths(root, p) for p in W]
    new_chain = chain_paths(root, W_NEW[0])
    (rank_dir,) = block_dirs(root)
    kinds = {"flipped byte": chains[0][0], "truncated": chains[1][1],
             "foreign": chains[2][2], "misnamed": chains[3][0], "scales": new_chain[1]}
    data = bytearray(kinds["flipped byte"].read_bytes())
    data[len(data) // 2] ^= 0x40
    kinds["flipped byte"].write_bytes(bytes(data))
    data = kinds["truncated"].read_bytes()
    kinds["truncated"].write_bytes(data[:len(data) // 2])
    kinds["misnamed"].write_bytes(chains[2][0].read_bytes())  # another block's file

    def reencode(path, scales, identity=None):  # the file's own key and payload
        f = block_file.parse(path.read_bytes())
        path.write_bytes(block_file.encode(identity or f.identity, f.key, scales,
                                           bytes(f.payload)))

    reencode(kinds["foreign"], (), identity=hashlib.sha256(b"another model").digest())
    reencode(kinds["scales"], (2.0, 2.0, 2.0, 2.0))
    (rank_dir / ".deadbeef.12345.cafe.tmp").write_bytes(b"half-written")
    return kinds


@pytest.fixture(scope="module")
def damaged(cold, checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged") / "disk"
    shutil.copytree(cold["root"], root)
    kinds = damage(root)
    log = root.parent / "engine.log"
    with log_to(log), engine(checkpoints["llama"], {"disk_cache_dir": str(root)}) as llm:
        out = {"W": gen(llm, W), "NEW": gen(llm, W_NEW)}
    out["root"], out["kinds"], out["log"] = root, kinds, log.read_text()
    return out


def test_a_bad_file_is_a_miss_never_served(cold, damaged):
    assert tokens(damaged["W"]) == tokens(cold["W"])
    assert tokens(damaged["NEW"]) == tokens(cold["NEW"])
    # each request is served from the tier up to its damaged block, no further
    assert cached(damaged["W"]) == [0, 32, 64, 0]


def test_a_bad_file_is_named_in_a_warning_and_replaced(damaged):
    text = damaged["log"]
    for kind, says in (("flipped byte", "checksum mismatch"), ("truncated", "checksum mismatch"),
                       ("foreign", "written for another model or cache layout"),
                       ("misnamed", "holds another block"), ("scales", "stored under other fp8 scales")):
        path = damaged["kinds"][kind]
        assert f"{path} is not used: {says}" in text, kind
        assert whole(path), f"the {kind} file was not written again"
    assert all(whole(f) for f in block_files(damaged["root"]))


@pytest.fixture(scope="module")
def host_only(checkpoints):
    """A host tier and a disk directory that cannot be created (/proc is read-only), on a
    40-block device cache: FILL evicts W's blocks, which come back from the host tier."""
    extra = {"host_cache_bytes": "8MiB", "disk_cache_dir": "/proc/pagedkv-tier-test"}
    with engine(checkpoints["llama"], extra, num_gpu_blocks_override=40,
                disable_log_stats=False) as llm:
        out = {"W": gen(llm, W), "FILL": gen(llm, FILL), "W again": gen(llm, W)}
        out["metrics"] = {m.name: m.value for m in llm.get_metrics()
                          if m.name.startswith("vllm:pagedkv_tier_")}
    return out


def test_the_host_tier_serves_blocks_the_device_evicted(cold, host_only):
    assert tokens(host_only["W again"]) == tokens(host_only["W"]) == tokens(cold["W"])
    assert cached(host_only["W again"]) == [full_blocks(p) for p in W]
    m = host_only["metrics"]
    assert m["vllm:pagedkv_tier_host_loaded_blocks"] > 0
    assert m["vllm:pagedkv_tier_disk_loaded_blocks"] == 0
    assert m["vllm:pagedkv_tier_disk_written_blocks"] == 0  # the directory is unusable


@pytest.fixture(scope="module")
def tensor_parallel(checkpoints, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    root = tmp_path_factory.mktemp("tp2") / "disk"
    out = {}
    for run in ("cold", "warm"):
        with engine(checkpoints["llama"], {"disk_cache_dir": str(root)},
                    tensor_parallel_size=2) as llm:
            out[run] = gen(llm, W[:2])
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tensor_parallel_ranks_keep_their_own_files(cold, tensor_parallel):
    assert tokens(tensor_parallel["cold"]) == tokens(tensor_parallel["warm"]) \
        == tokens(cold["W"][:2])
    assert cached(tensor_parallel["warm"]) == [full_blocks(p) for p in W[:2]]
    rank_dirs = block_dirs(tensor_parallel["root"])
    assert len(rank_dirs) == 2
    counts = [len(list(d.glob("*.kv"))) for d in rank_dirs]
    assert counts[0] == counts[1] > 0
    names = [{f.name for f in d.glob("*.kv")} for d in rank_dirs]
    assert names[0] == names[1]  # the same blocks, each rank its own share of the heads
