"""Tensor parallelism over torch.distributed: `LLM(model, tensor_parallel_size=N)`.

One file per concern, read in this order:
  tensor_parallel.py  TensorParallel: one engine's ranks as this process sees them
                      (validate, build, start or join, serve, fail, shut down)
  launch.py           processes and process groups: spawned workers on a TCPStore,
                      or torchrun's group; liveness of the workers
  worker.py           a spawned worker's entry point
  sharding.py         column- / row-parallel layers; TinyLlama and HF tp_plan sharding
  step_broadcast.py   rank 0 sends each planned step: a header and one payload tensor
"""
from .sharding import RowParallelLinear, Shard, shard_model
from .tensor_parallel import TensorParallel, TensorParallelModelError
from .launch import WorkerFailure

__all__ = ["TensorParallel", "TensorParallelModelError", "WorkerFailure", "Shard",
           "RowParallelLinear", "shard_model"]
