"""The per-request γ policy (`serve.goodput`) against fixed γ in simulation: no models, no clock.

A request of --tokens tokens whose draft is accepted i.i.d. with probability α, on a cost model in target steps
(default: make run's fp32 target on the 2-core EPYC, a pass over γ + 1 tokens ≈ 1 + 0.13γ steps, a draft step
0.11); each round costs `StepCosts.round(1, γ)` and emits k + 1 tokens. Prints the mean speedup over --seeds
requests for fixed γ = 1, 2, 3 and the policy (the request's α̂ from a 0.5 prior) at each α: what the policy's
estimator and probing cost against knowing α, before any measurement. Knobs of the policy: --decay, --weight,
--probe-every.

    .venv/bin/python bench/adaptive_sim.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.goodput import GoodputPolicy, StepCosts  # noqa: E402

EPYC_FP32 = StepCosts(target={1: 1.0, 2: 1.13, 3: 1.27, 4: 1.4}, draft={1: 0.11})


def speedup(alpha: float, tokens: int, rng: random.Random, gamma: int | None, policy: dict) -> float:
    """Tokens per target-step-equivalent of one request: fixed `gamma`, or the policy when gamma is None."""
    call = GoodputPolicy(EPYC_FP32, 3, **policy).begin(1) if gamma is None else None
    done, cost = 0, 0.0
    while done < tokens:
        g = call.choose([True]) if call else gamma
        k = 0
        while k < g and rng.random() < alpha:
            k += 1
        done, cost = done + k + 1, cost + EPYC_FP32.round(1, g)
        if call and g:
            call.observe({0: (k, int(k < g))})
    return done / cost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--decay", type=float, default=GoodputPolicy.request_decay)
    ap.add_argument("--weight", type=float, default=GoodputPolicy.request_weight)
    ap.add_argument("--probe-every", type=int, default=GoodputPolicy.probe_every)
    args = ap.parse_args(argv)
    policy = {"request_decay": args.decay, "request_weight": args.weight, "probe_every": args.probe_every}
    arms = {"γ = 1": 1, "γ = 2": 2, "γ = 3": 3, "adaptive": None}
    print(f"{'α':>5} " + " ".join(f"{a:>9}" for a in arms))
    for alpha in (0.02, 0.1, 0.3, 0.45, 0.6, 0.8):
        means = [sum(speedup(alpha, args.tokens, random.Random(s), g, policy) for s in range(args.seeds)) / args.seeds
                 for g in arms.values()]
        print(f"{alpha:>5} " + " ".join(f"{m:>8.3f}×" for m in means))
    return 0


if __name__ == "__main__":
    sys.exit(main())
