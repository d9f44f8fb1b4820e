"""Models by path: `LLM("path/to/Qwen2.5-0.5B")` loads a local Hugging Face checkpoint.

Only local files are read (`local_files_only=True`): nothing is downloaded. The model is
loaded with transformers' `AutoModelForCausalLM.from_pretrained` in the checkpoint's own
dtype and then runs through the HF adapter like any `LLM(hf_model)`
(integrations/hf_model.py); a tokenizer saved beside it is loaded with `AutoTokenizer`.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """No Hugging Face checkpoint at the path (both exceptions catch it)."""


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path never needs the hub
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a model by path needs transformers: "
                          "pip install 'torch_pagedkv[hf]'") from e
    return transformers


def load_checkpoint(path: PathLike) -> tuple[Any, Optional[Any]]:
    """(the causal LM at `path`, its tokenizer or None when none is saved there)."""
    path = os.fspath(path)
    load_checkpoint_config(path)
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                        dtype="auto")
    except (OSError, ValueError) as e:
        raise ValueError(f"LLM({path!r}): transformers could not load the checkpoint: {e}") from e
    return model, load_tokenizer(path) if has_tokenizer(path) else None


def load_checkpoint_config(path: PathLike) -> Any:
    """The config of the causal LM checkpoint at `path`, checked (no weights read)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"LLM({path!r}): no such directory. Pass the directory of a Hugging Face "
            "checkpoint (config.json and weights, e.g. from save_pretrained or "
            "`hf download --local-dir`); nothing is downloaded")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointNotFoundError(
            f"LLM({path!r}): the directory has no config.json, so it is not a Hugging Face "
            "checkpoint (save one with model.save_pretrained(path))")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    causal = type(config) in tf.MODEL_FOR_CAUSAL_LM_MAPPING
    if not causal or (archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs)):
        raise ValueError(
            f"LLM({path!r}): the checkpoint holds {', '.join(archs) or config.model_type}, "
            "not a causal language model (a *ForCausalLM); the engine generates with "
            "decoder-only causal LMs")
    return config


def has_tokenizer(path: PathLike) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: PathLike) -> Any:
    """The transformers tokenizer saved in the directory `path`."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not has_tokenizer(path):
        raise CheckpointNotFoundError(
            f"no tokenizer at {path!r}: expected a directory holding one of {TOKENIZER_FILES} "
            "(tokenizer.save_pretrained(path)), or pass a tokenizer object")
    return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
