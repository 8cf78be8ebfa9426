"""Ablation: which distillation loss makes the best drafter?

Every arm distills the *same* starting draft (a job's `<run_dir>/draft_pretrained/`, or --draft)
on the same distillation set with the same learner settings and the same token budget, then is
evaluated with `draftalign.evaluate.run_eval` (speculative decoding against the target). Arms:
FKL, RKL, JSD, TVD, TVD++ with its three baseline scopes (position / batch / EMA), plus `start`,
the undistilled draft, as the reference row.

    python bench/ablation.py cluster/jobs/local.yaml --quick --out bench/results/ablation_quick.json

Each arm runs in `<run_dir>/ablation/<arm>/` (the job's distillation set is linked in); an arm
whose eval JSON exists is reused with --resume, so an interrupted ablation continues. Prints a table
of block efficiency per task and γ (plus held-out acceptance and trained tokens) and writes JSON.
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

ARMS: dict[str, dict] = {
    "start": {},  # the undistilled draft: what distillation has to beat
    "fkl": {"loss": "fkl"},
    "rkl": {"loss": "rkl"},
    "jsd": {"loss": "jsd"},
    "tvd": {"loss": "tvd"},
    "tvd_pp": {"loss": "tvd_pp", "baseline": "position"},
    "tvd_pp_batch": {"loss": "tvd_pp", "baseline": "batch"},
    "tvd_pp_ema": {"loss": "tvd_pp", "baseline": "ema"},
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
        setattr(cfg.distill, k, v)
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
            out.setdefault(task, {})[str(g)] = {k: row.get(k) for k in
                                                ("block_efficiency", "acceptance_rate", "speedup")}
    return out


def format_table(arms: dict) -> str:
    cols = sorted({(t, g) for a in arms.values() for t, gs in a["eval"].items() for g in gs})
    head = ["arm", *[f"{t} γ={g}" for t, g in cols], "held-out α", "tokens"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, a in arms.items():
        cells = [name]
        for t, g in cols:
            v = a["eval"].get(t, {}).get(g, {}).get("block_efficiency")
            cells.append("-" if v is None else f"{v:.3f}")
        ha = a.get("distill", {}).get("heldout_acceptance")
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
    ap.add_argument("--resume", action="store_true", help="reuse arms whose eval JSON already exists")
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
    t0 = time.time()
    for arm in arms:
        cfg = _arm_cfg(base, arm, ARMS[arm], draft, root)
        arm_dir = Path(cfg.run_dir)
        ev_path = arm_dir / "eval.json"
        entry: dict = {"distill_config": cfg.distill.model_dump()}
        if args.resume and ev_path.is_file():
            print(f"[ablation] {arm}: reusing {ev_path}", flush=True)
            ev = json.loads(ev_path.read_text())
        else:
            t_arm = time.time()
            path = draft
            if arm != "start":
                _link_distill_set(src_run, arm_dir)
                path = run_distill(cfg, token_budget=budget)
            arm_dir.mkdir(parents=True, exist_ok=True)
            ev = run_eval(cfg, draft=str(path), out=ev_path)
            entry["wall_s"] = round(time.time() - t_arm, 1)
        done = arm_dir / "distill_done.json"
        if arm != "start" and done.is_file():
            entry["distill"] = json.loads(done.read_text())
        entry["eval"] = _eval_rows(ev)
        entry["eval_overall"] = ev.get("overall")
        results[arm] = entry
    out = {"job": str(args.job), "draft": str(draft), "quick": args.quick, "token_budget": budget,
           "learner_max_steps": base.learner.max_steps, "on_policy_fraction": base.rollout.on_policy_fraction,
           "form": base.distill.form, "eval": base.eval.model_dump(), "wall_s": round(time.time() - t0, 1),
           "arms": results}
    table = format_table(results)
    out["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.out)
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
