"""SamplingParams and the sampler: next tokens from logits, with no device sync.

Greedy rows take the argmax. A row with temperature > 0 draws from
softmax(logits / temperature) restricted to its top_k (0: all) with its own
torch.Generator: a request with seed s draws sample i with seed s + i, so sample i
of an n-way request equals a single-sample request with seed s + i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1  # parallel samples per prompt (forks sharing the prompt's blocks)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, index: int, device: torch.device) -> Optional[torch.Generator]:
        """The generator of sample `index` (None: greedy, or unseeded global RNG)."""
        if self.greedy or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed + index)


def sample(logits: Tensor, rows: Sequence[tuple[SamplingParams, Optional[torch.Generator]]]
           ) -> Tensor:
    """logits float32 [n, vocab]; rows[i] = (params, generator) of row i.
    Returns int64 [n] next tokens, still on the logits' device."""
    tokens = logits.argmax(dim=-1)
    for i, (params, gen) in enumerate(rows):
        if params.greedy:
            continue
        row = logits[i] / params.temperature
        if 0 < params.top_k < row.shape[-1]:
            kth = torch.topk(row, params.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]  # tensor into tensor: no sync
    return tokens
