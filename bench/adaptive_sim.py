"""The per-request γ policy (`serve.goodput`) against fixed γ in simulation: no models, no clock.

Cost model, in target steps: a round at γ costs `StepCosts.round(1, γ)` (default: make run's fp32 target on the
2-core EPYC as the T = 0 eval measured it, a pass over 2 tokens 1.06 steps, over 4 tokens 1.48, a draft step 0.08;
--costs reads the `step_costs` of an eval JSON's adaptive arm or of a traces file) plus --overhead per round (Python,
sampling: every round pays it, target-only steps too); a round that drafts after m rounds at γ = 0 pays its first
draft step (1 + --catchup · m) times over (the draft's cache catches up on the m tokens it skipped). Speedup =
tokens / cost against target-only decoding, which costs 1 + overhead per token.

Acceptance, two sources:
* i.i.d. (default): every position's α_j is drawn from Beta(κα, κ(1 − α)) (--kappa κ; 0: α_j ∈ {0, 1}, greedy-like)
  and the drafted token there is accepted with probability α_j; --tokens per request, --seeds requests per α.
* --traces FILE (`bench/acceptance_traces.py`): the recorded α_j along the target's own continuations, per
  temperature, task and prompt; the requests run in the eval's order (task after task, the policy's engine prior
  carried over, as in `draftalign eval`'s adaptive arm), --seeds times at T > 0 (at T = 0 the replay is exact).

A policy arm observes what the engine gives it: the expected counts Σ α_j over the positions tested
(`serve.goodput.AcceptanceEstimate`), or with `legacy` the previous policy (counted outcomes, no aging of an idle
request's evidence, a probe every 16 rounds at γ = 0, prior worth 4 outcomes). Prints each arm's speedup.

    .venv/bin/python bench/adaptive_sim.py
    .venv/bin/python bench/adaptive_sim.py --traces bench/results/sampling/traces.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.goodput import GoodputPolicy, RequestGoodput, StepCosts, best_round_gamma  # noqa: E402

EPYC_FP32 = StepCosts(target={1: 1.0, 2: 1.056, 3: 1.484, 4: 1.484}, draft={1: 0.078})


class LegacyRequest(RequestGoodput):
    """The policy as measured in docs/results/sampling.md: a probe after every `probe_every` rounds at γ = 0, an
    idle request's estimate untouched (its caller feeds it counted outcomes and a prior worth 4)."""

    def choose(self, live: list[bool]) -> int:
        p = self.policy
        g = best_round_gamma([e.alpha for e, a in zip(self.estimates, live) if a], len(live), p.gamma_max, p.costs)
        self.idle = self.idle + 1 if g == 0 else 0
        if g == 0 and self.idle >= p.probe_every:
            self.idle = 0
            return 1
        return g


class LegacyPolicy(GoodputPolicy):
    def begin(self, batch: int) -> RequestGoodput:
        call = super().begin(batch)
        return LegacyRequest(self, call.estimates, wait=self.probe_every)


def new_policy(arm: str, costs: StepCosts, gamma_max: int, knobs: dict) -> GoodputPolicy:
    if arm == "legacy":
        return LegacyPolicy(costs, gamma_max, request_weight=4.0, request_decay=0.95, probe_every=16)
    return GoodputPolicy(costs, gamma_max, **knobs)


def request(alphas, rng: random.Random, gamma, policy: GoodputPolicy | None, costs: StepCosts, overhead: float,
            catchup: float, soft: bool) -> tuple[int, float]:
    """(tokens, cost) of one request whose position j is accepted with probability alphas[j] (a list, or a
    callable j → α_j): fixed `gamma`, or `policy` when gamma is None."""
    at = alphas if callable(alphas) else (lambda j: alphas[j])
    n = None if callable(alphas) else len(alphas)
    call = policy.begin(1) if gamma is None else None
    done, cost, idle = 0, 0.0, 0
    while n is None or done < n:
        if n is None and done >= TOKENS:
            break
        g = call.choose([True]) if call else gamma
        if n is not None:
            g = min(g, n - done - 1)  # the last token: a plain step
        k, tested, expected = 0, 0, 0.0
        while k < g:
            a = at(done + k)
            tested, expected = tested + 1, expected + a
            if rng.random() >= a:
                break
            k += 1
        cost += costs.round(1, g) + overhead + (g > 0) * catchup * idle * costs.draft_step(1)
        idle = 0 if g else idle + 1
        done += k + 1
        if call and g:
            call.observe({0: (expected, tested - expected) if soft else (k, tested - k)})
    return done, cost


TOKENS = 64


def beta_stream(alpha: float, kappa: float, rng: random.Random):
    """j → α_j ~ Beta(κα, κ(1 − α)) (κ = 0: Bernoulli(α)), memoized per position."""
    seen: dict[int, float] = {}

    def at(j: int) -> float:
        if j not in seen:
            if kappa <= 0 or alpha in (0.0, 1.0):
                seen[j] = float(rng.random() < alpha)
            else:
                seen[j] = rng.betavariate(kappa * alpha, kappa * (1 - alpha))
        return seen[j]
    return at


def main(argv: list[str] | None = None) -> int:
    global TOKENS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=Path, help="replay bench/acceptance_traces.py's recorded α_j")
    ap.add_argument("--costs", type=Path, help="a JSON with step_costs (a traces file, or an eval's adaptive arm)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--kappa", type=float, default=2.0, help="i.i.d. mode: α_j ~ Beta(κα, κ(1 − α)); 0: 0/1")
    ap.add_argument("--overhead", type=float, default=0.0, help="per-round cost outside the passes, in steps")
    ap.add_argument("--catchup", type=float, default=0.1, help="draft catch-up per skipped token, in draft steps")
    ap.add_argument("--gamma-max", type=int, default=3)
    ap.add_argument("--decay", type=float, default=GoodputPolicy.request_decay)
    ap.add_argument("--weight", type=float, default=GoodputPolicy.request_weight)
    ap.add_argument("--probe-every", type=int, default=GoodputPolicy.probe_every)
    ap.add_argument("--probe-max", type=int, default=GoodputPolicy.probe_max)
    args = ap.parse_args(argv)
    TOKENS = args.tokens
    costs = EPYC_FP32
    if args.costs:
        raw = json.loads(args.costs.read_text())
        raw = raw.get("step_costs") or raw["by_gamma"]["adaptive"]["step_costs"]
        t1 = raw["target"]["1"]
        costs = StepCosts(target={int(k): v / t1 for k, v in raw["target"].items()},
                          draft={int(k): v / t1 for k, v in raw["draft"].items()})
    knobs = {"request_decay": args.decay, "request_weight": args.weight, "probe_every": args.probe_every,
             "probe_max": args.probe_max}
    arms = {"γ = 1": 1, "γ = 2": 2, "γ = 3": 3, "legacy": None, "adaptive": None}
    sim = dict(costs=costs, overhead=args.overhead, catchup=args.catchup)
    print("costs: t_T " + ", ".join(f"{r}: {t:.3f}" for r, t in costs.target.items()) +
          f"; t_D {costs.draft[1]:.3f}; overhead {args.overhead}, catch-up {args.catchup}")
    if not args.traces:
        print(f"{'α':>5} " + " ".join(f"{a:>9}" for a in arms))
        for alpha in (0.0, 0.02, 0.1, 0.15, 0.2, 0.25, 0.3, 0.45, 0.6, 0.8):
            row = []
            for arm, g in arms.items():
                tok = cost = 0.0
                for s in range(args.seeds):
                    rng = random.Random(s)
                    policy = new_policy(arm, costs, args.gamma_max, knobs) if g is None else None
                    t, c = request(beta_stream(alpha, args.kappa, rng), rng, g, policy, soft=arm != "legacy", **sim)
                    tok, cost = tok + t, cost + c
                row.append(tok / cost * (1 + args.overhead))
            print(f"{alpha:>5} " + " ".join(f"{m:>8.3f}×" for m in row))
        return 0
    data = json.loads(args.traces.read_text())
    print(f"{'T':>4} {'task':<10} {'mean α_j':>8} " + " ".join(f"{a:>9}" for a in arms))
    for temp, tasks in data["temperatures"].items():
        seeds = 1 if float(temp) == 0 else args.seeds
        totals = {task: {arm: [0.0, 0.0] for arm in arms} for task in tasks}
        for s in range(seeds):
            for arm, g in arms.items():
                policy = new_policy(arm, costs, args.gamma_max, knobs) if g is None else None  # one per eval
                rng = random.Random(s)
                for task, prompts in tasks.items():
                    for tr in prompts:
                        t, c = request(tr, rng, g, policy, soft=arm != "legacy", **sim)
                        totals[task][arm][0] += t
                        totals[task][arm][1] += c
        for task, by_arm in totals.items():
            a = [x for tr in tasks[task] for x in tr]
            print(f"{temp:>4} {task:<10} {sum(a) / len(a):>8.3f} " + " ".join(
                f"{t / c * (1 + args.overhead):>8.3f}×" for t, c in by_arm.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
