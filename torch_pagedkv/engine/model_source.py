"""Where the engine's model comes from: a model, a Hugging Face model (adapted to a
PagedModel), a local checkpoint path or a builder. Below both the engine (llm.py) and
tensor parallelism (distributed/), which build a rank's model the same way."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch


def is_hf_model(model) -> bool:
    """A transformers PreTrainedModel, detected without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def load_model(source, device: Optional[torch.device]) -> tuple[Any, Any]:
    """A model given by source: a local checkpoint path (loaded on the CPU, files only)
    or a builder (a callable returning the model). Returns (the model, adapted to a
    PagedModel when it is a Hugging Face one, on `device` unless that is None; the
    checkpoint's tokenizer or None)."""
    tokenizer = None
    if isinstance(source, (str, os.PathLike)):
        from .checkpoint import load_checkpoint
        model, tokenizer = load_checkpoint(source)
    else:
        model = source()
    if is_hf_model(model):
        from ..integrations.hf import as_paged_model
        model = as_paged_model(model)  # refuses a model it cannot route
    if device is not None and model_device(model) != device:
        model = model.to(device)
    return model, tokenizer
