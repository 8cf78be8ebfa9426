"""Train–serve parity: one draft's block efficiency τ in draftalign's engine, in vLLM, and as training estimated it.

Same draft, prompts and γ, greedy (T = 0); the engine one prompt at a time (the eval's setting), vLLM all at once:
- `tau_engine`   draftalign's engine (`serve.specdec.SpecDecoder`) with the draft as trained (its own vocabulary);
- `tau_vllm`     the draft exported exactly (`serve.export`: hf → `draft_model`, an FSPAD head → EAGLE-1) and decoded
                 by vLLM's own speculative decoding (`serve.engines.VLLMEngine`), from its counters' deltas;
- `tau_train_estimate`  the held-out greedy acceptance its training stage recorded, as E[τ]: per draft position
                 when recorded (the FSPAD stage's `heldout_greedy_acceptance_k`), else i.i.d. α.
Both served τ are 1 + accepted / drafts (vLLM's mean acceptance length; drafts = rounds that drafted γ tokens).
`greedy_mismatches` counts prompts whose vLLM output differs from the engine's (both must be the target's own). A draft
no vLLM format expresses exactly (`serve.export`) gets `tau_vllm` null and the reason in `vllm_refused`.
Goals (issue #34): |Δτ| ≤ 5% engine vs vLLM, ≤ 10% training estimate vs served.

    .venv/bin/python bench/parity.py cluster/jobs/local.yaml --draft runs/local/draft_distilled --gamma 3 \\
        --prompts 16 --out bench/results/parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.io import read_json, write_json_atomic  # noqa: E402
from draftalign.models import resolve_target  # noqa: E402
from draftalign.sampling import SamplingParams  # noqa: E402
from serve.acceptance import expected_block_efficiency  # noqa: E402
from serve.export import ExportRefused  # noqa: E402

TRAIN_STATS = ("distill_done.json", "fspad_done.json")  # where a run dir's training stage records held-out α


def mean_acceptance_length(accepted: int, drafts: int) -> float:
    """τ = 1 + accepted / drafts (vLLM's mean acceptance length; 1 when nothing was drafted)."""
    return 1.0 + accepted / drafts if drafts else 1.0


def expected_tau(alphas: list[float], gamma: int) -> float:
    """E[τ] = 1 + Σ_{k=1..γ} Π_{j≤k} α_j, α_j the acceptance at draft position j given the ones before were accepted
    (positions past the list repeat its last α); one α gives (1 − α^(γ+1)) / (1 − α)."""
    if len(alphas) == 1:
        return expected_block_efficiency(alphas[0], gamma)
    tau, run = 1.0, 1.0
    for k in range(gamma):
        run *= alphas[min(k, len(alphas) - 1)]
        tau += run
    return tau


def train_estimate(stats: dict | None, gamma: int) -> float | None:
    """E[τ] from a training stage's held-out greedy acceptance (None when the stats hold none)."""
    if not stats or stats.get("heldout_greedy_acceptance") is None:
        return None
    alphas = [stats["heldout_greedy_acceptance"]]
    k = 2
    while stats.get(f"heldout_greedy_acceptance_{k}") is not None:
        alphas.append(stats[f"heldout_greedy_acceptance_{k}"])
        k += 1
    return expected_tau(alphas, gamma)


def find_train_stats(draft: str | Path) -> dict | None:
    """The training stage's record next to a draft (runs/<job>/draft_distilled → runs/<job>/distill_done.json)."""
    for name in TRAIN_STATS:
        stats = read_json(Path(draft).expanduser().resolve().parent / name)
        if stats is not None:
            return stats
    return None


@torch.no_grad()
def engine_run(target, draft, vocab, tok, prompts: list[list[int]], gamma: int, max_new_tokens: int) -> dict:
    """Greedy speculative decoding in draftalign's engine, batch 1: {"outputs", "accepted", "drafts", "tau"}."""
    from serve.specdec import SpecDecoder

    decoder = SpecDecoder(target, draft, tok, gamma=gamma, draft_vocab=vocab)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs, accepted, drafts = [], 0, 0
    for p in prompts:
        (g,) = decoder.generate([p], params)
        outputs.append(list(g.token_ids))
        accepted += g.accepted
        drafts += g.proposed // gamma
    return {"outputs": outputs, "accepted": accepted, "drafts": drafts,
            "tau": mean_acceptance_length(accepted, drafts)}


def vllm_run(target_path: str, draft: str | None, prompts: list[list[int]], gamma: int, max_new_tokens: int,
             dtype: str = "float32", threads: int = 2, context: int = 1024) -> dict:
    """Greedy decoding in vLLM (the target alone when `draft` is None; else the draft exported and served by vLLM's
    speculative decoding), every prompt in one call: {"outputs", "accepted", "drafts", "tau", "speculative_config"}."""
    from serve.engines import ReplicaSettings, VLLMEngine

    engine = VLLMEngine(target_path, draft, ReplicaSettings(engine="vllm", gamma=gamma, dtype=dtype,
                                                             torch_threads=threads), context)
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens)
        gens = engine.generate(prompts, params)  # one call: the counters are summed over the prompts anyway
    finally:
        engine.close()
    accepted, drafts = sum(g.accepted for g in gens), sum(g.rounds for g in gens)
    return {"outputs": [list(g.token_ids) for g in gens], "accepted": accepted, "drafts": drafts,
            "tau": mean_acceptance_length(accepted, drafts), "speculative_config": engine.speculative_config}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", nargs="?", default="cluster/jobs/local.yaml")
    ap.add_argument("--draft", required=True, help="a Llama draft or an FSPAD head (read only)")
    ap.add_argument("--gamma", type=int, action="append", help="γ (repeatable; default 3)")
    ap.add_argument("--task", default="chat", help="which eval task's held-out prompts")
    ap.add_argument("--prompts", type=int, default=16, help="at most the job's eval prompts of the task")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the job's eval.max_new_tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-stats", default=None, help="the training stage's JSON (default: next to the draft)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="bench/results/parity.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from draftalign.evaluate import eval_prompts, load_pair, machine
    from learner.fspad import is_fspad_head

    cfg = load_config(a.job, a.overrides)
    gammas = a.gamma or [3]
    cfg.eval.gamma = gammas
    max_new = a.max_new_tokens or cfg.eval.max_new_tokens
    cfg.eval.max_new_tokens = max_new
    target, draft, tok, vocab, _ = load_pair(cfg, a.draft)
    prompts = eval_prompts(tok, cfg, target.config.max_position_embeddings)[a.task][: a.prompts]
    stats = read_json(a.train_stats) if a.train_stats else find_train_stats(a.draft)
    fmt = "eagle" if is_fspad_head(a.draft) else "hf"
    m = machine()
    rows = []
    engine = {}
    for g in gammas:
        t0 = time.perf_counter()
        engine[g] = engine_run(target, draft, vocab, tok, prompts, g, max_new) | {"seconds": time.perf_counter() - t0}
    del target, draft
    for g in gammas:  # vLLM after the engine: its in-process core holds threads until closed
        t0 = time.perf_counter()
        try:
            served = vllm_run(resolve_target(cfg.target.model), a.draft, prompts, g, max_new, cfg.target.dtype,
                              a.threads, cfg.target.max_model_len)
        except ExportRefused as refused:  # no vLLM format expresses this draft exactly: the row says why
            served = {"tau": None, "outputs": None, "accepted": None, "drafts": None, "refused": str(refused)}
        served["seconds"] = time.perf_counter() - t0  # engine start included
        e = engine[g]
        mismatches = (None if served["outputs"] is None else
                      sum(x != y for x, y in zip(e["outputs"], served["outputs"], strict=True)))
        rows.append({"draft": str(a.draft), "format": fmt, "gamma": g, "task": a.task, "n_prompts": len(prompts),
                     "max_new_tokens": max_new, "tau_engine": round(e["tau"], 4), "tau_vllm": _round(served["tau"]),
                     "tau_train_estimate": _round(train_estimate(stats, g)),
                     "greedy_mismatches": mismatches, "engine_counts": {k: e[k] for k in ("accepted", "drafts")},
                     "vllm_counts": {k: served[k] for k in ("accepted", "drafts")}, "dtype": cfg.target.dtype,
                     "seconds": {"engine": round(e["seconds"], 1), "vllm": round(served["seconds"], 1)},
                     "machine": f"{m['cpu']} ({m['cores']} cores, {a.threads} threads)"}
                    | ({"vllm_refused": served["refused"]} if "refused" in served else {}))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        old = read_json(a.out) or {"rows": []}
        keep = [r for r in old["rows"] if (r["draft"], r["format"], r["gamma"], r.get("task")) not in
                {(r["draft"], r["format"], r["gamma"], r["task"]) for r in rows}]
        write_json_atomic(a.out, {"rows": keep + rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
