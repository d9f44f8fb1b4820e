"""TensorParallel: one engine's ranks as this process sees them.

`LLM(model, tensor_parallel_size=N)` with N > 1 starts here (TensorParallel.start):
every rank builds the full model from the same source (a checkpoint path, or a
picklable builder), shards it (sharding.py) and then builds the same engine around its
shard from the same arguments, so every rank's KV cache (its own KV heads), swap space
and runner buffers have the same sizes. Rank 0 keeps the scheduler and BlockManager,
plans every step, sends it (step_broadcast.py) and samples; the other ranks replay each
step (`serve`) until rank 0 stops them. Spawned workers are ranks 1..N-1 of this process
(launch.py); under torchrun every rank runs the same script, and `LLM(...)` on a rank
other than 0 serves until rank 0 shuts down, then returns an engine that cannot
generate (`is_driver` False).
"""
from __future__ import annotations

import functools
import gc
import os
import pickle
import time
import weakref
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..engine.model_source import load_model
from ..engine.model_runner import ModelRunner, PlannedStep
from . import launch
from .launch import WorkerFailure, Workers
from .sharding import (Shard, check_divisible, hf_geometry, lm_head_mode, model_geometry,
                       shard_model)
from .step_broadcast import StepReceiver, StepSender

ModelSource = Union[str, "os.PathLike[str]", Callable[[], nn.Module]]
FAILURE_GRACE_S = 10.0  # after a failed collective, how long a worker's death may take to show
# The engines whose workers this process spawned: torch.distributed has one default group
# per process, so one such engine runs at a time.
_SPAWNED: "weakref.WeakSet[TensorParallel]" = weakref.WeakSet()


class TensorParallelModelError(TypeError, ValueError):
    """A model that ranks cannot build for themselves (both exceptions catch it)."""


def check_source(model: Any, world: int) -> None:
    """Each rank builds its own model: from a path or a picklable builder."""
    if isinstance(model, nn.Module):
        raise TensorParallelModelError(
            f"LLM(model, tensor_parallel_size={world}) got an nn.Module instance "
            f"({type(model).__name__}); every rank builds the model itself, so pass the path "
            "of a local Hugging Face checkpoint or a builder: a picklable callable that builds "
            "the full model, e.g. functools.partial(TinyLlama, config)")
    if isinstance(model, (str, os.PathLike)):
        return
    if not callable(model):
        raise TensorParallelModelError(
            f"LLM(model, tensor_parallel_size={world}): model must be a checkpoint path or a "
            f"callable that builds the model, got {type(model).__name__}")
    try:
        pickle.dumps(model)
    except Exception as e:
        raise TensorParallelModelError(
            f"LLM(model, tensor_parallel_size={world}): the model builder must be picklable "
            f"to reach the worker processes (a module-level function or functools.partial, "
            f"not a lambda or closure): {e}") from e


def check_devices(device_type: str, world: int) -> None:
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs (one per rank), "
                         f"this machine has {torch.cuda.device_count()}")


def builder_device(source: ModelSource) -> Optional[str]:
    """The device a functools.partial builder names (its `device` keyword), else None:
    the GPU count is checked before the builder runs where that tells it."""
    if isinstance(source, functools.partial):
        device = source.keywords.get("device")
        return None if device is None else str(device)
    return None


class TensorParallel:
    """This process's rank of a tensor-parallel engine (see the module docstring)."""

    def __init__(self, rank: int, world: int, model: nn.Module, tokenizer: Any,
                 workers: Optional[Workers], owns_group: bool, plan_group: Any) -> None:
        self.rank, self.world = rank, world
        self.model, self.tokenizer = model, tokenizer
        self.workers = workers
        self.owns_group = owns_group
        self.plan_group = plan_group
        shard_model(model, Shard(rank, world))
        self.sender: Optional[StepSender] = None
        self.error: Optional[Exception] = None
        self.closed = False

    @classmethod
    def start(cls, source: ModelSource, world: int, device: Optional[str],
              engine_args: dict, engine: Callable[..., Any]) -> "TensorParallel":
        """Validate, build this rank's model, start (or join) the other ranks, shard.
        `engine` is the engine class (picklable by name) that each spawned worker builds
        from the same arguments: the caller hands it down, so this layer never imports
        the engine above it."""
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {world!r}")
        check_source(source, world)
        if any(not tp.closed for tp in _SPAWNED):
            gc.collect()  # an engine nobody holds, kept only by a reference cycle, closes
        if any(not tp.closed for tp in _SPAWNED):
            raise RuntimeError("this process already runs a tensor-parallel engine, and "
                               "torch.distributed gives a process one default group: call "
                               "llm.shutdown() on it (or leave its `with` block) first")
        lm_head_mode()  # a bad PAGEDKV_TP_LM_HEAD is refused here, not in the workers
        launched = launch.launched_group_size()
        if launched is not None and launched != world:
            raise ValueError(f"tensor_parallel_size={world}, but the process group this runs "
                             f"in has {launched} ranks")
        path = isinstance(source, (str, os.PathLike))
        if device is None and path:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        hint = device if device is not None else builder_device(source)
        if hint is not None:
            check_devices(torch.device(hint).type, world)
        if path:  # the heads are known before any weight is read
            from ..engine.checkpoint import load_checkpoint_config
            heads, kv, _, inter = hf_geometry(load_checkpoint_config(source))
            check_divisible(world, heads, kv, inter)
        if launched is not None:
            return cls._join(source, world, device)
        model, tokenizer = load_model(
            source, launch.local_device(device, 0) if device is not None else None)
        device_type = next(model.parameters()).device.type
        check_devices(device_type, world)
        if device is None and device_type == "cuda":  # rank 0 runs on GPU 0
            model = model.to(launch.local_device("cuda", 0))
        check_divisible(world, *model_geometry(model))
        from .worker import run_worker
        workers = Workers(world, run_worker, (device_type, source, engine_args, engine))
        try:
            workers.join_group(launch.backend_for(device_type))
            tp = cls(0, world, model, tokenizer, workers, True, launch.plan_group())
        except BaseException:
            workers.stop(timeout=0)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        _SPAWNED.add(tp)
        return tp

    @classmethod
    def _join(cls, source: ModelSource, world: int, device: Optional[str]) -> "TensorParallel":
        """A rank of an existing group (torchrun, or a spawned worker)."""
        device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
        owns = launch.join_existing(device_type)
        plan_group = launch.plan_group()  # before building: rank 0 then sees a failed build
        rank = dist.get_rank()
        model, tokenizer = load_model(source, launch.local_device(device_type, rank))
        check_divisible(world, *model_geometry(model))
        return cls(rank, world, model, tokenizer if rank == 0 else None, None, owns, plan_group)

    # ------------------------------------------------------------ running
    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def connect(self, runner: ModelRunner) -> None:
        """Called once the engine is built on this rank: wait until every rank is, then
        rank 0 sends its steps from `runner`, and any other rank serves them."""
        if self.is_driver:
            self.sender = StepSender(runner, self.plan_group)
            try:
                self._collective(dist.barrier(group=self.plan_group, async_op=True),
                                 "while starting")
            except RuntimeError as e:
                raise self.fail(e, "while starting") from e
            runner.send_step = self.sender.send
            return
        receiver = StepReceiver(runner, self.plan_group)
        dist.barrier(group=self.plan_group)
        while (step := receiver.receive()) is not None:
            runner.replay(step)

    def _collective(self, work: Any, what: str) -> None:
        if self.workers is not None:
            self.workers.wait(work, what)
        else:
            work.wait()

    def check(self) -> None:
        """Raise if the engine cannot run a step: a worker died, or it already failed,
        was shut down, or this rank is not the one that drives."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise RuntimeError("the engine is shut down (llm.shutdown()); make a new LLM")
        if not self.is_driver:
            raise RuntimeError(f"rank {self.rank} of a tensor-parallel engine serves rank 0's "
                               "steps; only rank 0 generates (check llm.is_driver)")
        if self.workers is not None:
            err = self.workers.failure("before this step")
            if err is not None:
                raise self.fail(err)

    def fail(self, cause: BaseException, what: str = "during a step") -> Exception:
        """After a failed collective: the error to raise, naming the dead rank when one
        died (within FAILURE_GRACE_S); every worker is stopped."""
        err = cause if isinstance(cause, WorkerFailure) else None
        grace = FAILURE_GRACE_S if isinstance(cause, RuntimeError) else 0.0  # not an interrupt
        deadline = time.monotonic() + grace
        while err is None and self.workers is not None and time.monotonic() < deadline:
            err = self.workers.failure(what)
            time.sleep(launch.POLL_S)
        if err is None:
            err = WorkerFailure(f"tensor-parallel rank {self.rank} failed {what}: "
                                f"{type(cause).__name__}: {cause}; the engine has stopped "
                                "its workers")
        self.error = err
        self.close()
        return err

    def close(self) -> None:
        """Stop every rank and leave the groups (idempotent; also run at exit)."""
        if self.closed:
            return
        self.closed = True
        if self.sender is not None and self.error is None:
            try:
                self.sender.stop()
            except RuntimeError:
                pass  # a worker already gone: the processes are stopped below
        if self.workers is not None:  # they leave by themselves after a STOP
            stopped = self.sender is not None and self.error is None
            self.workers.stop(timeout=10.0 if stopped else 0.0)
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

