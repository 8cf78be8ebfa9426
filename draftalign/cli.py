"""`draftalign` command line: one verb per stage, each reading a job YAML.

Every verb takes the job YAML as its first argument (default: the embedded local job) and
`--set key.path=value` overrides; verb-specific flags override single fields too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from draftalign.config import FEATURE_KINDS, ConfigError, JobConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train draft models for speculative decoding and serve them.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", help="show library start-up chatter and every Ray "
                                                                 "worker's output (vLLM, Ray, Ray Train, "
                                                                 "transformers progress bars); without it, "
                                                                 "workers' output is kept in <run_dir>/logs/ray")):
    from draftalign.runtime import quiet_libraries

    quiet_libraries(verbose)

DEFAULT_JOB = Path("cluster/jobs/local.yaml")
JobArg = typer.Argument(None, help="job YAML (default cluster/jobs/local.yaml)")
SetOpt = typer.Option(None, "--set", help="override a field: key.path=value (repeatable)")


def _load(job: Path | None, overrides: list[str] | None, extra: dict[str, object] | None = None) -> JobConfig:
    sets = list(overrides or [])
    for key, value in (extra or {}).items():
        if value is not None:
            sets.append(f"{key}={value}")
    path = job if job is not None else (DEFAULT_JOB if DEFAULT_JOB.exists() else None)
    return load_config(path, sets)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _guard(fn):
    """Turn the project's own input errors into one clear line and exit code 2."""
    from draftalign.models import ModelError

    try:
        return fn()
    except (ConfigError, ModelError, FileNotFoundError) as e:
        _fail(str(e))


def parse_tree(text: str) -> list[int] | dict:
    """"2,2,1" → [2, 2, 1]; "dynamic:5,3,12" → {depth: 5, topk: 3, nodes: 12} (EAGLE-2); else a clear error.
    The labels the eval prints are accepted too: "tree:2-2-1", "dtree:5-3-12" (`draftalign.evaluate.tree_label`)."""
    if text.startswith(("tree:", "dtree:")):  # a result label typed back in
        kind, _, shape = text.partition(":")
        text = ("dynamic:" if kind == "dtree" else "") + shape.replace("-", ",")
    kind, _, shape = text.rpartition(":")
    try:
        ks = [int(k) for k in shape.split(",")]
    except ValueError:
        ks = []
    if kind == "dynamic" and len(ks) == 3 and min(ks) >= 1:
        return dict(zip(("depth", "topk", "nodes"), ks))
    if kind or not ks or min(ks) < 1:
        raise typer.BadParameter(f"--tree {text!r}: give a static tree's branching per depth as integers ≥ 1, "
                                 f"e.g. 2,2,1, or a dynamic tree as dynamic:DEPTH,TOPK,NODES, e.g. dynamic:5,3,12")
    return ks


def _int_gamma(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"--gamma {text!r}: give an integer ≥ 1 or 'adaptive'") from None


def eval_destinations(out: Path | None, names: list[str]) -> dict[str, Path]:
    """Where `draftalign eval --out` writes each draft's JSON: a file for one draft, or eval_<NAME>.json in a
    directory (one that exists, or any path when several drafts are compared).
    Checked before the eval runs, so a measurement is never lost to a bad path at the end."""
    if out is None:
        return {}
    as_dir = out.is_dir() or len(names) > 1
    if not as_dir and out.suffix != ".json":
        raise typer.BadParameter(f"--out {out}: give a .json file, or an existing directory")
    if as_dir and out.exists() and not out.is_dir():
        raise typer.BadParameter(f"--out {out} is a file, but {len(names)} drafts need a directory")
    return {n: out / f"eval_{n}.json" for n in names} if as_dir else {names[0]: out}


@app.command()
def eval(job: Path = JobArg, target: str = typer.Option(None, help="target model (overrides target.model)"),
         draft: list[str] = typer.Option(None, help="draft checkpoint path, 'new' for a fresh draft.arch draft, "
                                                  "or NAME=PATH; repeat to compare drafts in one interleaved run"),
         gamma: list[str] = typer.Option(None, help="γ, or 'adaptive' for the served per-request policy "
                                                  "(γ ≤ eval.gamma_max each round) (repeatable)"),
         tree: list[str] = typer.Option(None, help="a token tree to evaluate too, its branching per depth, "
                                                 "e.g. 2,2,1, or dynamic:DEPTH,TOPK,NODES (EAGLE-2, FSPAD heads "
                                                 "only), e.g. dynamic:5,3,12 (repeatable)"),
         tree_for: list[str] = typer.Option(None, help="measure the trees for this draft NAME only "
                                                     "(repeatable; default every draft)"),
         temperature: float = typer.Option(None), prompts_per_task: int = typer.Option(None),
         max_new_tokens: int = typer.Option(None),
         out: Path = typer.Option(None, help="a .json path (one draft), or an existing directory: eval_<NAME>.json "
                                             "per draft in it (a new one when several drafts are compared)"),
         overrides: list[str] = SetOpt):
    """Acceptance rate, block efficiency and speedup of drafts against their target, per task and γ,
    every arm interleaved per prompt in one run."""
    from draftalign.evaluate import run_eval

    def go():
        cfg = _load(job, overrides, {"target.model": target, "eval.temperature": temperature,
                                     "eval.prompts_per_task": prompts_per_task,
                                     "eval.max_new_tokens": max_new_tokens})
        if gamma:
            cfg.eval.gamma = [g if g == "adaptive" else _int_gamma(g) for g in gamma]
        if tree:
            cfg.eval.trees = [parse_tree(t) for t in tree]
        specs = list(draft or [None])
        drafts = {}
        for i, spec in enumerate(specs):
            name, _, path = spec.partition("=") if spec and "=" in spec else (f"draft{i}" if len(specs) > 1
                                                                              else "draft", "", spec)
            drafts[name] = path
        unknown = sorted(set(tree_for or []) - set(drafts))
        if unknown:
            raise ConfigError(f"--tree-for {', '.join(unknown)}: no such draft (drafts: {', '.join(drafts)})")
        dest = eval_destinations(out, list(drafts))
        run_eval(cfg, drafts, out=dest, trees_for=set(tree_for) if tree_for else None)

    _guard(go)


@app.command()
def pretrain(job: Path = JobArg, resume: bool = typer.Option(False, help="continue from the latest checkpoint"),
             overrides: list[str] = SetOpt):
    """Stage 1: pretrain the draft on plain text (Ray Train)."""
    from learner.pretrain import run_pretrain

    def go():
        cfg = _load(job, overrides)
        if cfg.draft.kind in FEATURE_KINDS:
            _fail(f"draft.kind={cfg.draft.kind} has no stage 1: the head trains on the target's features "
                  "(`draftalign distill` runs its stage)")
        run_pretrain(cfg, resume=resume)

    _guard(go)


@app.command()
def generate(job: Path = JobArg, overrides: list[str] = SetOpt):
    """Stage 2: the vLLM-hosted target answers prompts → the distillation set (parquet)."""
    from draftalign.pipeline import generate_stage

    _guard(lambda: generate_stage(_load(job, overrides)))


@app.command()
def distill(job: Path = JobArg, resume: bool = typer.Option(False, help="continue from the latest checkpoint"),
            overrides: list[str] = SetOpt):
    """Stage 3: on-policy distillation (rollout actors, vLLM target scoring, Ray Train learner); with
    draft.kind=fspad, the FSPAD head on the target's features of the distillation set."""
    from learner.distill import run_distill

    def go():
        cfg = _load(job, overrides)
        if cfg.draft.kind in FEATURE_KINDS:
            from learner.fspad_distill import run_fspad

            return run_fspad(cfg, resume=resume)
        return run_distill(cfg, resume=resume)

    _guard(go)


@app.command()
def serve(job: Path = JobArg, port: int = typer.Option(None), draft: str = typer.Option(None),
          learn: bool = typer.Option(False, help="online distillation: capture served rounds and run the online "
                                                 "learner next to the endpoint, hot-swapping its versions "
                                                 "(serve.online.enabled, serve.online.learner.enabled; the weight "
                                                 "store defaults to draftalign-<name>-online-weights)"),
          overrides: list[str] = SetOpt):
    """Serve target + draft speculative decoding behind an OpenAI-compatible HTTP API (Ray Serve)."""
    from serve.app import run_serve

    def go():
        extra: dict[str, object] = {"serve.port": port}
        if learn:
            cfg = _load(job, overrides, extra)
            extra |= {"serve.online.enabled": "true", "serve.online.learner.enabled": "true",
                      "serve.online.weight_store": cfg.serve.online.weight_store
                      or f"draftalign-{cfg.name}-online-weights"}
        run_serve(_load(job, overrides, extra), draft=draft)

    _guard(go)


@app.command()
def export(draft: Path = typer.Argument(..., help="the draft: an HF-format Llama draft or an FSPAD head"),
           out: Path = typer.Argument(..., help="the directory to write (replaced atomically)"),
           format: str = typer.Option(..., "--format", help="hf (Llama draft → vLLM draft_model), eagle (FSPAD head "
                                                             "→ EAGLE-1) or eagle3"),
           job: Path = typer.Option(None, help="job YAML naming the target (default cluster/jobs/local.yaml)"),
           target: str = typer.Option(None, help="target model (overrides target.model)"),
           overrides: list[str] = SetOpt):
    """Export a draft to a format vLLM's speculative decoding loads, exactly: refused, with the reason, when the
    format cannot express the draft (no approximate export)."""
    from draftalign.models import resolve_target
    from serve.export import export_draft

    def go():
        cfg = _load(job, overrides, {"target.model": target})
        dest = export_draft(draft, out, format, resolve_target(cfg.target.model))
        typer.echo(f"exported {draft} as {format} to {dest}")

    _guard(go)


@app.command()
def run(job: Path = JobArg, overrides: list[str] = SetOpt):
    """Every stage: generate → pretrain → distill → eval → report, skipping finished stages."""
    from draftalign.pipeline import run_pipeline

    _guard(lambda: run_pipeline(_load(job, overrides)))


@app.command()
def launch(job: Path = typer.Argument(..., help="job YAML"),
           address: str = typer.Option(..., help="Ray Jobs API address, e.g. http://HOST:8265"),
           verb: str = typer.Option("run", help="the draftalign verb the job runs"),
           follow: bool = typer.Option(True, help="stream the logs until the job ends (--no-follow: just submit)"),
           overrides: list[str] = SetOpt):
    """Submit a job to a Ray cluster through the Ray Jobs API: print its id, dashboard URL and log command."""
    from draftalign.launch import launch as do_launch

    def go():
        _load(job, overrides)  # validate before shipping anything
        sys.exit(do_launch(job, address, verb=verb, overrides=overrides or [], follow=follow))

    _guard(go)


if __name__ == "__main__":
    app()
