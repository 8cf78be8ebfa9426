"""Serving load benchmark: the speculative endpoints against a target-only endpoint, same load.

The endpoints are the same Ray Serve application (`serve.app.build_app`): with the draft and γ chosen
per round by expected goodput (`serve.gamma_policy: goodput`, the default; `serve.goodput`), with the
draft and a fixed γ, and with `draft_path=None`, deployed side by side on one Serve instance (`/spec`,
`/fixed`, `/base`). Each round loads one endpoint after the other, the order rotating from round to
round, so slow drifts in machine load hit every arm; the 1-minute load average around every run is
recorded and a warning printed when it exceeded the core count + 1 (the loaded replica itself keeps
every core busy). The load:
for each concurrency level N (default 1, 4 and 16 clients) the async openai client sends the same R
chat completions of held-out chat prompts over loopback, split among N concurrent clients, greedy,
fixed max_tokens. Reported per level and arm: p50 / p99 request latency,
completion tokens/s over the wall time of the load, requests/s, errors, the acceptance rates over
all requests (per-token α = accepted / (accepted + rejected) and draft acceptance = accepted /
proposed, as in `serve.acceptance`; α is None when the engine does not count rejections, as with
vLLM) and tokens per target pass, the largest engine batch, and greedy mismatches between the arms
(speculative decoding must not change the text).

With an untrained draft the speculative endpoint can be slower than the baseline: the harness is
the point; train a draft (`draftalign distill`) to see a speedup.

    .venv/bin/python bench/serve_load.py [--quick] [--job J.yaml] [--draft D] [--clients 1 4 16] --out F.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clients import QUIET, free_port, run_clients  # noqa: E402
from draftalign.config import load_config  # noqa: E402
from draftalign.data import chat_messages  # noqa: E402
from draftalign.evaluate import machine  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from serve.acceptance import draft_acceptance, per_token_acceptance  # noqa: E402

ARMS = ("spec", "fixed", "base")  # goodput γ, fixed γ, target only
SPEC_ARMS = ARMS[:-1]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def _load(base_url: str, model: str, prompts: list[list[dict]], clients: int, per_client: int,
                max_tokens: int) -> dict:
    """N clients × M sequential requests each (client i: prompts i·M … i·M + M − 1, wrapping); per-request
    records and the wall time."""
    assignment = [[(i * per_client + j) % len(prompts) for j in range(per_client)] for i in range(clients)]
    return await run_clients(base_url, model, prompts, assignment, max_tokens, timeout=600)


def _summary(runs: list[dict]) -> dict:
    recs = [r for run in runs for r in run["records"]]
    ok = [r for r in recs if "error" not in r]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    wall = sum(run["wall_s"] for run in runs)
    proposed, accepted = sum(r["proposed"] for r in ok), sum(r["accepted"] for r in ok)
    rejected = None if any(r["rejected"] is None for r in ok) else sum(r["rejected"] for r in ok)
    rounds = sum(r["rounds"] for r in ok)
    return {"mean_gamma": proposed / rounds if rounds else 0.0,"requests": len(recs), "errors": len(recs) - len(ok),
            "error_examples": [r["error"] for r in recs if "error" in r][:3],
            "p50_latency_s": _pct(lat, 0.5), "p99_latency_s": _pct(lat, 0.99),
            "mean_latency_s": statistics.fmean(lat) if lat else float("nan"),
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "requests_per_s": len(ok) / wall if wall else 0.0,
            "accepted": accepted, "rejected": rejected, "proposed": proposed,
            "acceptance_rate": None if rejected is None else per_token_acceptance(accepted, rejected),
            "draft_acceptance_rate": draft_acceptance(accepted, proposed),
            "tokens_per_target_pass": tokens / rounds if rounds else 0.0,
            "max_batch_size": max((r["batch_size"] for r in ok), default=0),
            "loadavg_1m": [x for run in runs for x in run["loadavg_1m"]]}


def _tokens(run: dict) -> int:
    return sum(r["completion_tokens"] for r in run["records"] if "error" not in r)


def _level(clients: int, runs: dict[str, list[dict]]) -> dict:
    """One concurrency level: every arm's summary, each speculative arm's speedup in tokens/s over the target-only
    arm and its greedy mismatches against it."""
    arms = {arm: _summary(runs[arm]) for arm in ARMS}
    for arm in ARMS:
        arms[arm]["tokens_per_s_rounds"] = [_tokens(run) / run["wall_s"] for run in runs[arm]]
    texts = {arm: {(i, rec["prompt"]): rec["text"] for i, run in enumerate(runs[arm]) for rec in run["records"]
                   if "error" not in rec} for arm in ARMS}
    base = arms["base"]["tokens_per_s"]
    for arm in SPEC_ARMS:
        shared = texts[arm].keys() & texts["base"].keys()
        arms[arm]["speedup_tokens_per_s"] = arms[arm]["tokens_per_s"] / base if base else None
        arms[arm]["greedy_mismatches"] = sum(texts[arm][k] != texts["base"][k] for k in shared)
        arms[arm]["greedy_compared"] = len(shared)
    return {"clients": clients, "arms": arms, "speedup_tokens_per_s": arms["spec"]["speedup_tokens_per_s"]}


def _draft_path(cfg, draft: str | None, tmp: str) -> tuple[str, str]:
    """(path, label): --draft, else the job's newest trained draft, else a fresh untrained one."""
    from draftalign.models import (
        ModelError,
        build_draft,
        default_draft,
        load_tokenizer,
        resolve_target,
        save_pretrained_atomic,
    )

    if draft:
        return str(Path(draft).expanduser().resolve()), draft
    try:
        path = default_draft(cfg)
        return path, path
    except ModelError:
        tok = load_tokenizer(resolve_target(cfg.target.model))
        dest = Path(tmp) / "untrained-draft"
        save_pretrained_atomic(build_draft(cfg.draft.arch, tok, seed=cfg.seed), tok, dest)
        return str(dest), "untrained (fresh draft.arch; no trained draft in the run dir)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--target", default=None, help="target model (overrides target.model)")
    ap.add_argument("--draft", default=None, help="draft path (default: the job's newest trained draft, else "
                                                   "a fresh untrained one)")
    ap.add_argument("--clients", type=int, nargs="+", default=None,
                    help="concurrency levels (quick: 8; else 1 4 16)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level and round, split among the clients (quick 16, else 32)")
    ap.add_argument("--max-tokens", type=int, default=None, help="completion tokens (quick 32, else 64)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per arm, order alternating (default 2)")
    ap.add_argument("--gamma", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small load: a few minutes on 2 cores")
    ap.add_argument("--out", default="runs/bench/serve_load.json",
                    help="JSON to write (default under runs/; committed results take an explicit bench/results/ path)")
    args = ap.parse_args()

    quick = {"clients": [8], "requests": 16, "max_tokens": 32, "rounds": 2}
    full = {"clients": [1, 4, 16], "requests": 32, "max_tokens": 64, "rounds": 2}
    knobs = {k: getattr(args, k) if getattr(args, k) is not None else (quick if args.quick else full)[k]
             for k in quick}
    overrides = [f"serve.max_tokens_cap={max(knobs['max_tokens'], 1)}"]
    if args.target:
        overrides.append(f"target.model={args.target}")
    if args.gamma:
        overrides.append(f"serve.gamma={args.gamma}")
    cfg = load_config(args.job if Path(args.job).exists() else None, overrides)
    # Both replicas exist at once but only one is loaded at a time: each may use every core.
    cfg.serve.cpus_per_replica = 1
    cores = os.cpu_count() or 1

    import ray
    from ray import serve

    from draftalign.models import resolve_target
    from draftalign.runtime import init_ray
    from serve.app import build_app

    prompts = [m["messages"] for m in chat_messages("eval", knobs["requests"], seed=1)]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        target = resolve_target(cfg.target.model)
        draft, draft_label = _draft_path(cfg, args.draft, tmp)
        print(f"bench: target={cfg.target.model} draft={draft_label} gamma={cfg.serve.gamma} "
              f"dtype={cfg.target.dtype} clients={knobs['clients']} requests/level={knobs['requests']} "
              f"max_tokens={knobs['max_tokens']} rounds={knobs['rounds']} torch_threads={cores}", flush=True)
        port = free_port()
        init_ray(cfg, num_cpus=max(len(ARMS), cores))  # one logical CPU per replica
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
            t0 = time.perf_counter()
            serve.run(build_app(cfg, target, draft, torch_threads=cores), name="spec", route_prefix="/spec",
                      logging_config=QUIET)
            fixed = cfg.model_copy(deep=True)
            fixed.serve.gamma_policy = "fixed"
            serve.run(build_app(fixed, target, draft, torch_threads=cores), name="fixed", route_prefix="/fixed",
                      logging_config=QUIET)
            serve.run(build_app(cfg, target, None, torch_threads=cores), name="base", route_prefix="/base",
                      logging_config=QUIET)
            print(f"deployed the endpoints in {time.perf_counter() - t0:.1f} s", flush=True)
            urls = {arm: f"http://127.0.0.1:{port}/{arm}/v1" for arm in ARMS}
            model = cfg.serve.model_name
            for arm in ARMS:  # warm-up: first-call costs stay out of the numbers
                asyncio.run(_load(urls[arm], model, prompts[:1], 1, 1, 4))
            runs = {(n, arm): [] for n in knobs["clients"] for arm in ARMS}
            for n in knobs["clients"]:
                per_client = max(1, knobs["requests"] // n)
                for r in range(knobs["rounds"]):
                    for arm in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:
                        load_before = os.getloadavg()[0]
                        run = asyncio.run(_load(urls[arm], model, prompts, n, per_client, knobs["max_tokens"]))
                        run["loadavg_1m"] = [load_before, os.getloadavg()[0]]
                        runs[n, arm].append(run)
                        print(f"{n} clients, round {r} {arm}: {len(run['records'])} requests in "
                              f"{run['wall_s']:.1f} s, {_tokens(run) / run['wall_s']:.1f} tokens/s "
                              f"(1-min load average {load_before:.1f} -> {run['loadavg_1m'][1]:.1f})", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    levels = [_level(n, {arm: runs[n, arm] for arm in ARMS}) for n in knobs["clients"]]
    result = {"target": cfg.target.model, "draft": draft_label, "gamma": cfg.serve.gamma, "dtype": cfg.target.dtype,
              "engine": cfg.serve.engine, "max_batch_size": cfg.serve.max_batch_size, **knobs,
              "machine": machine(), "levels": levels}

    names = {"spec": f"speculative, goodput γ ≤ {cfg.serve.gamma}", "fixed": f"speculative, γ = {cfg.serve.gamma}",
             "base": "target only"}
    print("\n| clients | endpoint | requests | errors | p50 latency s | p99 latency s | tokens/s (per round) | "
          "α (per token) | mean γ | tokens/target pass | max batch | speedup | greedy mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        for arm in ARMS:
            a = lv["arms"][arm]
            alpha = "n/a" if a["acceptance_rate"] is None else f"{a['acceptance_rate']:.3f}"
            rounds = ", ".join(f"{x:.1f}" for x in a["tokens_per_s_rounds"])
            speed = f"{a['speedup_tokens_per_s']:.2f}x" if a.get("speedup_tokens_per_s") else ""
            wrong = f"{a['greedy_mismatches']} / {a['greedy_compared']}" if arm in SPEC_ARMS else ""
            print(f"| {lv['clients']} | {names[arm]} | {a['requests']} | {a['errors']} | {a['p50_latency_s']:.2f} | "
                  f"{a['p99_latency_s']:.2f} | {a['tokens_per_s']:.1f} ({rounds}) | {alpha} | {a['mean_gamma']:.2f} | "
                  f"{a['tokens_per_target_pass']:.2f} | {a['max_batch_size']} | {speed} | {wrong} |")
    busiest = max(x for lv in levels for a in lv["arms"].values() for x in a["loadavg_1m"])
    if busiest > cores + 1:  # the loaded replica alone accounts for ≈ `cores` (its torch threads)
        print(f"WARNING: the 1-min load average reached {busiest:.1f} on {cores} cores during the load: "
              f"other processes shared the CPU, so the timings are noisy")
    result["max_loadavg_1m"] = busiest
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
