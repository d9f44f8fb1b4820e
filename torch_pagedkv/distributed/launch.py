"""The ranks' processes and process groups: spawned workers, or an existing group.

Spawned (`LLM(model, tensor_parallel_size=N)` in a plain process): this process is
rank 0. It opens a TCPStore on a free port of 127.0.0.1, starts ranks 1..N-1 with
torch.multiprocessing (spawn), waits until each has reached the store (a worker that
dies before is reported by rank), and every rank joins one process group on that store:
gloo on CPU, NCCL on CUDA (rank r on GPU r).
Existing (`torchrun --nproc-per-node N`, or a group the caller made): every rank runs
the same script; the group from the environment (or the one already initialised) is
used as it is.
Either way a second group, gloo on the host, carries the step plans (step_broadcast.py):
its timeout is long because a worker waits there between requests.
"""
from __future__ import annotations

import os
import threading
import time
from multiprocessing import resource_tracker
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"
JOIN_TIMEOUT_S = 300.0  # a spawned worker imports torch before it reaches the store
STEP_TIMEOUT = timedelta(minutes=10)  # a step's collectives (compilation included)
IDLE_TIMEOUT = timedelta(days=30)  # the plan group: workers wait there while idle
POLL_S = 0.05


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def launched_group_size() -> Optional[int]:
    """The world size of an existing process group (initialised, or described by
    torchrun's environment), None when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def local_device(device_type: str, rank: int) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK under torchrun), or the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def join_existing(device_type: str) -> bool:
    """Initialise the default group from torchrun's environment unless one exists;
    True when this call created it (so shutting down destroys it)."""
    if dist.is_initialized():
        return False
    local_device(device_type, int(os.environ["RANK"]))
    dist.init_process_group(backend_for(device_type), timeout=STEP_TIMEOUT)
    return True


def plan_group() -> Any:
    """The gloo group that carries step plans (a collective: every rank calls it)."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


class WorkerFailure(RuntimeError):
    """A tensor-parallel rank died or failed; the engine has stopped every worker."""


class Workers:
    """Ranks 1..N-1 of an engine whose rank 0 is this process, as spawned processes."""

    def __init__(self, world: int, target: Callable, args: tuple) -> None:
        self.world = world
        self.store = dist.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False,
                                   timeout=STEP_TIMEOUT)
        ctx = mp.get_context("spawn")
        # Spawning starts multiprocessing's resource tracker process unless it runs: one
        # started here is stopped with the workers, so shutdown leaves no process behind.
        self._tracker = resource_tracker._resource_tracker
        self._own_tracker = getattr(self._tracker, "_fd", 0) is None
        self.procs = {}
        for rank in range(1, world):
            p = ctx.Process(target=target, args=(rank, world, self.store.port, os.getpid(), *args),
                            name=f"pagedkv-tp-rank{rank}", daemon=True)
            self.procs[rank] = p
        try:
            for p in self.procs.values():
                p.start()
        except BaseException:
            self.stop(timeout=0)
            raise

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.procs.items()}

    def dead(self) -> Optional[tuple[int, Any]]:
        """(rank, process) of the first worker that has exited, or None."""
        for rank, p in self.procs.items():
            if p.exitcode is not None:
                return rank, p
        return None

    def failure(self, what: str) -> Optional[WorkerFailure]:
        """The error naming a dead worker, or None while all live."""
        found = self.dead()
        if found is None:
            return None
        rank, p = found
        return WorkerFailure(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with "
                             f"code {p.exitcode} {what}; the engine has stopped its workers "
                             "(its traceback, if any, is on stderr)")

    def join_group(self, backend: str) -> None:
        """Wait until every worker reached the store (raising, by rank, for one that
        died first), then join the default group as rank 0."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        keys = [f"joined/{r}" for r in self.procs]
        while not self.store.check(keys):
            err = self.failure("while starting")
            if err is not None:
                raise err
            if time.monotonic() > deadline:
                raise WorkerFailure(f"tensor-parallel workers did not start within "
                                    f"{JOIN_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)
        dist.init_process_group(backend, store=self.store, rank=0, world_size=self.world,
                                timeout=STEP_TIMEOUT)

    def wait(self, work: Any, what: str) -> None:
        """Wait for an async collective, checking the workers meanwhile."""
        while not work.is_completed():
            err = self.failure(what)
            if err is not None:
                raise err
            time.sleep(POLL_S)
        work.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Join the workers (they leave after a STOP), then terminate, then kill."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            if p.pid is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for sig in ("terminate", "kill"):
            alive = [p for p in self.procs.values() if p.pid is not None and p.is_alive()]
            for p in alive:
                getattr(p, sig)()
            for p in alive:
                p.join(2.0)
        if self._own_tracker and not any(p.is_alive() for p in self.procs.values()
                                         if p.pid is not None):
            self._tracker._stop()  # restarts by itself when anything needs it again
            self._own_tracker = False


def worker_join(rank: int, world: int, port: int, backend: str) -> None:
    """A spawned worker's side of Workers.join_group."""
    store = dist.TCPStore(HOST, port, world, is_master=False, timeout=STEP_TIMEOUT)
    store.set(f"joined/{rank}", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=STEP_TIMEOUT)


def exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process once its parent is gone (even killed)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="pagedkv-parent-watch", daemon=True).start()
