"""Stage-2 generation throughput: prompts/s and generated tokens/s vs the number of TargetActors.

Same prompts (the job's training prompts), same sampling, same shard size for every arm; the
driver dispatches shards exactly as `run_generate` does (one shard in flight per engine). The
machine's cores are split evenly between the engines (OpenMP threads = cores // engines).
Engine start-up is reported separately and not counted in the rates.

    .venv/bin/python bench/generate_throughput.py [--quick] [--engines 1 2] --out F.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_arm(cfg, model_path: str, prompts: list[dict], engines: int, threads: int, shard_size: int) -> dict:
    import ray

    from actors.generate import prompt_seed
    from actors.target import create_target_actors, shutdown_target_actors

    cfg = cfg.model_copy(deep=True)
    cfg.target.num_engines = engines
    cfg.target.cpus_per_engine = min(cfg.target.cpus_per_engine, (os.cpu_count() or 1) / engines)
    g = cfg.generate
    t0 = time.perf_counter()
    actors = create_target_actors(cfg, model_path, threads=threads)
    start_s = time.perf_counter() - t0
    try:
        # warm-up: the first call of an engine pays one-off costs (kernels, allocator)
        ray.get([a.generate.remote([prompts[0]["prompt_token_ids"]], max_tokens=4) for a in actors])
        shards = deque(prompts[i: i + shard_size] for i in range(0, len(prompts), shard_size))
        inflight, tokens = {}, 0

        def submit(actor):
            shard = shards.popleft()
            inflight[actor.generate.remote(
                [p["prompt_token_ids"] for p in shard], temperature=g.temperature, top_p=g.top_p,
                max_tokens=g.max_tokens, seed=[prompt_seed(cfg.seed, p["prompt_id"]) for p in shard])] = actor

        t1 = time.perf_counter()
        for a in actors:
            if shards:
                submit(a)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ref)
            tokens += sum(len(o["token_ids"]) for outs in ray.get(ref) for o in outs)
            if shards:
                submit(actor)
        secs = time.perf_counter() - t1
    finally:
        shutdown_target_actors(actors)
    return {"engines": engines, "threads_per_engine": threads, "prompts": len(prompts),
            "generated_tokens": tokens, "seconds": round(secs, 2),
            "prompts_per_s": round(len(prompts) / secs, 3), "tokens_per_s": round(tokens / secs, 1),
            "engine_start_s": round(start_s, 1)}


def format_table(rows: list[dict]) -> str:
    head = "| engines | threads/engine | prompts | gen tokens | seconds | prompts/s | tokens/s | engine start s |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['engines']} | {r['threads_per_engine']} | {r['prompts']} | {r['generated_tokens']} "
                     f"| {r['seconds']:.1f} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.1f} "
                     f"| {r['engine_start_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 prompts × ≤64 tokens (else 128 × ≤128)")
    ap.add_argument("--job", default=str(ROOT / "cluster/jobs/local.yaml"), help="job YAML (target, sampling)")
    ap.add_argument("--target", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--dtype", default=None, help="override target.dtype (auto, float32, bfloat16)")
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", type=int, default=None, help="prompts per call (default: prompts / 4)")
    ap.add_argument("--out", required=True, help="write the JSON results here")
    args = ap.parse_args(argv)

    n, max_tokens = (32, 64) if args.quick else (128, 128)
    sets = [f"target.model={args.target}", f"generate.num_prompts={n}", f"generate.max_tokens={max_tokens}"]
    if args.dtype:
        sets.append(f"target.dtype={args.dtype}")
    cfg = load_config(args.job if Path(args.job).exists() else None, sets)
    shard_size = args.shard_size or max(1, n // 4)

    from actors.generate import build_prompts
    from draftalign.models import load_tokenizer, resolve_target
    from draftalign.runtime import configure_vllm_env, init_ray

    model_path = resolve_target(cfg.target.model)
    prompts, _ = build_prompts(cfg, load_tokenizer(model_path))
    cores = os.cpu_count() or 1
    configure_vllm_env(cfg.target.kv_cache_gib)
    ray = init_ray(cfg, num_cpus=cores)
    load_before = os.getloadavg()
    rows = []
    try:
        for e in args.engines:
            rows.append(run_arm(cfg, model_path, prompts, e, max(1, cores // e), shard_size))
            print(f"engines={e}: {rows[-1]['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    result = {
        "benchmark": "generate_throughput", "quick": args.quick, "target": cfg.target.model,
        "dtype": cfg.target.dtype, "cores": cores, "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "sampling": {"temperature": cfg.generate.temperature, "top_p": cfg.generate.top_p,
                     "max_tokens": max_tokens},
        "shard_size": shard_size, "results": rows,
    }
    print(format_table(rows))
    write_json_atomic(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
