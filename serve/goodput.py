"""γ per round by expected goodput: the draft length that emits the most tokens per second for this batch.

A round over B sequences that drafts γ tokens each emits B · E[τ](α, γ) tokens in expectation,
E[τ] = (1 − α^(γ+1)) / (1 − α) (`serve.acceptance.expected_block_efficiency`), and costs

    cost(B, γ) = t_T(B · (γ + 1)) + γ · t_D(B)

one target pass over γ + 1 positions per sequence and γ draft steps over the batch. The policy plays

    γ* = argmax_{0 ≤ γ ≤ γ_max}  B · E[τ](α̂, γ) / cost(B, γ),

γ = 0 being a plain target step. Where a target pass is memory-bound (flat in its rows) γ* stays at
γ_max; where the rows cost compute — a big batch, or a CPU — γ* falls, to 0 when the batch alone fills
the machine (SmartSpec: Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large Language
Models Using Goodput"). t_T and t_D are measured on the engine itself (`StepCosts`, interpolated in
rows); α̂ is the acceptance of recent rounds (`AcceptanceEstimate`). Choosing γ from the past keeps
decoding lossless: given the prefix, a round's tokens follow the target whatever γ it drafted.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from serve.acceptance import expected_block_efficiency


def _interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear in x through the measured points, extended linearly past the last two; below the
    first point, that point's value (a pass is never cheaper than the smallest one measured)."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if len(xs) == 1:
        return points[xs[0]] * x / xs[0]
    i = max(1, min(bisect_left(xs, x), len(xs) - 1))
    x0, x1 = xs[i - 1], xs[i]
    return max(points[x0] + (points[x1] - points[x0]) * (x - x0) / (x1 - x0), points[x0])


@dataclass
class StepCosts:
    """Measured seconds of one target pass by rows fed (t_T) and one draft step by batch size (t_D)."""

    target: dict[int, float]  # rows → seconds (body + head at every row)
    draft: dict[int, float]  # batch size → seconds (one token per sequence)

    def target_pass(self, rows: int) -> float:
        return _interpolate(self.target, rows)

    def draft_step(self, batch: int) -> float:
        return _interpolate(self.draft, batch)

    def round(self, batch: int, gamma: int) -> float:
        """cost(B, γ) = t_T(B(γ + 1)) + γ t_D(B)."""
        return self.target_pass(batch * (gamma + 1)) + gamma * self.draft_step(batch)


def best_gamma(alpha: float, batch: int, gamma_max: int, costs: StepCosts) -> int:
    """γ* = argmax_γ B · E[τ](α, γ) / cost(B, γ) over 0 ≤ γ ≤ γ_max (ties go to the shorter draft)."""
    rate = [batch * expected_block_efficiency(alpha, g) / costs.round(batch, g) for g in range(gamma_max + 1)]
    return max(range(gamma_max + 1), key=lambda g: (rate[g], -g))


@dataclass
class AcceptanceEstimate:
    """α̂ = a / (a + r) over recent rounds, counts decayed by `decay` per round, started from a prior
    of `prior` worth `weight` decisive outcomes (so the first rounds do not swing γ)."""

    prior: float = 0.5
    weight: float = 8.0
    decay: float = 0.98
    accepted: float = field(init=False)
    rejected: float = field(init=False)

    def __post_init__(self):
        self.accepted, self.rejected = self.prior * self.weight, (1 - self.prior) * self.weight

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, accepted: int, rejected: int) -> None:
        """One round's (or one batch round's) accepted draft tokens and rounds ended by a rejection."""
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + rejected


@dataclass
class GoodputPolicy:
    """The per-round γ of a serving engine: `best_gamma` on α̂ and the engine's measured costs.

    After `probe_every` rounds in a row at γ = 0 (no draft, so no news of α), one round drafts 1 token,
    so a draft that starts agreeing again (traffic drifting back) is noticed."""

    costs: StepCosts
    gamma_max: int
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    probe_every: int = 32
    _idle: int = 0

    def choose(self, batch: int) -> int:
        g = best_gamma(self.estimate.alpha, batch, self.gamma_max, self.costs)
        self._idle = self._idle + 1 if g == 0 else 0
        if g == 0 and self._idle >= self.probe_every:
            self._idle = 0
            return 1
        return g

    def observe(self, accepted: int, rejected: int) -> None:
        self.estimate.update(accepted, rejected)
