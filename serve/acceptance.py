"""Acceptance statistics of speculative decoding, from counts of rounds (pure functions).

A round proposes γ draft tokens; the verifier accepts a prefix of k ∈ [0, γ] of them and emits
k + 1 tokens (k accepted + one recovered or bonus token). Over a history of rounds:

* **α̂, per-token acceptance** = accepted ÷ (accepted + rounds that ended in a rejection): the
  chance that a drafted token is accepted given that every token before it was. It is the α of
  E[τ] below and, per position, 1 − TVD(p, q) (sampling) or 1{argmax q = argmax p} (greedy), so the
  training-side estimate and this one measure the same thing.
* **draft-token acceptance** = accepted ÷ proposed (vLLM's num_accepted_tokens / num_draft_tokens):
  smaller, since the tokens after a rejection are proposed but never tested.
* **block efficiency τ** = emitted tokens ÷ target passes (1 ≤ τ ≤ γ + 1).
* E[τ] = (1 − α^(γ+1)) / (1 − α) when every test succeeds independently with probability α.

A round cut short (EOS, max_tokens) counts only what it emitted: its accepted tokens up to the
stop, and a rejection only when the recovered token was emitted.
"""

from __future__ import annotations


def per_token_acceptance(accepted: int, rejected: int) -> float:
    """α̂ = accepted / (accepted + rejected rounds); 0 when nothing was tested."""
    tested = accepted + rejected
    return accepted / tested if tested else 0.0


def draft_acceptance(accepted: int, proposed: int) -> float:
    """accepted / proposed draft tokens (vLLM's definition)."""
    return accepted / proposed if proposed else 0.0


def expected_block_efficiency(alpha: float, gamma: int) -> float:
    """E[τ] = (1 − α^(γ+1)) / (1 − α) under i.i.d. acceptance α (γ + 1 when α = 1)."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def round_outcome(k: int, gamma: int, emitted: int) -> tuple[int, int]:
    """(accepted, rejected) counted for one round with k accepted of γ that emitted `emitted` tokens."""
    accepted = min(k, emitted)
    rejected = int(k < gamma and emitted > k)
    return accepted, rejected


def summarize_rounds(accepted_per_round: list[int], gamma: int) -> dict:
    """Statistics of a history of complete rounds (each emitted k + 1 tokens)."""
    accepted = sum(accepted_per_round)
    rejected = sum(k < gamma for k in accepted_per_round)
    rounds = len(accepted_per_round)
    return {"rounds": rounds, "accepted": accepted, "rejected": rejected, "proposed": gamma * rounds,
            "acceptance_rate": per_token_acceptance(accepted, rejected),
            "draft_acceptance_rate": draft_acceptance(accepted, gamma * rounds),
            "block_efficiency": (accepted + rounds) / rounds if rounds else 0.0}
