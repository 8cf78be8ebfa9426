"""Stage 2: the target answers training prompts → the distillation set `<run_dir>/distill_set/`.

Layout:
- `plan.json` — what this set is (target, sampling, prompt ids in order, shard size). Written
  once before the first shard; a rerun whose plan differs refuses to mix shards.
- `part-00000.parquet`, … — shard i answers prompts [i·S, (i+1)·S) of the plan (S =
  `generate.shard_size`), one row per (prompt, response_index). Each shard is written to a
  temp file in the same directory and renamed: a shard file is either absent or complete.
- `metadata.json` — counts and parameters, written (atomically) once every shard exists: the
  set is complete iff it exists.

Each answer also stores the target's top-k next-token distribution at every answer position
(`target_topk_ids` / `target_topk_logprobs`, flattened (T, k) with k = `target.top_k_logprobs`),
which vLLM returns with the sampled tokens at no extra forward pass. Stage 3 replays these rows
without scoring them again (prompt + answer would cost a full target prefill per row); with
top_k_logprobs = -1 (full vocabulary) nothing is cached and replayed rows are scored.

Resume: the plan is a pure function of the config and the tokenizer (same prompts, same order,
same shard boundaries), so a rerun answers exactly the shards whose files are missing. No
prompt is lost or answered twice. Each prompt has its own sampling seed (hashed from job seed
and prompt id), so its answers do not depend on which engine or batch served it.

Growing a set (`generate.reuse_from`): the prompt list of num_prompts = N is the first N of one
seeded order, so a bigger set's plan starts with a smaller one's. A new run copies every shard of
the other set that answers the same prompt ids with the same target, sampling and shard size
(`reusable_shards`: all its full shards; a partial last shard is answered again) and generates the rest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from draftalign.config import ConfigError, JobConfig
from draftalign.distset import SCHEMA, SCHEMA_VERSION, distill_dir, shard_name
from draftalign.io import write_atomic, write_json_atomic
from draftalign.sources import stable_source
from draftalign.storage import exists, is_uri, join, pull, staging_dir

PROMPT_SOURCE = "draftalign.data.train_messages (train-split chitchat + summarize; no eval prompts)"


class PlanMismatch(ConfigError):
    """The run directory holds a distillation set made with a different plan."""


def prompt_seed(job_seed: int, prompt_id: str) -> int:
    # Far-apart seeds: vLLM seeds answer j of a prompt with seed + j.
    return int.from_bytes(hashlib.sha256(f"{job_seed}/{prompt_id}".encode()).digest()[:4], "big") >> 1


def build_prompts(cfg: JobConfig, tokenizer) -> tuple[list[dict], list[str]]:
    """The plan's prompts, in order: [{"prompt_id", "prompt", "prompt_token_ids"}], and the ids
    skipped because prompt + max_tokens would not fit in max_model_len."""
    from draftalign.data import chat_prompt_ids
    from draftalign.sources import train_prompts

    limit = cfg.target.max_model_len - cfg.generate.max_tokens
    prompts, skipped = [], []
    for m in train_prompts(cfg.data, cfg.generate.num_prompts, cfg.seed):
        ids = chat_prompt_ids(tokenizer, m["messages"])
        if len(ids) > limit:
            skipped.append(m["id"])
            continue
        text = tokenizer.apply_chat_template(m["messages"], add_generation_prompt=True, tokenize=False)
        prompts.append({"prompt_id": m["id"], "prompt": text, "prompt_token_ids": ids})
    ids = [p["prompt_id"] for p in prompts]
    assert len(set(ids)) == len(ids), "train_prompts returned duplicate prompt ids"
    return prompts, skipped


def prompt_source(cfg: JobConfig) -> str:
    """What the plan's prompts are drawn from (part of the plan: a set made from other sources is not reused)."""
    if cfg.data.is_default_train():
        return PROMPT_SOURCE
    return "data.train=" + json.dumps([{**s.model_dump(), "source": stable_source(s.source)} for s in cfg.data.train],
                                      sort_keys=True)


def _sampling(cfg: JobConfig) -> dict:
    g = cfg.generate
    return {"temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens,
            "responses_per_prompt": g.responses_per_prompt, "seed": cfg.seed}


def make_plan(cfg: JobConfig, prompts: list[dict], skipped: list[str]) -> dict:
    ids = [p["prompt_id"] for p in prompts]
    return {
        "schema_version": SCHEMA_VERSION,
        "target": {"model": cfg.target.model, "dtype": cfg.generate.dtype,
                   "max_model_len": cfg.target.max_model_len},
        "sampling": _sampling(cfg),
        "prompt_source": prompt_source(cfg),
        "num_prompts_requested": cfg.generate.num_prompts,
        "shard_size": cfg.generate.shard_size,
        "num_shards": -(-len(ids) // cfg.generate.shard_size),
        "prompt_ids": ids,
        "skipped_too_long": skipped,
    }


def _check_plan(d: Path, plan: dict) -> None:
    path = d / "plan.json"
    if not path.exists():
        write_json_atomic(path, plan)
        return
    old = json.loads(path.read_text())
    if old != plan:
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise PlanMismatch(f"{d} holds a distillation set made with a different plan (differs in: "
                           f"{', '.join(diff)}); use another run_dir or delete {d} (to grow a set: a new "
                           f"run_dir with generate.reuse_from={d.parent})")


PLAN_BASIS = ("schema_version", "target", "sampling", "prompt_source", "shard_size")


def reusable_shards(old: dict, new: dict) -> list[int]:
    """Indices i whose shard is the same in both plans: equal `PLAN_BASIS` (else PlanMismatch naming the
    difference) and prompt_ids[i·S : (i+1)·S] equal, S the shard size."""
    diff = [k for k in PLAN_BASIS if old.get(k) != new.get(k)]
    if diff:
        raise PlanMismatch(f"generate.reuse_from: that set was made with a different {', '.join(diff)}; "
                           "its answers are not this job's")
    S, a, b = new["shard_size"], old["prompt_ids"], new["prompt_ids"]
    return [i for i in range(min(old["num_shards"], new["num_shards"])) if a[i * S:(i + 1) * S] == b[i * S:(i + 1) * S]]


def reuse_shards(src: str | Path, d: Path, plan: dict) -> int:
    """Copy into `d` the shards of the set at `src` (a run_dir or its distill_set/) that `reusable_shards`
    allows and `d` lacks (atomically: a copy is whole or absent); returns how many were copied."""
    if is_uri(src):  # a run (or its set) in storage: only the set is pulled, into this node's staging copy
        whole_run = staging_dir(join(str(src), distill_dir("").name))
        src = pull(whole_run) if exists(whole_run / "plan.json") else pull(staging_dir(str(src)))
    src = Path(src).expanduser()
    src = distill_dir(src) if (distill_dir(src) / "plan.json").is_file() else src
    if not (src / "plan.json").is_file():
        raise ConfigError(f"generate.reuse_from={str(src)!r}: no distillation set there (no plan.json)")
    if src.resolve() == d.resolve():
        return 0
    copied = 0
    for i in reusable_shards(json.loads((src / "plan.json").read_text()), plan):
        name = shard_name(i)
        if (src / name).is_file() and not (d / name).exists():
            write_atomic(d / name, lambda tmp, f=src / name: shutil.copyfile(f, tmp))
            copied += 1
    return copied


def _rows(prompts: list[dict], answers: list[list[dict]]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for p, outs in zip(prompts, answers, strict=True):
        for j, a in enumerate(outs):
            cols["prompt_id"].append(p["prompt_id"])
            cols["prompt"].append(p["prompt"])
            cols["prompt_token_ids"].append(p["prompt_token_ids"])
            cols["response_token_ids"].append(a["token_ids"])
            cols["response_text"].append(a["text"])
            cols["finish_reason"].append(a["finish_reason"])
            cols["response_index"].append(j)
            cached = "target_ids" in a
            cols["target_topk_ids"].append(a["target_ids"].reshape(-1) if cached else None)
            cols["target_topk_logprobs"].append(a["target_logprobs"].reshape(-1) if cached else None)
    return pa.table(cols, schema=SCHEMA)


def _generate_threads(cfg: JobConfig) -> int:
    """OpenMP threads per engine: stage 2 owns the cluster, so engines share a node's cores."""
    import ray

    from actors.target import engine_threads

    t = cfg.target
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    fair = int(min(max(cpus, default=1), sum(cpus) // t.num_engines))
    return max(engine_threads(t.cpus_per_engine), fair)


class Stage2Engines:
    """Stage 2's target engines (`generate.dtype`, the node's cores): started on first use, shut down on exit.

    One pool serves everything stage 2 samples in a run (the target's own queries, `actors/magpie.py`, then
    its answers), so a run pays one engine start (≈ 25 s on 2 cores), not one per caller. Ray must be up."""

    def __init__(self, cfg: JobConfig, model_path: str):
        self.cfg, self.model_path, self._actors = cfg, model_path, []

    def actors(self) -> list:
        if not self._actors:
            from actors.target import create_target_actors
            from draftalign.models import pick_dtype

            device = "cuda" if self.cfg.target.gpus_per_engine else "cpu"
            dtype = str(pick_dtype(self.cfg.generate.dtype, device)).removeprefix("torch.")
            self._actors = create_target_actors(self.cfg, self.model_path, threads=_generate_threads(self.cfg),
                                                exclusive=True, dtype=dtype)
        return self._actors

    def close(self) -> None:
        from actors.target import shutdown_target_actors

        if self._actors:
            shutdown_target_actors(self._actors)
        self._actors = []

    def __enter__(self) -> Stage2Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def stage2_actors(cfg: JobConfig, model_path: str, engines: Stage2Engines | None = None):
    """The target actors stage 2 samples on: those of `engines` (a pool the caller owns), else of a pool of this
    block's own, shut down at its end with the Ray instance it started, if it started one."""
    import ray

    from draftalign.runtime import configure_vllm_env, init_ray

    configure_vllm_env(cfg.target.kv_cache_gib)  # before init_ray: actors inherit the env
    started_ray = not ray.is_initialized()
    init_ray(cfg)
    pool = engines if engines is not None else Stage2Engines(cfg, model_path)
    try:
        yield pool.actors()
    finally:
        if engines is None:
            pool.close()
            if started_ray:
                ray.shutdown()


def _summarize(d: Path, plan: dict) -> dict:
    """Counts over every shard; also checks each (prompt, response_index) appears exactly once."""
    n_resp = plan["sampling"]["responses_per_prompt"]
    seen: Counter = Counter()
    finish: Counter = Counter()
    rows = tokens = 0
    for i in range(plan["num_shards"]):
        t = pq.read_table(d / shard_name(i), columns=["prompt_id", "response_index",
                                                       "response_token_ids", "finish_reason"])
        rows += t.num_rows
        tokens += sum(len(x) for x in t.column("response_token_ids").to_pylist())
        finish.update(t.column("finish_reason").to_pylist())
        seen.update(zip(t.column("prompt_id").to_pylist(), t.column("response_index").to_pylist(),
                        strict=True))
    expected = {(p, j) for p in plan["prompt_ids"] for j in range(n_resp)}
    dup = [k for k, c in seen.items() if c > 1]
    if set(seen) != expected or dup:
        raise RuntimeError(f"{d}: shards do not hold every (prompt, answer) exactly once "
                           f"({len(expected - set(seen))} missing, {len(set(seen) - expected)} unknown, "
                           f"{len(dup)} duplicated)")
    return {"num_rows": rows, "num_response_tokens": tokens, "finish_reasons": dict(finish)}


def run_generate(cfg: JobConfig, engines: Stage2Engines | None = None) -> Path:
    """Build (or finish) the distillation set of this job; return its directory. `engines`: a pool the caller
    owns (`draftalign run` shares one with the self queries, in the Ray instance its training stages join);
    otherwise engines, and a Ray instance this call started, are shut down at the end."""
    from tqdm import tqdm

    from actors.target import one_per_engine
    from draftalign.models import load_target_tokenizer, resolve_target
    from draftalign.runtime import run_dir

    t0 = time.perf_counter()
    g = cfg.generate
    model_path = resolve_target(cfg.target.model)
    tokenizer = load_target_tokenizer(model_path)
    prompts, skipped = build_prompts(cfg, tokenizer)
    if not prompts:
        raise ConfigError(f"generate: no prompt fits target.max_model_len={cfg.target.max_model_len} "
                          f"with generate.max_tokens={g.max_tokens}")
    plan = make_plan(cfg, prompts, skipped)
    d = distill_dir(run_dir(cfg))
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".*.tmp-*"):  # left by a killed writer; never a finished shard
        stale.unlink(missing_ok=True)
    _check_plan(d, plan)
    copied = reuse_shards(g.reuse_from, d, plan) if g.reuse_from else 0

    shards = [prompts[i: i + g.shard_size] for i in range(0, len(prompts), g.shard_size)]
    pending = [i for i in range(len(shards)) if not (d / shard_name(i)).exists()]
    reused = len(shards) - len(pending)
    new_prompts = new_tokens = 0
    gen_seconds = 0.0
    if pending:
        with stage2_actors(cfg, model_path, engines) as actors:
            def submit(actor, i: int):
                return actor.generate.remote(
                    [p["prompt_token_ids"] for p in shards[i]], temperature=g.temperature, top_p=g.top_p,
                    max_tokens=g.max_tokens, n=g.responses_per_prompt,
                    seed=[prompt_seed(cfg.seed, p["prompt_id"]) for p in shards[i]],
                    logprobs=max(0, cfg.target.top_k_logprobs))

            def done(i: int, answers: list) -> None:
                nonlocal new_prompts, new_tokens, gen_seconds
                table = _rows(shards[i], answers)
                write_atomic(d / shard_name(i), lambda tmp: pq.write_table(table, tmp))
                new_prompts += len(shards[i])
                new_tokens += sum(len(a["token_ids"]) for outs in answers for a in outs)
                gen_seconds = time.perf_counter() - t_gen
                bar.update(len(shards[i]))
                bar.set_postfix_str(f"{new_prompts / gen_seconds:.2f} prompts/s, "
                                    f"{new_tokens / gen_seconds:.1f} tok/s")

            t_gen = time.perf_counter()
            bar = tqdm(total=len(prompts), initial=sum(len(shards[i]) for i in range(len(shards))
                                                       if (d / shard_name(i)).exists()),
                       unit="prompt", desc="generate", file=sys.stderr, dynamic_ncols=True)
            one_per_engine(actors, pending, submit, done)
            bar.close()

    counts = _summarize(d, plan)
    if pending or not (d / "metadata.json").exists():
        meta = {k: v for k, v in plan.items() if k not in ("prompt_ids", "skipped_too_long")}
        meta["target"] = {**plan["target"], "path": model_path}
        meta.update(num_prompts=len(prompts), num_skipped_too_long=len(skipped),
                    target_top_k_cached=max(0, cfg.target.top_k_logprobs),
                    shards=[shard_name(i) for i in range(len(shards))], **counts,
                    columns={f.name: str(f.type) for f in SCHEMA})
        write_json_atomic(d / "metadata.json", meta)
    rate = (f"{new_prompts / gen_seconds:.2f} prompts/s, {new_tokens / gen_seconds:.1f} generated tok/s"
            if gen_seconds else "nothing to generate")
    print(f"generate: {len(prompts)} prompts ({len(skipped)} too long, skipped) → {counts['num_rows']} "
          f"answers, {counts['num_response_tokens']} tokens in {len(shards)} shards ({reused} reused"
          f"{f', {copied} of them copied from {g.reuse_from}' if copied else ''}) | "
          f"{rate} | {time.perf_counter() - t0:.1f} s | {d}", flush=True)
    return d
