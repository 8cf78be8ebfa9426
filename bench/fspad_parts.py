"""Ablation of the FSPAD head's parts: each switched off in turn, at an equal training budget.

Arms (`draft.fspad.*`, everything else the job's):
    fspad               feature sampling on, partial alignment (aligned_fraction 0.5): the default
    no_feature_sampling the entering token is always the data token
    full_alignment      feature regression on the whole feature (aligned_fraction 1.0)
    eagle               both off: EAGLE's recipe on the same head
    on_policy           the training-time test's steps 2 … K on the head's own sampled chains, scored by the target
                        (draft.fspad.on_policy; not a part of FSPAD: the head's analogue of on-policy distillation)
Every arm trains for --steps steps on the same stored features (`actors/feature_store.py`: the job's
`fspad_features/` is linked into each arm, so the target runs over the set once for all arms; a sampled
store serves the unsampled arms), then ONE interleaved `draftalign.evaluate.run_eval` decodes with every
head at the chains of eval.gamma — and the `fspad` head also with the trees of --trees (tree vs chain is the
third switch) — with --baseline drafts (NAME=PATH, e.g. the standalone Llama draft) in the same run.

    python bench/fspad_parts.py cluster/jobs/local-long.yaml --steps 600 --trees 2,2,1 \\
        --baseline llama=runs/local-long/draft_distilled --out bench/results/fspad_parts.json

Arms run in `<run_dir>/fspad_parts/<arm>/`; --resume reuses an arm whose head exists. An arm that differs from
the job's head only once the training-time test starts (`on_policy`) trains exactly the job's steps before it
(same batches, RNG restored): it starts from --prefix-checkpoint, the job's checkpoint at a step ≤ the unroll
start (Ray keeps only the newest two: copy it aside while the job runs), and trains the rest. Writes the JSON and
a text table (block efficiency τ and speedup per arm and chain/tree, chat and overall, with intervals).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402

ARMS: dict[str, dict] = {
    "fspad": {},
    "no_feature_sampling": {"feature_sampling": False},
    "full_alignment": {"aligned_fraction": 1.0},
    "eagle": {"feature_sampling": False, "aligned_fraction": 1.0},
    "on_policy": {"on_policy": True},
}
SHARED_PREFIX = {"on_policy"}  # arms equal to the job's head until draft.fspad.unroll_start


def _seed_arm(arm_dir: Path, ckpt: Path, unroll_start: int) -> int:
    """Copy the job's checkpoint `ckpt` (a step ≤ the unroll start) into the arm's checkpoints, unless the arm has
    its own already; returns the step the arm continues from."""
    from learner.trainer import list_checkpoints, verify_checkpoint

    step = verify_checkpoint(ckpt)  # the manifest's step, once its files check out
    if step > unroll_start:
        raise SystemExit(f"--prefix-checkpoint {ckpt}: step {step} is past the unroll start {unroll_start}")
    exp = arm_dir / "ray_results" / "fspad"
    if not list_checkpoints(exp):
        exp.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ckpt, exp / ckpt.name)
    return step


def _arm_dir(src_run: Path, arm_dir: Path) -> None:
    """The arm's run dir: the job's distillation set and feature store linked in, its draft vocabulary copied."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    for name in ("distill_set", "fspad_features"):
        src, dst = src_run / name, arm_dir / name
        if not src.is_dir():
            raise SystemExit(f"no {name} at {src}: run `draftalign run {src_run.name} --set draft.kind=fspad` first")
        if not dst.exists():
            os.symlink(src.resolve(), dst)
    if (src_run / "draft_vocab.json").is_file() and not (arm_dir / "draft_vocab.json").exists():
        shutil.copy2(src_run / "draft_vocab.json", arm_dir / "draft_vocab.json")


def _cell(row: dict) -> str:
    ci = row.get("ci95", {})

    def iv(key: str) -> str:
        return f" [{ci[key][0]:.2f}, {ci[key][1]:.2f}]" if key in ci else ""

    return f"τ {row['block_efficiency']:.2f}{iv('block_efficiency')}, {row['speedup']:.2f}×{iv('speedup')}"


def format_table(evals: dict[str, dict], trained: dict[str, dict]) -> str:
    """One line per (arm, chain γ or tree): chat and overall τ and speedup, plus held-out acceptance."""
    lines = ["arm | decoding | chat | overall | held-out greedy α (first step)", "--- | --- | --- | --- | ---"]
    for name, ev in evals.items():
        blocks = [(f"chain γ={g}", b) for g, b in ev.get("by_gamma", {}).items()]
        blocks += [(label, b) for label, b in ev.get("by_tree", {}).items()]
        ha = trained.get(name, {}).get("heldout_greedy_acceptance")
        for label, b in blocks:
            chat = b["tasks"].get("chat")
            lines.append(f"{name} | {label} | {_cell(chat) if chat else '-'} | {_cell(b['overall'])} | "
                         f"{'-' if ha is None else f'{ha:.3f}'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", help="job YAML whose run holds the distillation set and the feature store")
    ap.add_argument("--steps", type=int, required=True, help="learner steps per arm (the equal budget)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--trees", nargs="*", default=["2,2,1"],
                    help="token trees evaluated besides the chains: 2,2,1 (static) or dynamic:5,3,10 (EAGLE-2)")
    ap.add_argument("--baseline", action="append", default=[], help="NAME=PATH of a draft evaluated alongside")
    ap.add_argument("--resume", action="store_true", help="reuse arms whose head already exists")
    ap.add_argument("--prefix-checkpoint", type=Path, default=None,
                    help="the job's checkpoint at a step ≤ the unroll start: where the on_policy arm starts")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--eval-set", dest="eval_overrides", action="append", default=[],
                    help="key.path=value for the eval only (e.g. target.dtype=float32 after a bf16 store)")
    ap.add_argument("--out", type=Path, required=True, help="write the ablation JSON here (.json)")
    args = ap.parse_args(argv)
    if args.out.suffix != ".json":
        raise SystemExit(f"--out {args.out}: a .json path")

    from draftalign.cli import parse_tree
    from draftalign.evaluate import run_eval
    from learner.fspad_distill import DONE_FILE, run_fspad

    base = load_config(args.job, ["draft.kind=fspad", *args.overrides])
    src_run = base.run_path.resolve()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    baselines = dict(b.split("=", 1) for b in args.baseline)
    root = src_run / "fspad_parts"
    heads, trained, t0 = {}, {}, time.time()
    for arm in arms:
        cfg = base.model_copy(deep=True)
        cfg.name, cfg.run_dir = f"{base.name}-fspad-{arm}", str(root / arm)
        cfg.learner.max_steps = args.steps
        for k, v in ARMS[arm].items():
            setattr(cfg.draft.fspad, k, v)
        arm_dir = Path(cfg.run_dir)
        _arm_dir(src_run, arm_dir)
        t_arm, first = time.time(), 0
        if arm in SHARED_PREFIX:
            if args.prefix_checkpoint is None:
                raise SystemExit(f"arm {arm} starts from the job's head at the unroll start: give --prefix-checkpoint")
            first = _seed_arm(arm_dir, args.prefix_checkpoint, cfg.draft.fspad.unroll_start(args.steps))
        print(f"[fspad_parts] {arm}: {ARMS[arm] or 'defaults'}, steps {first} … {args.steps}", flush=True)
        heads[arm] = str(run_fspad(cfg, resume=args.resume or first > 0))
        trained[arm] = {**json.loads((arm_dir / DONE_FILE).read_text()), "first_step": first,
                        "stage_wall_s": round(time.time() - t_arm, 1)}

    import ray

    if ray.is_initialized():
        ray.shutdown()  # no idle Ray workers on the cores the eval times
    cfg = load_config(args.job, ["draft.kind=fspad", *args.overrides, *args.eval_overrides])
    cfg.eval.trees = [parse_tree(t) for t in args.trees]
    drafts = {**heads, **baselines}
    evals = run_eval(cfg, drafts, trees_for={"fspad"} & set(drafts))  # tree vs chain: the full head (arm or baseline)
    table = format_table(evals, trained)
    write_json_atomic(args.out, {"job": args.job, "steps": args.steps, "arms": {a: ARMS[a] for a in arms},
                                 "trained": trained, "eval": evals, "wall_s": round(time.time() - t0, 1),
                                 "table": table})
    args.out.with_suffix(".txt").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
