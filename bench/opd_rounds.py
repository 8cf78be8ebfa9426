"""Where a target-assisted rollout batch's time goes (issue #38 item 3), in steady state.

A job's stage-1 draft (`<run_dir>/draft_pretrained/`, its draft vocabulary) and distillation set, one vLLM
`TargetActor` and one `AssistedRolloutActor` with the job's rollout settings (at T = 0 on a greedy set the rounds
come from the stored answers, as in stage 3, unless --engine-rounds) (rollout.batch_size prompts,
rollout.max_new_tokens, γ = rollout.gamma, re-drafts); `--batches` batches of the same prompts, the first a warm-up.
Per batch: wall time, the actor's wait on the target, the engine's busy time, rounds (one vLLM call each), proposals,
acceptances, committed tokens, tokens per call (whole sequences) and how many came from the prefix cache.

    python bench/opd_rounds.py cluster/jobs/local.yaml --temperature 1.0 --out bench/results/opd/rounds_t1.json

The per-round cost against the learner's step time says how far target-assisted rollouts are from keeping the
learner busy (the replay arm's rollouts make ≈ 1,300 tok/s with the learner the bottleneck).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402

ACTOR = ("rounds", "stored_rounds", "proposed", "accepted", "redrafts", "committed", "target_positions")
ENGINE = ("calls", "tokens", "cached_tokens", "rescored", "busy_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job")
    ap.add_argument("--temperature", type=float, default=None, help="rollout temperature (default: the job's)")
    ap.add_argument("--batches", type=int, default=3, help="batches timed after one warm-up")
    ap.add_argument("--set", action="append", default=[], help="job overrides, key=value")
    ap.add_argument("--engine-rounds", action="store_true",
                    help="at T = 0 on a greedy set, score the rounds with the engine anyway (not from the set)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import ray

    from actors.assisted import AssistedRolloutActor
    from actors.target import create_target_actors, shutdown_target_actors
    from draftalign.distset import set_sampling
    from draftalign.evaluate import machine
    from draftalign.models import resolve_target
    from draftalign.vocab import job_draft_vocab
    from learner.distill import load_split

    cfg = load_config(args.job, args.set)
    if cfg.target.block_size is None:
        cfg.target.block_size = 32  # as bench/opd.py's target-assisted arms
    r = cfg.rollout
    T = r.temperature if args.temperature is None else args.temperature
    rdir = cfg.run_path
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows, _ = load_split(rdir, cfg.target.max_model_len, 16)
        stored_greedy = not args.engine_rounds and set_sampling(rdir).get("temperature") == 0
        [engine] = create_target_actors(cfg, resolve_target(cfg.target.model))
        actor = AssistedRolloutActor.options(num_cpus=0).remote(
            0, str(rdir / "draft_pretrained"), rows, [engine], None, None, on_policy_fraction=1.0, temperature=T,
            max_new_tokens=r.max_new_tokens, batch_size=r.batch_size, top_k=cfg.target.top_k_logprobs, seed=cfg.seed,
            max_model_len=cfg.target.max_model_len, gamma=r.gamma, redrafts_per_sequence=r.redrafts_per_sequence,
            redraft_temperature=r.redraft_temperature, draft_vocab=job_draft_vocab(cfg, rdir),
            stored_greedy=stored_greedy)
        prompts = [list(row["prompt_token_ids"]) for row in rows[:r.batch_size]]
        batches = []
        for i in range(args.batches + 1):
            s0, e0 = ray.get(actor.stats.remote()), ray.get(engine.score_stats.remote())
            t0 = time.perf_counter()
            _, _, target_s = ray.get(actor.rollout.remote(prompts, f"b{i}", rows[:r.batch_size]))
            wall = time.perf_counter() - t0
            s1, e1 = ray.get(actor.stats.remote()), ray.get(engine.score_stats.remote())
            b = {"warm_up": i == 0, "wall_s": round(wall, 2), "target_wait_s": round(target_s, 2),
                 **{k: s1[k] - s0[k] for k in ACTOR}, **{f"engine_{k}": e1[k] - e0[k] for k in ENGINE}}
            b["acceptance"] = b["accepted"] / max(b["proposed"], 1)
            b["committed_tok_per_s"] = b["committed"] / wall
            b["engine_s_per_call"] = b["engine_busy_s"] / max(b["engine_calls"], 1)
            calls = max(b["engine_calls"], 1)
            b["prefilled_tokens_per_call"] = (b["engine_tokens"] - b["engine_cached_tokens"]) / calls
            batches.append(b)
            print(f"batch {i}{' (warm-up)' if i == 0 else ''}: {wall:.1f} s, target {target_s:.1f} s, "
                  f"{b['rounds']} rounds, α {b['acceptance']:.3f}, {b['committed_tok_per_s']:.1f} committed tok/s, "
                  f"{b['engine_s_per_call'] * 1e3:.0f} ms / call, {b['prefilled_tokens_per_call']:.0f} prefilled "
                  f"+ {b['engine_cached_tokens'] / max(b['engine_calls'], 1):.0f} cached tokens / call", flush=True)
        shutdown_target_actors([engine])
    finally:
        ray.shutdown()
    timed = [b for b in batches if not b["warm_up"]]
    mean = {k: sum(b[k] for b in timed) / len(timed) for k in ("wall_s", "target_wait_s", "rounds", "acceptance",
                                                                "committed_tok_per_s", "engine_s_per_call",
                                                                "prefilled_tokens_per_call")}
    write_json_atomic(args.out, {
        "issue": 38, "what": "target-assisted rollout batches in steady state (bench/opd_rounds.py)",
        "job": args.job, "overrides": args.set, "run_dir": str(rdir), "temperature": T, "gamma": r.gamma,
        "batch_size": r.batch_size, "max_new_tokens": r.max_new_tokens, "top_k": cfg.target.top_k_logprobs,
        "block_size": cfg.target.block_size, "stored_greedy": stored_greedy, "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mean": mean, "batches": batches})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
