"""The draft's LM head on its frequency-ranked vocabulary, training side (`draftalign.vocab`).

Training computes logits only over the N subset rows of the (tied) output embedding — the draft the
engine decodes with has q = 0 outside them, so training and decoding see the same distribution, and
the head costs N / V of the full one. Target ids are mapped to subset positions; a target token
outside the subset cannot be proposed, so its probability joins the target's tail bucket (for
distillation) or its position carries no loss (for next-token cross-entropy).
"""

from __future__ import annotations

import torch

from draftalign.vocab import subset_index
from learner.losses import LOG_FLOOR, TargetDist


class DraftHead:
    """logits(lm, h) over the subset (or the full vocabulary when `vocab` is None)."""

    def __init__(self, vocab: list[int] | None, vocab_size: int):
        self.vocab_size = vocab_size
        self.ids = None if vocab is None else torch.tensor(vocab, dtype=torch.long)  # (N,)
        self.index = None if vocab is None else subset_index(vocab, vocab_size)  # (V,) full id → position, −1

    def logits(self, lm, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) → (..., N) logits through the subset rows of lm's output embedding."""
        head = lm.get_output_embeddings()
        if self.ids is None:
            return head(hidden)
        self.ids = self.ids.to(hidden.device)
        return torch.nn.functional.linear(hidden, head.weight[self.ids], head.bias[self.ids]
                                          if head.bias is not None else None)

    def labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids → subset positions, −1 (ignored) outside the subset."""
        return ids if self.index is None else self.index.to(ids.device)[ids]

    def full_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Subset positions → full-vocabulary ids."""
        return positions if self.ids is None else self.ids.to(positions.device)[positions]

    def restrict(self, logits: torch.Tensor, target: TargetDist,
                 outside: str = "bucket") -> tuple[torch.Tensor, TargetDist]:
        """(logits (N, n) → (N, n + 1), target in subset coordinates). A listed target token outside the
        subset points at an extra column whose logit is LOG_FLOOR (q = 0 there: the draft never proposes it).
        outside="bucket" keeps its own bucket (p_b, 0): TVD stays exact, but FKL is infinite there;
        outside="tail" moves its probability into the tail bucket instead (finite for every divergence, a
        coarser partition: a lower bound)."""
        if self.index is None:
            return logits, target
        n = logits.shape[-1]
        logits = torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), LOG_FLOOR)], -1)  # (N, n+1)
        index = self.index.to(logits.device)
        if target.is_full:  # the subset's columns listed, the rest in the tail (or in the extra column)
            ids = self.ids.to(logits.device)
            lp = target.logprobs[:, ids]  # (N, n)
            pos = torch.arange(n, device=logits.device).expand_as(lp)
            if outside == "bucket":
                rest = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1.0 - 1e-7))  # (N, 1)
                lp, pos = torch.cat([lp, rest], -1), torch.cat([pos, pos.new_full(rest.shape, n)], -1)
            return logits, TargetDist(lp, pos)
        pos = index[target.ids.to(logits.device)]  # (N, k)
        out = pos < 0
        lp = target.logprobs
        if outside == "tail":
            lp = torch.where(out, torch.full_like(lp, LOG_FLOOR), lp)
        return logits, TargetDist(lp, torch.where(out, n, pos))


class DraftLM(torch.nn.Module):
    """A causal LM whose forward returns logits over the draft's vocabulary only: (B, T) ids → (B, T, n)."""

    def __init__(self, lm, head: DraftHead):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, input_ids, attention_mask=None):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head.logits(self.lm, hidden)  # (B, T, n)
