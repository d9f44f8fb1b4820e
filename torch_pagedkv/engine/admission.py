"""Admission checks: everything about a request that can be wrong, found before anything
is queued, so that a rejected `generate` or `add_request` changes nothing.

`check_batch` turns generate()'s arguments into one `Checked` request per prompt, or
raises naming the prompt at fault; the engine queues them only when all passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from . import text
from .sampling import SamplingParams

Prompt = Union[str, Sequence[int]]  # text (needs a tokenizer) or token ids


@dataclass(frozen=True)
class Limits:
    """What the engine can run: token ids below vocab_size, sequences shorter than
    max_model_len, at most max_num_seqs sequences at once."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    tokenizer: Any = None


@dataclass(frozen=True)
class Checked:
    """One request that passed: its token ids, its text (if given as text), its params."""

    token_ids: list[int]
    prompt: Optional[str]
    params: SamplingParams
    cache_salt: Optional[str] = None


def check_request(prompt: Prompt, params: Optional[SamplingParams], limits: Limits,
                  cache_salt: Optional[str] = None) -> Checked:
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    prompt_text = None
    if isinstance(prompt, str):
        if limits.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: LLM(model, tokenizer=...) "
                             "(any object with encode/decode), or pass token ids")
        prompt_text, prompt = prompt, text.encode(limits.tokenizer, prompt)
    tolist = getattr(prompt, "tolist", None)
    try:
        tokens = [int(t) for t in (tolist() if tolist else prompt)]
    except (TypeError, ValueError) as e:
        raise TypeError("a prompt is a string or a sequence of token ids, got "
                        f"{type(prompt).__name__}") from e
    if not tokens:
        raise ValueError("a prompt needs at least one token")
    vocab = limits.vocab_size
    if min(tokens) < 0 or max(tokens) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}) (the model's vocab)")
    if len(tokens) >= limits.max_model_len:
        raise ValueError(f"prompt of {len(tokens)} tokens leaves no room to generate: "
                         f"max_model_len is {limits.max_model_len}")
    if params.n > limits.max_num_seqs:
        raise ValueError(f"n={params.n} samples run as {params.n} sequences at once, but "
                         f"max_num_seqs is {limits.max_num_seqs}: lower n or raise max_num_seqs")
    return Checked(tokens, prompt_text, params, cache_salt)


def check_batch(prompts: Union[Prompt, Sequence[Prompt]],
                params: Union[SamplingParams, Sequence[SamplingParams], None],
                cache_salts: Optional[Sequence[Optional[str]]], limits: Limits
                ) -> list[Checked]:
    """generate()'s arguments, checked: one Checked per prompt, in order."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if params is None or isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    salts = [None] * len(prompts) if cache_salts is None else list(cache_salts)
    if len(salts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(salts)} cache_salts")
    checked = []
    for i, (p, sp, salt) in enumerate(zip(prompts, params, salts)):
        try:
            checked.append(check_request(p, sp, limits, salt))
        except (TypeError, ValueError) as e:
            e.add_note(f"(prompt {i} of {len(prompts)}; nothing was queued)")
            raise
    return checked
