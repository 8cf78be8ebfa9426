"""γ per round by expected goodput, from each request's own acceptance: the draft length that emits the most
tokens per second for the sequences being decoded.

A round over a grid of B sequences that drafts γ tokens each costs

    cost(B, γ) = t_T(B · (γ + 1)) + γ · t_D(B)

one target pass over γ + 1 positions per sequence and γ draft steps over the batch, and emits, in
expectation, Σ_s E[τ](α̂_s, γ) tokens over its live sequences s, E[τ] = (1 − α^(γ+1)) / (1 − α)
(`serve.acceptance.expected_block_efficiency`) at sequence s's own per-token acceptance α̂_s. The policy plays

    γ* = argmax_{0 ≤ γ ≤ γ_max}  G(γ),   G(γ) = Σ_s E[τ](α̂_s, γ) / cost(B, γ)          (`round_goodput`)

γ = 0 being a plain target step. Why one γ for the round and not one per sequence: the engine's grid is
rectangular (`serve.batch_state`), so a round's target pass computes B · (max_s γ_s + 1) rows and its draft
max_s γ_s steps over all B rows whatever each sequence keeps. The cost depends on the γ_s only through
m = max_s γ_s and every E[τ](α̂_s, γ_s) grows with γ_s, so the joint argmax over (γ_1 … γ_B) puts every
γ_s = m and is the one-dimensional search above, exact. At batch 1 (`draftalign eval`, a lone request) it is
the request's own γ; in a batch, a request the draft does not know adds E[τ] ≈ 1 whatever γ, so it pulls γ*
down only through the cost (SmartSpec: Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large
Language Models Using Goodput"; HF's `num_assistant_tokens_schedule="heuristic"` adapts from acceptance too).
Where a target pass is memory-bound (flat in its rows) γ* stays at γ_max for a draft that agrees; where rows
cost compute — a big batch, or fp32 on a CPU (a pass over 4 tokens ≈ 1.4 steps) — γ* falls, to 0 for a request
whose draft keeps failing or a batch that alone fills the machine.

α̂_s (`AcceptanceEstimate`) starts from the engine's acceptance over recent rounds of every request (the
prior, worth `request_weight` tested positions) and follows the request's own rounds, decayed by `request_decay`
per round. It learns from the expected acceptance Σ_i α_i, α_i = Σ_x min(p_i(x), q_i(x)), over the positions a
round tested rather than from the accept draws: both are at hand exactly, same mean, and at T > 0 the draws'
variance is what pushed a request whose α sits just above the break-even below it (the measured T = 1 chat arm
drafted in 56% of its rounds where γ = 1 paid on every one); at T = 0 the two are equal. Probing: a round at γ* = 0
drafts nothing and so learns nothing of α; after `probe_every` such rounds in a row the call drafts one round at
γ = 1, so a request whose draft starts agreeing again (code turning back into prose) gets speculation back. Its
evidence ages meanwhile (α̂ kept, its weight decayed every idle round), so that probe moves α̂ more; a probe that
leaves the request at γ = 0 doubles the wait (8, 16, 32, …, up to `probe_max`), so a request the draft never
knows pays for about 3 probes in 64 tokens while a greedy request whose acceptance dipped resumes after 8.
t_T and t_D are measured on the engine itself
(`StepCosts`, interpolated in rows). Choosing γ from the past keeps decoding lossless: given the prefix (and
every sequence's past), a round's tokens follow the target whatever γ it drafted.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Literal

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


def round_goodput(alphas: list[float], batch: int, gamma: int, costs: StepCosts) -> float:
    """G(γ) = Σ_s E[τ](α̂_s, γ) / cost(B, γ): expected tokens per second of a round over the live sequences'
    acceptances `alphas` on a grid of `batch` rows (finished rows are still computed)."""
    return sum(expected_block_efficiency(a, gamma) for a in alphas) / costs.round(batch, gamma)


def best_round_gamma(alphas: list[float], batch: int, gamma_max: int, costs: StepCosts) -> int:
    """γ* = argmax_{0 ≤ γ ≤ γ_max} G(γ) (ties go to the shorter draft; no live sequence: 0)."""
    if not alphas:
        return 0
    rate = [round_goodput(alphas, batch, g, costs) for g in range(gamma_max + 1)]
    return max(range(gamma_max + 1), key=lambda g: (rate[g], -g))


def best_gamma(alpha: float, batch: int, gamma_max: int, costs: StepCosts) -> int:
    """γ* for `batch` sequences that share one acceptance α: argmax_γ B · E[τ](α, γ) / cost(B, γ)."""
    return best_round_gamma([alpha] * batch, batch, gamma_max, costs)


@dataclass
class AcceptanceEstimate:
    """α̂ = a / (a + r) over recent rounds, counts decayed by `decay` per round, started from a prior
    of `prior` worth `weight` tested positions (so the first rounds do not swing γ).

    a and r may be expected counts: a round that tested positions i = 1 … n (up to its first rejection) adds
    a = Σ_i α_i and r = n − a with α_i = Σ_x min(p_i(x), q_i(x)) the chance the accept test passes at i given the
    prefix (`serve.verification`), instead of the draws 1{accepted}. Same mean, far less variance at T > 0
    (Rao–Blackwell: E[1{accepted} | prefix] = α_i); at T = 0 the two are equal (one-hot p and q)."""

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

    @property
    def evidence(self) -> float:
        """a + r: the tested positions α̂ rests on (decayed)."""
        return self.accepted + self.rejected

    def update(self, accepted: float, rejected: float) -> None:
        """One round's (or one batch round's) accepted draft tokens and rounds ended by a rejection (or their
        expected counts, class docstring)."""
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + rejected

    def age(self) -> None:
        """A round that tested nothing (γ = 0): α̂ is kept, its evidence decays, so the next tested round
        (a probe) weighs more the longer the request went without drafting."""
        self.update(0.0, 0.0)


@dataclass
class GoodputPolicy:
    """The per-round γ of an engine (module docstring): `begin(B)` opens a decoding call's `RequestGoodput`,
    whose `choose` plays `best_round_gamma` on its sequences' own α̂_s and the engine's measured costs.

    estimate: the engine's acceptance over recent rounds of every request, the prior a new request starts
    from (`serve.online` resets it when the draft changes)."""

    costs: StepCosts
    gamma_max: int
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    request_weight: float = 3.0
    request_decay: float = 0.95
    probe_every: int = 8
    probe_max: int = 32
    estimator: Literal["expected", "drawn"] = "expected"  # α̂ from Σ min(p, q) (AcceptanceEstimate) or the draws

    def begin(self, batch: int) -> RequestGoodput:
        """The per-request state of one decoding call over `batch` sequences."""
        return RequestGoodput(self, [AcceptanceEstimate(self.estimate.alpha, self.request_weight,
                                                        self.request_decay) for _ in range(batch)],
                              wait=self.probe_every)


@dataclass
class RequestGoodput:
    """One decoding call: α̂_s per sequence, the run of γ = 0 rounds that triggers a probe, and the probe's
    wait, doubled (up to `probe_max`) after each probe that left the call at γ = 0, reset once it drafts."""

    policy: GoodputPolicy
    estimates: list[AcceptanceEstimate]
    idle: int = 0  # rounds in a row at γ = 0
    wait: int = 8  # γ = 0 rounds before the next probe

    def choose(self, live: list[bool]) -> int:
        """This round's γ: `best_round_gamma` over the live sequences; 1 after `wait` rounds in a row at 0."""
        p = self.policy
        g = best_round_gamma([e.alpha for e, a in zip(self.estimates, live) if a], len(live), p.gamma_max, p.costs)
        if g:
            self.idle, self.wait = 0, p.probe_every
            return g
        self.idle += 1
        if self.idle >= self.wait and any(live):
            self.idle, self.wait = 0, min(2 * self.wait, p.probe_max)
            return 1
        for e, a in zip(self.estimates, live):
            if a:
                e.age()
        return 0

    def observe(self, outcomes: dict[int, tuple[int, int]],
                expected: dict[int, tuple[float, float]] | None = None) -> None:
        """A drafted round's (accepted, rejected) per sequence s (`serve.acceptance.round_outcome`) and, when the
        engine has them, their expected counts (Σ α_i, n − Σ α_i over the same tested positions): each sequence's
        α̂_s and the engine's prior learn from the expected counts unless `policy.estimator` is "drawn"."""
        if expected is not None and self.policy.estimator == "expected":
            outcomes = expected
        for s, (acc, rej) in outcomes.items():
            self.estimates[s].update(acc, rej)
        self.policy.estimate.update(sum(a for a, _ in outcomes.values()), sum(r for _, r in outcomes.values()))
