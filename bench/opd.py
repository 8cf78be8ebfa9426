"""Target-assisted on-policy distillation vs replay, at equal time (issue #38 item 4).

Arms, all from the same stage-1 draft (the job's `<run_dir>/draft_pretrained/`) on the same distillation set:

    replay_fkl   today's default: replay the set's stored top-k, FKL (rollout.on_policy_fraction 0)
    opd_tvd_pp   target-assisted rollouts (rollout.on_policy_mode target_assisted), sampled TVD++ (reward = acceptance
                 of each drafted token, 1{p > q}), with --replay-fraction of the rows replayed from the set
    opd_fkl      the same rollouts, FKL on the same states
    opd_fkl_greedy  greedy target-assisted rollouts (rollout.temperature 0): on a greedy set their rounds are the
                 stored answers' (no engine call), so the states they add are the re-drafts from rejection points

Equal time: every arm's stage 3 stops after --minutes of learner step time (`run_distill(time_budget_s=…)`: the
training loop's wall time, queue waits included, engine and trainer start-up excluded), on this one machine. The
arms are interleaved: the budget is cut into --segments equal parts and the arms take turns segment by segment
(each segment resumes the arm's checkpoint), so a change in machine load hits every arm alike; after each segment
the arm's draft is kept as a snapshot (τ against stage-3 steps).

Eval: the final drafts in ONE interleaved `run_eval` per temperature (--temperatures, default greedy and T = 1) on
the job's tasks (chat, code, summarize), with paired Δτ (same prompts, 95% bootstrap interval) for
opd_tvd_pp − replay_fkl, opd_fkl − replay_fkl, opd_tvd_pp − opd_fkl and opd_fkl_greedy − replay_fkl; the
snapshots (and the stage-1 draft as step 0) in one more interleaved eval on --curve-task at greedy, for the plot
of τ against stage-3 steps.

Writes `<out>/compare.json` — {"paired": [{"a", "b", "budget", "temperature", "task", "dtau", "dtau_ci"}],
"budgets": {budget: {arms, curve, …}}, …}; rows of another --budget already in the file are kept — and
`<out>/tau_vs_steps_<budget>.png`. Smoke run: `--quick`. Commands for the two budgets: docs/results/ablations.md.
`learner.max_steps` stays the job's (the LR schedule's horizon): an arm that reaches it before its time stops there;
`--set learner.max_steps=N` lets the time bind. `--scaling`: item 3's throughput check instead (`scaling`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ablation import _link_distill_set  # noqa: E402  (one home for the arms' shared set)
from draftalign.config import load_config  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402

ARMS: dict[str, dict] = {
    "replay_fkl": {"distill.loss": "fkl", "distill.form": "exact", "rollout.on_policy_fraction": 0.0},
    "opd_tvd_pp": {"distill.loss": "tvd_pp", "distill.form": "sampled", "rollout.on_policy_mode": "target_assisted"},
    "opd_fkl": {"distill.loss": "fkl", "distill.form": "exact", "rollout.on_policy_mode": "target_assisted"},
    # greedy rounds on the greedy set: read off the stored answers, only the re-drafts scored by the engine
    "opd_fkl_greedy": {"distill.loss": "fkl", "distill.form": "exact", "rollout.on_policy_mode": "target_assisted",
                       "rollout.temperature": 0.0},
}
PAIRS = [("opd_tvd_pp", "replay_fkl"), ("opd_fkl", "replay_fkl"), ("opd_tvd_pp", "opd_fkl"),
         ("opd_fkl_greedy", "replay_fkl")]
QUICK = ["learner.checkpoint_every=1000", "learner.sync_every=2", "rollout.max_new_tokens=16",
         "rollout.batch_size=4", "eval.prompts_per_task=2", "eval.max_new_tokens=16", "eval.gamma=[3]"]


def arm_config(base, arm: str, draft: Path, root: Path, replay_fraction: float):
    """The job with the arm's settings, its own run dir under `root` and the common starting draft."""
    cfg = base.model_copy(deep=True)
    cfg.name = f"{base.name}-opd-{arm}"
    cfg.run_dir = str(root / arm)
    cfg.draft.model = str(draft)
    spec = dict(ARMS[arm])
    if spec.get("rollout.on_policy_mode") == "target_assisted":
        spec["rollout.on_policy_fraction"] = 1.0 - replay_fraction
        if base.target.block_size is None:  # each round re-prefills < 32 tokens past its cached prefix
            spec["target.block_size"] = 32
    for key, value in spec.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


def train_interleaved(cfgs: dict, minutes: float, segments: int, say=print) -> dict:
    """Every arm's stage 3 in turns of minutes / segments; returns {arm: {"segments": [...], "wall_s"}}, each
    segment {"step", "stage_s", "snapshot", heldout…} (the arm's draft copied after it)."""
    from learner.distill import run_distill

    out = {arm: {"segments": [], "wall_s": 0.0} for arm in cfgs}
    for i in range(1, segments + 1):
        for arm, cfg in cfgs.items():
            t0 = time.time()
            final = run_distill(cfg, resume=i > 1, time_budget_s=60.0 * minutes * i / segments)
            out[arm]["wall_s"] += time.time() - t0
            done = json.loads((cfg.run_path / "distill_done.json").read_text())
            snap = cfg.run_path / f"snapshot_{i}"
            if snap.exists():
                shutil.rmtree(snap)
            shutil.copytree(final, snap)
            seg = {"segment": i, "step": done["steps"], "snapshot": str(snap),
                   **{k: done.get(k) for k in ("heldout_acceptance", "heldout_greedy_acceptance", "trained_tokens",
                                               "bottleneck", "rollout_tokens_per_s_per_actor",
                                               "target_tokens_per_s_per_engine")}}
            out[arm]["segments"].append(seg)
            say(f"[opd] {arm} segment {i}/{segments}: step {seg['step']}, held-out greedy α "
                f"{seg['heldout_greedy_acceptance']}, bottleneck {seg['bottleneck']}")
    return out


def paired_rows(evals: dict, budget: str, temperature: float, gamma: int) -> list[dict]:
    """compare.json's rows: Δτ = τ(a) − τ(b) on the same prompts with its 95% interval, per task and overall."""
    rows = []
    for a, b in PAIRS:
        if a not in evals or b not in evals:
            continue
        block = evals[a]["by_gamma"][str(gamma)]
        paired = block.get("paired", {}).get(f"{b}@{gamma}", {})
        for task, d in paired.items():
            be = d["block_efficiency"]
            rows.append({"a": a, "b": b, "budget": budget, "temperature": temperature, "task": task,
                         "dtau": round(be["delta"], 4), "dtau_ci": [round(x, 4) for x in be["ci95"] or []]})
    return rows


def tau_cells(ev: dict, gamma: int) -> dict:
    """{task: {"tau", "tau_ci"}} of one eval JSON at γ (overall included)."""
    block = ev["by_gamma"][str(gamma)]
    cells = {t: {"tau": round(r["block_efficiency"], 4), "tau_ci": r.get("ci95", {}).get("block_efficiency")}
             for t, r in block["tasks"].items()}
    o = block.get("overall") or {}
    if "block_efficiency" in o:
        cells["overall"] = {"tau": round(o["block_efficiency"], 4), "tau_ci": o.get("ci95", {}).get("block_efficiency")}
    return cells


def plot_curve(curve: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, pts in curve.items():
        steps, tau = [p["step"] for p in pts], [p["tau"] for p in pts]
        lo = [p["tau_ci"][0] if p["tau_ci"] else p["tau"] for p in pts]
        hi = [p["tau_ci"][1] if p["tau_ci"] else p["tau"] for p in pts]
        ax.plot(steps, tau, marker="o", label=arm)
        ax.fill_between(steps, lo, hi, alpha=0.15)
    ax.set_xlabel("stage-3 learner steps")
    ax.set_ylabel("τ (block efficiency)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling(base, draft: Path, root: Path, minutes: float, replay_fraction: float, out: Path) -> dict:
    """Item 3's scaling check: the opd_tvd_pp arm for `minutes` of learner time at (rollout actors, target engines)
    = (1, 1), (2, 1), (1, 2), learner unchanged: rollout tokens/s per actor, target tokens/s per engine and the
    bottleneck of each, written to `<out>/scaling.json`. One more actor (or engine) raises throughput only where
    there is hardware for it and that role, not the learner, was the bottleneck."""
    from learner.distill import run_distill

    runs = {}
    for actors, engines in ((1, 1), (2, 1), (1, 2)):
        cfg = arm_config(base, "opd_tvd_pp", draft, root / f"scaling_a{actors}_e{engines}", replay_fraction)
        cfg.name = f"{cfg.name}-a{actors}-e{engines}"
        cfg.rollout.num_actors, cfg.target.num_engines = actors, engines
        _link_distill_set(base.run_path.resolve(), cfg.run_path)
        run_distill(cfg, time_budget_s=60.0 * minutes)
        d = json.loads((cfg.run_path / "distill_done.json").read_text())
        runs[f"actors={actors},engines={engines}"] = {
            k: d.get(k) for k in ("steps", "trained_tokens", "rollout_tokens_per_s_per_actor",
                                  "target_tokens_per_s_per_engine", "target_busy_frac_per_engine",
                                  "target_tokens_scored_for_rollouts", "rollout_time_split", "bottleneck",
                                  "bottleneck_shares", "scaling")}
        print(f"[opd] scaling {actors} actor(s), {engines} engine(s): {runs[list(runs)[-1]]}", flush=True)
    write_json_atomic(out / "scaling.json", {"minutes": minutes, "runs": runs})
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", nargs="?", default="cluster/jobs/local.yaml", help="job YAML (its stage 1 and set)")
    ap.add_argument("--budget", default="make_run", help="name of this budget in compare.json (make_run, long)")
    ap.add_argument("--minutes", type=float, default=3.0, help="stage-3 learner time per arm")
    ap.add_argument("--segments", type=int, default=4, help="interleaving turns (and τ-curve points) per arm")
    ap.add_argument("--replay-fraction", type=float, default=0.25,
                    help="target-assisted arms: share of rows replayed from the set (against forgetting)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="eval temperatures")
    ap.add_argument("--curve-task", default="chat", help="the task of the τ-vs-steps eval (greedy)")
    ap.add_argument("--draft", help="stage-1 draft (default <run_dir>/draft_pretrained)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny rollouts and evals")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--out", type=Path, default=Path("bench/results/opd"), help="compare.json and the plot go here")
    ap.add_argument("--skip-train", action="store_true",
                    help="reuse a finished training (<run_dir>/opd/<budget>/trained.json) and the arms' eval JSONs")
    ap.add_argument("--scaling", action="store_true",
                    help="instead: the scaling check (1 → 2 rollout actors, 1 → 2 target engines) → scaling.json")
    args = ap.parse_args(argv)
    if not 0 <= args.replay_fraction < 1:
        raise SystemExit(f"--replay-fraction must be in [0, 1), got {args.replay_fraction}")

    from draftalign.evaluate import machine, run_eval

    base = load_config(args.job if Path(args.job).exists() else None, (QUICK if args.quick else []) + args.overrides)
    src_run = base.run_path.resolve()
    draft = Path(args.draft or src_run / "draft_pretrained").expanduser().resolve()
    if not (draft / "config.json").is_file():
        raise SystemExit(f"stage-1 draft {draft} not found: run `draftalign pretrain` (or `make run`) or pass --draft")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(arms) - set(ARMS):
        raise SystemExit(f"unknown arms {sorted(set(arms) - set(ARMS))}; known: {', '.join(ARMS)}")
    gamma = base.eval.gamma[0]
    root = src_run / "opd" / args.budget
    if args.scaling:
        scaling(base, draft, root, args.minutes, args.replay_fraction, args.out)
        return 0
    cfgs = {a: arm_config(base, a, draft, root, args.replay_fraction) for a in arms}
    for cfg in cfgs.values():
        _link_distill_set(src_run, cfg.run_path)
    t0 = time.time()
    trained_path = root / "trained.json"  # --skip-train reuses it (and the arms' eval JSONs) after a crash
    if args.skip_train:
        trained = json.loads(trained_path.read_text())
    else:
        trained = train_interleaved(cfgs, args.minutes, args.segments)
        write_json_atomic(trained_path, trained)

    import ray

    if ray.is_initialized():
        ray.shutdown()  # no idle Ray workers on the cores the eval times
    finals = {a: str(cfgs[a].run_path / "draft_distilled") for a in arms}
    rows, taus = [], {a: {} for a in arms}
    for temp in args.temperatures:
        cfg = base.model_copy(deep=True)
        cfg.eval.temperature = temp
        outs = {a: root / a / f"eval_T{temp:g}.json" for a in arms}
        if args.skip_train and all(p.is_file() for p in outs.values()):
            evals = {a: json.loads(p.read_text()) for a, p in outs.items()}
        else:
            evals = run_eval(cfg, finals, out=outs)
        rows += paired_rows(evals, args.budget, temp, gamma)
        for a in arms:
            taus[a][f"T={temp:g}"] = tau_cells(evals[a], gamma)

    cfg = base.model_copy(deep=True)  # τ against steps: every snapshot + the stage-1 draft, one interleaved eval
    n = cfg.eval.prompts_per_task
    cfg.eval = type(cfg.eval).model_validate({
        **cfg.eval.model_dump(), "temperature": 0.0, "tasks": [args.curve_task],
        "prompts_per_task": {args.curve_task: n.get(args.curve_task, 8) if isinstance(n, dict) else n}})
    snaps = {"stage1": str(draft)} | {f"{a}_s{s['segment']}": s["snapshot"] for a in arms
                                      for s in trained[a]["segments"]}
    curve_eval = run_eval(cfg, snaps)
    start = tau_cells(curve_eval["stage1"], gamma)[args.curve_task]
    curve = {a: [{"step": 0, **start}] + [{"step": s["step"], **tau_cells(curve_eval[f"{a}_s{s['segment']}"], gamma)[
        args.curve_task]} for s in trained[a]["segments"]] for a in arms}

    out_path = args.out / "compare.json"
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    budgets = {**old.get("budgets", {}), args.budget: {
        "job": str(args.job), "minutes_per_arm": args.minutes, "segments": args.segments,
        "replay_fraction": args.replay_fraction, "quick": args.quick, "gamma": gamma, "stage1_draft": str(draft),
        "arms": {a: {"settings": ARMS[a], **trained[a], "tau": taus[a]} for a in arms},
        "curve": {"task": args.curve_task, "temperature": 0.0, "points": curve},
        "wall_s": round(time.time() - t0, 1), "machine": machine()}}
    paired = [r for r in old.get("paired", []) if r["budget"] != args.budget] + rows
    write_json_atomic(out_path, {"issue": 38, "paired": paired, "budgets": budgets})
    plot_curve(curve, args.out / f"tau_vs_steps_{args.budget}.png",
               f"{args.budget}: greedy {args.curve_task} τ vs stage-3 steps, {args.minutes:g} min per arm")
    for r in rows:
        ci = r["dtau_ci"]
        print(f"{r['budget']} T={r['temperature']:g} {r['task']:>9}: {r['a']} − {r['b']} Δτ {r['dtau']:+.3f} "
              f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
