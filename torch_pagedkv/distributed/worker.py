"""A spawned worker process: rank `rank` of a tensor-parallel engine whose rank 0 spawned it.

It joins rank 0's process group, then builds the same engine rank 0 built, from the
same model source and engine arguments: `LLM(...)` on a rank other than 0 serves rank
0's steps until rank 0 stops it (tensor_parallel.py). The engine class comes as an
argument, so distributed/ never imports the engine that sits above it. One CPU thread
per rank's share of the cores; inductor compiles in this process (no pool of compile
workers that could outlive it); the process ends by itself when its parent is gone.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import launch


def run_worker(rank: int, world: int, port: int, parent_pid: int, device_type: str,
               source: Any, engine_args: dict, engine: Callable[..., Any]) -> None:
    launch.exit_with_parent(parent_pid)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1
    launch.local_device(device_type, rank)
    launch.worker_join(rank, world, port, launch.backend_for(device_type))
    try:  # `engine` is rank 0's engine class (engine/llm.py's LLM), passed down by name
        engine(source, tensor_parallel_size=world, device=device_type, **engine_args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
