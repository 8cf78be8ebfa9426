"""Adaptive γ against fixed γ, greedy and sampled (issue #35): per task, make run's draft decoded with γ = 1, γ = 3
and the served per-request policy (`adaptive`, γ ≤ 3 chosen every round from the request's own acceptance and
the step costs measured in the eval, `serve.goodput`), at T = 0, 0.7 and 1 (top-p 1).

For each temperature one `draftalign eval` (`draftalign.evaluate.run_eval`): target-only decoding and the three
arms interleaved per prompt, chat / code / summarize, held-out prompts; the temperatures run one after the other
in this process (each speedup's numerator and denominator come from the same eval). Writes, under --out:

    eval_t0.json, eval_t0.7.json, eval_t1.json   the eval schema (`temperature`, by_gamma: "1", "3", "adaptive",
                                                 paired Δ adaptive − fixed over the same prompts)
    adaptive.json                                the table: per T, task and arm — α, τ, γ̄, speedup [95% CI]

and prints the table (`python -m bench.summary` renders it into docs/results/sampling.md). After `make run`:

    .venv/bin/python bench/adaptive.py --draft runs/local/draft_distilled --out bench/results/sampling
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from draftalign.config import ADAPTIVE, load_config  # noqa: E402
from draftalign.evaluate import machine, run_eval  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402


def tag(t: float) -> str:
    return f"t{t:g}"


def table_rows(evals: dict[float, dict]) -> list[dict]:
    """One row per (T, task, arm) from the eval JSONs: the figures the summary table shows."""
    rows = []
    for t, ev in evals.items():
        for arm, block in ev["by_gamma"].items():
            for task, r in [*block["tasks"].items(), ("overall", block["overall"])]:
                ci = r.get("ci95", {})
                paired = {other.rsplit("@", 1)[1]: p[task]["speedup"] for other, p in block.get("paired", {}).items()
                          if arm == ADAPTIVE and task in p}
                rows.append({"temperature": t, "task": task, "arm": arm, "n_prompts": r["n_prompts"],
                             "acceptance_rate": r["acceptance_rate"], "block_efficiency": r["block_efficiency"],
                             "block_efficiency_ci95": ci.get("block_efficiency"), "mean_gamma": r["mean_gamma"],
                             "speedup": r["speedup"], "speedup_ci95": ci.get("speedup"),
                             "paired_speedup_vs_fixed": paired})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--draft", default="runs/local/draft_distilled", help="the draft to decode with")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sampling")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7, 1.0])
    ap.add_argument("--gammas", type=int, nargs="+", default=[1, 3], help="the fixed-γ arms")
    ap.add_argument("--gamma-max", type=int, default=3, help="the adaptive arm's largest γ")
    ap.add_argument("--tasks", default="chat,code,summarize")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per task (≥ 8 for the issue's goals)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more job overrides (key=value)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gammas = [ADAPTIVE, *args.gammas]
    evals = {}
    for t in args.temperatures:
        cfg = load_config(args.job, [f"eval.tasks=[{args.tasks}]", f"eval.prompts_per_task={args.prompts}",
                                     f"eval.max_new_tokens={args.max_new_tokens}", f"eval.temperature={t}",
                                     "eval.top_p=1.0", "eval.top_k=0", f"eval.gamma=[{', '.join(map(str, gammas))}]",
                                     f"eval.gamma_max={args.gamma_max}", "eval.trees=[]", *args.overrides])
        print(f"== T = {t:g}", flush=True)
        evals[t] = run_eval(cfg, {"draft": args.draft}, out=args.out / f"eval_{tag(t)}.json")["draft"]
    rows = table_rows(evals)
    write_json_atomic(args.out / "adaptive.json", {
        "draft": args.draft, "job": args.job, "gammas": gammas, "gamma_max": args.gamma_max,
        "prompts_per_task": args.prompts, "max_new_tokens": args.max_new_tokens,
        "evals": {tag(t): f"eval_{tag(t)}.json" for t in evals}, "machine": machine(), "rows": rows})
    print(f"\n{'T':>4} {'task':<10} {'arm':<9} {'n':>3} {'α':>6} {'τ':>5} {'γ̄':>5} {'speedup':>8}")
    for r in rows:
        print(f"{r['temperature']:>4g} {r['task']:<10} {r['arm']:<9} {r['n_prompts']:>3} {r['acceptance_rate']:>6.3f} "
              f"{r['block_efficiency']:>5.2f} {r['mean_gamma']:>5.2f} {r['speedup']:>7.2f}x")
    print(f"wrote {args.out / 'adaptive.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
