"""The engine's batch state: the ragged column grid its rounds extend, the per-sequence results they fill, and
the KV-cache crop that rolls a round back.

Batches are ragged: every sequence advances by its own k + 1 tokens per round. The batch is one
grid of columns; a round appends max_s(k_s + 1) columns, sequence s filling the first k_s + 1 and
masking the rest (attention mask 0, positions from the mask's cumulative sum). So a sequence's last
real token is not always the grid's last column: `_Batch.last` records it, and the next round reads
the first prediction of each sequence at its own last column. Masked columns are never attended.

Cache invariant between rounds: the target cache covers columns [0, t_len), the draft cache
[0, d_len), each holding correct keys and values for every sequence there; each model is fed the
columns from its cached length on. After a round, t_len = (old length) + min_s k_s: the column of
the recovered token (k_s + 1-th) held a rejected draft token's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from serve.acceptance import draft_acceptance, per_token_acceptance, round_outcome


@dataclass
class Generation:
    """One finished request: tokens, why it stopped, and its speculative statistics (emitted tokens only)."""

    token_ids: list[int]
    finish_reason: str = "length"  # "stop" (EOS or stop string) or "length"
    text: str | None = None
    rounds: int = 0  # target forward passes
    proposed: int = 0  # draft tokens proposed: γ per round; a tree's depth D per round (so α̂ stays comparable)
    accepted: int = 0  # draft tokens accepted and emitted
    rejected: int = 0  # rounds that ended in a rejection (their recovered token emitted)
    accepted_per_position: list[int] = field(default_factory=list)  # accepted at draft position (tree: depth) i
    accepted_histogram: list[int] = field(default_factory=list)  # rounds that accepted k = 0 … γ (tree: … D)
    target_only_rounds: int = 0  # rounds a goodput policy ran without a draft (γ = 0): in rounds, not in the histogram
    tree_nodes: int = 0  # tree mode: nodes the target verified (N per round)
    accepted_siblings: int = 0  # tree mode: accepted nodes that were not the draft's first choice (rank > 0)

    def record_round(self, k: int, gamma: int, emitted: int) -> tuple[int, int]:
        """Count one round that accepted k of γ draft tokens (a tree: of its depth) and emitted
        `emitted` tokens (fewer when a stop ended the request); returns (accepted, rejected) as counted."""
        acc, rej = round_outcome(k, gamma, emitted)
        self.rounds += 1
        if gamma == 0:
            self.target_only_rounds += 1
            return 0, 0
        self.proposed += gamma
        self.accepted += acc
        self.rejected += rej
        self.accepted_histogram[k] += 1
        for i in range(acc):
            self.accepted_per_position[i] += 1
        return acc, rej

    @property
    def acceptance_rate(self) -> float:
        """α̂ = accepted / (accepted + rejected): per-token acceptance (serve.acceptance)."""
        return per_token_acceptance(self.accepted, self.rejected)

    @property
    def draft_acceptance_rate(self) -> float:
        """accepted / proposed (vLLM's counters)."""
        return draft_acceptance(self.accepted, self.proposed)

    @property
    def block_efficiency(self) -> float:
        """τ = tokens emitted per target forward pass."""
        return len(self.token_ids) / self.rounds if self.rounds else 0.0


class _Batch:
    """The column grid of a batch: token ids, attention mask, and each sequence's last real column."""

    def __init__(self, prompts: list[list[int]], pad_id: int, device, call: int = -1):
        self.call = call  # SpecDecoder.stream's call number (RoundView.call)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        for i, p in enumerate(prompts):  # left padding
            self.ids[i, width - len(p):] = torch.tensor(p, device=device)
            self.mask[i, width - len(p):] = 1
        self.last = torch.full((len(prompts),), width - 1, dtype=torch.long, device=device)  # (B,)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def append(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """tokens (B, n); sequence s keeps its first valid[s] of them (default all), the rest masked."""
        n = tokens.shape[1]
        cols = torch.ones_like(tokens) if valid is None else (
            torch.arange(n, device=tokens.device)[None] < valid[:, None]).long()
        if valid is not None:
            self.last = torch.where(valid > 0, self.length + valid - 1, self.last)
        else:
            self.last = torch.full_like(self.last, self.length + n - 1)
        self.ids = torch.cat([self.ids, tokens], 1)
        self.mask = torch.cat([self.mask, cols], 1)


def _crop(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length` (negative crop: the non-deprecated form)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
