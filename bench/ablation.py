"""Ablation: which distillation loss makes the best drafter?

Every arm distills the *same* starting draft (a job's `<run_dir>/draft_pretrained/`, or --draft)
on the same distillation set with the same learner settings and the same token budget; then all arms
are evaluated in ONE interleaved `draftalign.evaluate.run_eval` per decoding temperature (--temperatures,
default greedy and T = 1: greedy acceptance is argmax agreement, sampled acceptance is 1 − TVD, and the
best loss can differ between them). Arms:
FKL, RKL, JSD, TVD, TVD++ with its three baseline scopes (position / batch / EMA), plus `start`,
the undistilled draft, as the reference row; `fkl_branch` / `tvd_pp_branch` add on-policy rollouts (half of each
batch: short draft branches after prefixes of target answers, scored by a vLLM target — issue #13's "on-policy
where it matters"), compared by τ and by each arm's wall time (acceptance per CPU-minute).
An arm's spec sets distill.* fields by bare name and any other section by a dotted path.

    python bench/ablation.py cluster/jobs/local.yaml --quick --out bench/results/ablation_quick.json

Each arm runs in `<run_dir>/ablation/<arm>/` (the job's distillation set is linked in); with
--resume an arm whose distilled draft exists is not retrained, and a temperature whose eval JSONs all exist is
not re-evaluated, so an interrupted ablation continues. Prints a table
of block efficiency per task and γ — each arm with its paired Δτ to the column's best arm (same prompts, 95%
interval) — plus held-out acceptance and trained tokens, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402

ARMS: dict[str, dict] = {
    "start": {},  # the undistilled draft: what distillation has to beat
    "fkl": {"loss": "fkl"},
    "rkl": {"loss": "rkl"},
    "jsd": {"loss": "jsd"},
    "tvd": {"loss": "tvd"},
    "tvd_pp": {"loss": "tvd_pp", "baseline": "position"},
    "tvd_pp_batch": {"loss": "tvd_pp", "baseline": "batch"},
    "tvd_pp_ema": {"loss": "tvd_pp", "baseline": "ema"},
    "fkl_branch": {"loss": "fkl", "rollout.on_policy_fraction": 0.5, "rollout.on_policy_mode": "branch"},
    "tvd_pp_branch": {"loss": "tvd_pp", "rollout.on_policy_fraction": 0.5, "rollout.on_policy_mode": "branch"},
}
QUICK = ["learner.max_steps=12", "learner.checkpoint_every=1000", "learner.sync_every=2",
         "rollout.max_new_tokens=24", "rollout.batch_size=4", "eval.prompts_per_task=3",
         "eval.max_new_tokens=24", "eval.tasks=[chat,code]", "eval.gamma=[3]"]


def _arm_cfg(base, arm: str, spec: dict, draft: Path, root: Path):
    cfg = base.model_copy(deep=True)
    cfg.name = f"{base.name}-ablation-{arm}"
    cfg.run_dir = str(root / arm)
    cfg.draft.model = str(draft)
    for k, v in spec.items():
        section, _, field = k.rpartition(".")
        setattr(cfg.distill if not section else getattr(cfg, section), field, v)
    return cfg


def _link_distill_set(src_run: Path, arm_dir: Path) -> None:
    src = src_run / "distill_set"
    if not src.is_dir():
        raise SystemExit(f"no distillation set at {src}: run `draftalign generate` for this job first")
    arm_dir.mkdir(parents=True, exist_ok=True)
    dst = arm_dir / "distill_set"
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def _eval_rows(ev: dict) -> dict[str, dict[str, dict]]:
    """{task: {γ: {block_efficiency, acceptance_rate}}} from a run_eval result."""
    out: dict[str, dict[str, dict]] = {}
    by_gamma = ev.get("by_gamma") or {str(ev.get("gamma")): {"tasks": ev.get("tasks", {})}}
    for g, block in by_gamma.items():
        for task, row in block.get("tasks", {}).items():
            cell = {k: row.get(k) for k in ("block_efficiency", "acceptance_rate", "speedup")}
            # paired Δτ (this − other arm, same prompts) with its 95% interval, keyed by the other arm's name
            cell["paired_tau"] = {other.rsplit("@", 1)[0]: by_task[task]["block_efficiency"]
                                  for other, by_task in block.get("paired", {}).items() if task in by_task}
            out.setdefault(task, {})[str(g)] = cell
    return out


def format_table(arms: dict) -> str:
    cols = sorted({(m, t, g) for a in arms.values() for m, ts in a["eval"].items() for t, gs in ts.items()
                   for g in gs})
    head = ["arm", *[f"{m} {t} τ (γ={g})" for m, t, g in cols], "held-out greedy α", "held-out 1 − TVD", "tokens"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    cell = lambda a, m, t, g: a["eval"].get(m, {}).get(t, {}).get(g, {})
    best = {c: max(arms, key=lambda n: cell(arms[n], *c).get("block_efficiency") or 0.0) for c in cols}
    for name, a in arms.items():
        cells = [name]
        for c in cols:
            v, d = cell(a, *c).get("block_efficiency"), cell(a, *c).get("paired_tau", {}).get(best[c])
            cells.append("-" if v is None else f"**{v:.3f}**" if name == best[c] else f"{v:.3f}" if not d else
                         f"{v:.3f} (Δ {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])")
        for key in ("heldout_greedy_acceptance", "heldout_acceptance"):
            ha = a.get("distill", {}).get(key)
            cells.append("-" if ha is None else f"{ha:.3f}")
        cells.append(str(a.get("distill", {}).get("trained_tokens", "-")))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", nargs="?", default="cluster/jobs/local.yaml", help="job YAML")
    ap.add_argument("--draft", help="starting draft (default <run_dir>/draft_pretrained of the job)")
    ap.add_argument("--quick", action="store_true", help="few steps, few eval prompts (a smoke run)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--token-budget", type=int, default=None,
                    help="stop each arm after this many trained response tokens (default: learner.max_steps "
                         "× rollout.batch_size × rollout.max_new_tokens / 2)")
    ap.add_argument("--resume", action="store_true", help="reuse finished arms and finished temperatures' evals")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="eval temperatures")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--out", type=Path, required=True, help="write the ablation JSON here")
    args = ap.parse_args(argv)

    from draftalign.evaluate import run_eval
    from learner.distill import run_distill

    overrides = (QUICK if args.quick else []) + args.overrides
    base = load_config(args.job if Path(args.job).exists() else None, overrides)
    src_run = base.run_path.resolve()
    draft = Path(args.draft or src_run / "draft_pretrained").expanduser().resolve()
    if not (draft / "config.json").is_file():
        raise SystemExit(f"starting draft {draft} not found: run `draftalign pretrain` or pass --draft")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    budget = args.token_budget or (base.learner.max_steps * base.rollout.batch_size
                                   * base.rollout.max_new_tokens // 2)
    root = src_run / "ablation"
    results: dict[str, dict] = {}
    paths: dict[str, str] = {}
    t0 = time.time()
    for arm in arms:
        cfg = _arm_cfg(base, arm, ARMS[arm], draft, root)
        arm_dir = Path(cfg.run_dir)
        entry: dict = {"distill_config": cfg.distill.model_dump(),
                       "rollout": {k: v for k, v in cfg.rollout.model_dump().items() if k.startswith("on_policy")}}
        path = draft
        if arm != "start":
            _link_distill_set(src_run, arm_dir)
            done = arm_dir / "distill_done.json"
            if args.resume and done.is_file():
                print(f"[ablation] {arm}: reusing {arm_dir / 'draft_distilled'}", flush=True)
                path = arm_dir / "draft_distilled"
            else:
                t_arm = time.time()
                path = run_distill(cfg, token_budget=budget)
                entry["wall_s"] = round(time.time() - t_arm, 1)
            entry["distill"] = json.loads(done.read_text())
        paths[arm] = str(path)
        results[arm] = entry
    import ray

    if ray.is_initialized():
        ray.shutdown()  # no idle Ray workers on the cores the eval times
    for temp in args.temperatures:
        cfg = base.model_copy(deep=True)
        cfg.eval.temperature = temp
        outs = {a: root / a / f"eval_T{temp:g}.json" for a in arms}
        if args.resume and all(o.is_file() for o in outs.values()):
            print(f"[ablation] T={temp:g}: reusing {len(outs)} eval JSONs", flush=True)
            evals = {a: json.loads(o.read_text()) for a, o in outs.items()}
        else:  # one interleaved run: arms compared on the same machine state
            evals = run_eval(cfg, paths, out=outs)
        for arm, ev in evals.items():
            results[arm].setdefault("eval", {})[f"T={temp:g}"] = _eval_rows(ev)
            results[arm].setdefault("eval_overall", {})[f"T={temp:g}"] = ev.get("overall")
    out = {"job": str(args.job), "draft": str(draft), "quick": args.quick, "token_budget": budget,
           "learner_max_steps": base.learner.max_steps, "on_policy_fraction": base.rollout.on_policy_fraction,
           "form": base.distill.form, "eval": base.eval.model_dump(), "wall_s": round(time.time() - t0, 1),
           "arms": results}
    table = format_table(results)
    out["table"] = table
    write_json_atomic(args.out, out)
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
