"""`draftalign run`: every stage in order, skipping stages whose outputs are complete.

    generate → pretrain → distill → eval (target-only, pretrained, distilled) → report
    generate → fspad → eval (draft.kind=fspad: the feature-level head; no stage 1)

Generation comes first: the target's answers need nothing from the draft, and the draft's vocabulary
(`draftalign.vocab`) and, optionally, stage 1's text (`pretrain.corpus: [run:distill_set]`) come
from them. One eval measures both drafts against target-only decoding, interleaved per prompt, after
Ray has been shut down (no idle workers on the cores being timed); it writes `eval_pretrained.json`
and `eval_distilled.json`, and with `eval.sampled` a second one at that temperature
(`eval_<draft>_t1.json` for T = 1).

Each stage writes a completion marker only after its outputs are in place (atomically), so a rerun
after a kill continues at the first incomplete stage; stages that were cut mid-way resume from
their own checkpoints (pretrain, distill) or finished shards (generate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from draftalign.config import FEATURE_KINDS, ConfigError, JobConfig, check_fits_cluster
from draftalign.io import read_json, write_json_atomic
from draftalign.report import STAGE_TIMES, stages_line
from draftalign.runtime import run_dir
from draftalign.storage import pull


def _done(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def _has_checkpoint(root: Path) -> bool:
    root = pull(root)  # a URI run: the stage's checkpoints, from storage
    return root.exists() and any(root.rglob("checkpoint_*"))


# Where and how wide a job runs, not what it computes: a rerun may change these (scale the rollout
# actors, move to a cluster with `draftalign launch`) and still continue the same run.
PLACEMENT_KEYS = {"cluster", "serve", "num_actors", "num_engines", "num_workers", "cpus_per_actor",
                  "cpus_per_engine", "cpus_per_worker", "gpus_per_actor", "gpus_per_engine", "use_gpu",
                  "resources", "kv_cache_gib", "queue_size", "tensor_parallel_size", "storage_path", "run_dir"}


def config_changes(old, new, path: str = "") -> list[str]:
    """Dotted paths whose values differ between two job configs (as dicts), "path: old -> new",
    placement fields (`PLACEMENT_KEYS`) aside."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(old.keys() | new.keys()) if k not in PLACEMENT_KEYS
                for c in config_changes(old.get(k), new.get(k), f"{path}.{k}" if path else k)]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _check_same_job(out: Path, cfg: JobConfig) -> None:
    """A run dir is resumed only by the job that made it: its finished stages would otherwise be
    reused under a config that did not produce them."""
    try:
        prev = json.loads((out / "job.json").read_text())
    except (OSError, ValueError):
        return  # a fresh run dir (or a torn job.json: nothing was trusted from it)
    try:  # fields added to the schema since the run was made take their defaults (the old behaviour)
        prev = json.loads(JobConfig.model_validate(prev).model_dump_json())
    except ValueError:
        pass  # a field since removed or restricted: compare as written, the change is then named
    changes = config_changes(prev, json.loads(cfg.model_dump_json()))
    if changes:
        more = f" (+{len(changes) - 5} more)" if len(changes) > 5 else ""
        raise ConfigError(f"{out} holds a run of a different job config ({'; '.join(changes[:5])}{more}); "
                          f"its finished stages would be reused. Use another run dir "
                          f"(--set name=... or --set run_dir=...) or remove {out}.")


def _stage(out: Path, name: str, marker: Path, fn) -> None:
    if _done(marker):
        print(f"[run] {name}: complete ({marker.name}), skipped", flush=True)
        return
    print(f"[run] {name}: starting", flush=True)
    t0 = time.time()
    fn()
    seconds = time.time() - t0
    print(f"[run] {name}: done in {seconds:.0f} s", flush=True)
    from draftalign.evaluate import machine

    times = read_json(out / STAGE_TIMES) or {}  # a resumed run keeps the times of the stages it skipped
    write_json_atomic(out / STAGE_TIMES, {**times, name: {"seconds": round(seconds, 1), "machine": machine()}})


def _finish(out: Path, t0: float, what: str) -> None:
    print(f"[run] finished in {time.time() - t0:.0f} s; {what}", flush=True)
    print(f"[run] stages: {stages_line(out)}", flush=True)


def _eval_drafts(cfg: JobConfig, out: Path, drafts: dict[str, str], suffix: str = "") -> None:
    """Evaluate drafts {name: path} in one interleaved run, `<out>/eval_<name><suffix>.json` each, Ray shut
    down first."""
    import ray

    from draftalign.evaluate import run_eval

    if ray.is_initialized():
        ray.shutdown()  # idle Ray workers and agents must not share the cores being timed
    run_eval(cfg, drafts, out={n: out / f"eval_{n}{suffix}.json" for n in drafts})


def _evals(cfg: JobConfig, out: Path, drafts: dict[str, str]) -> None:
    """The eval stage (eval.temperature, every task and γ), then eval.sampled's when the job asks for it."""
    _stage(out, "eval", out / "eval_distilled.json", lambda: _eval_drafts(cfg, out, drafts))
    if (s := cfg.eval.sampled) is not None:
        sampled = cfg.model_copy(update={"eval": cfg.eval.at_temperature()})
        _stage(out, f"eval at T = {s.temperature:g}", out / f"eval_distilled_{s.suffix}.json",
               lambda: _eval_drafts(sampled, out, drafts, suffix=f"_{s.suffix}"))


def generate_stage(cfg: JobConfig) -> Path:
    """Stage 2 as `draftalign run` runs it: the target's own queries (where data.train names embedded:self) and its
    answers on one pool of engines, in a Ray instance left up for the training stages to join (a local start
    costs ≈ 10 s on 2 cores, an engine ≈ 25 s)."""
    from actors.generate import Stage2Engines, run_generate
    from actors.magpie import resolve_self_sources
    from draftalign.models import resolve_target

    with Stage2Engines(cfg, resolve_target(cfg.target.model)) as engines:
        return run_generate(resolve_self_sources(cfg, engines=engines), engines=engines)


def run_pipeline(cfg: JobConfig) -> Path:
    """Run the whole job; returns the run directory."""
    from draftalign.report import write_report
    from learner.distill import run_distill
    from learner.pretrain import run_pretrain

    check_fits_cluster(cfg)
    out = run_dir(cfg)
    _check_same_job(out, cfg)
    write_json_atomic(out / "job.json", json.loads(cfg.model_dump_json()))
    t0 = time.time()
    _stage(out, "generate", out / "distill_set" / "metadata.json", lambda: generate_stage(cfg))
    if cfg.draft.kind in FEATURE_KINDS:
        return _run_fspad(cfg, out, t0)
    _stage(out, "pretrain", out / "pretrain_done.json",
           lambda: run_pretrain(cfg, resume=_has_checkpoint(out / "ray_results" / "pretrain")))
    _stage(out, "distill", out / "distill_done.json",
           lambda: run_distill(cfg, resume=_has_checkpoint(out / "ray_results" / "distill")))
    _evals(cfg, out, {n: str(out / f"draft_{n}") for n in ("pretrained", "distilled")})
    report = write_report(out)
    _finish(out, t0, f"report: {report}")
    return out


def _run_fspad(cfg: JobConfig, out: Path, t0: float) -> Path:
    """draft.kind=fspad or eagle3: generate → fspad (the head on the target's features) → eval → report.

    No stage 1: the head only exists on top of the target's features, and the target's own answers are what
    it learns from (learner/fspad_distill.py). The eval decodes with the head (`eval_distilled.json`: the
    draft this run distilled), chains at eval.gamma and the trees of eval.trees."""
    from draftalign.report import write_report
    from learner.fspad_distill import DONE_FILE, run_fspad

    print(f"[run] pretrain: skipped for draft.kind={cfg.draft.kind} (the head trains on the target's features of "
          "the distillation set)", flush=True)
    _stage(out, "fspad", out / DONE_FILE, lambda: run_fspad(cfg, resume=_has_checkpoint(out / "ray_results" / "fspad")))
    done = json.loads((out / DONE_FILE).read_text())

    _evals(cfg, out, {"distilled": done["draft"]})
    report = write_report(out)
    _finish(out, t0, f"head: {done['draft']}; report: {report}")
    return out
