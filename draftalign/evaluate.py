"""`draftalign eval`: acceptance rate, block efficiency and wall-clock speedup per task and γ.

Spec-Bench practice: batch 1, the same engine and prompts for both arms (target-only decoding and
speculative decoding), tokens/s over the whole prompt set. Definitions (REFERENCES.md):

* acceptance_rate α̂ = accepted draft tokens / proposed draft tokens;
* block_efficiency τ = emitted tokens / target forward passes;
* expected_block_efficiency = (1 − α̂^(γ+1)) / (1 − α̂), the i.i.d.-acceptance prediction;
* cost_ratio_c = time of one draft step / time of one target decoding step (measured);
* speedup = speculative tokens/s ÷ target-only tokens/s (bound: τ / (γ·c + 1)).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from draftalign.config import JobConfig
from draftalign.data import chat_prompt_ids, eval_messages
from draftalign.models import (
    build_draft,
    load_causal_lm,
    load_draft,
    load_tokenizer,
    newest_trained_draft,
    pick_dtype,
    resolve_target,
)
from serve.sampling import SamplingParams
from serve.specdec import Generation, SpecDecoder

METRICS = ("n_prompts", "acceptance_rate", "block_efficiency", "expected_block_efficiency", "cost_ratio_c",
           "target_tokens_per_s", "spec_tokens_per_s", "speedup")


def expected_block_efficiency(alpha: float, gamma: int) -> float:
    """E[τ] = (1 − α^(γ+1)) / (1 − α) under i.i.d. acceptance α (γ + 1 when α = 1)."""
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def default_draft(cfg: JobConfig) -> str:
    """cfg.draft.model, else the newest trained draft of the job's run directory, else 'new'."""
    found = newest_trained_draft(cfg.run_path)
    return cfg.draft.model or (str(found) if found else "new")


def load_pair(cfg: JobConfig, draft: str | None):
    """(target, draft, tokenizer, target_path, draft_name) in the job's dtype, tokenizers checked."""
    target_path = resolve_target(cfg.target.model)
    tok = load_tokenizer(target_path)
    dtype = pick_dtype(cfg.target.dtype)
    target = load_causal_lm(target_path, dtype)
    draft = draft or default_draft(cfg)
    if draft == "new":
        model = build_draft(cfg.draft.arch, tok, target, cfg.draft.init, cfg.draft.copy_layers, cfg.seed).to(dtype)
    else:
        model = load_draft(draft, tok, dtype, target_vocab=target.config.vocab_size)
    return target, model, tok, target_path, draft


def _row(sums: dict, gamma: int) -> dict:
    """Metrics of one (task, γ) cell from raw sums, so aggregates are ratios of sums, not means of ratios."""
    alpha = sums["accepted"] / sums["proposed"] if sums["proposed"] else 0.0
    spec_tps = sums["tokens"] / sums["spec_s"] if sums["spec_s"] else 0.0
    base_tps = sums["base_tokens"] / sums["base_s"] if sums["base_s"] else 0.0
    draft_step = sums["draft_s"] / sums["draft_steps"] if sums["draft_steps"] else 0.0
    target_step = sums["target_s"] / sums["target_steps"] if sums["target_steps"] else 0.0
    return {
        "n_prompts": sums["n"],
        "acceptance_rate": alpha,
        "block_efficiency": sums["tokens"] / sums["rounds"] if sums["rounds"] else 0.0,
        "expected_block_efficiency": expected_block_efficiency(alpha, gamma),
        "cost_ratio_c": draft_step / target_step if target_step else 0.0,
        "target_tokens_per_s": base_tps,
        "spec_tokens_per_s": spec_tps,
        "speedup": spec_tps / base_tps if base_tps else 0.0,
        "acceptance_per_position": [a / sums["rounds"] if sums["rounds"] else 0.0 for a in sums["per_position"]],
        "generated_tokens": sums["tokens"],
    }


def _sums(gens: list[Generation], spec_s: float, timing, base: dict) -> dict:
    return {"n": len(gens), "tokens": sum(len(g.token_ids) for g in gens), "rounds": sum(g.rounds for g in gens),
            "proposed": sum(g.proposed for g in gens), "accepted": sum(g.accepted for g in gens),
            "per_position": [sum(x) for x in zip(*(g.accepted_per_position for g in gens))],
            "spec_s": spec_s, "draft_s": timing.draft_s, "draft_steps": timing.draft_steps, **base}


def eval_prompts(tok, cfg: JobConfig, max_positions: int) -> dict[str, list[list[int]]]:
    """Held-out prompt token ids per task, dropping prompts that leave no room to generate."""
    ev = cfg.eval
    limit = min(cfg.target.max_model_len, max_positions) - ev.max_new_tokens - max(ev.gamma) - 1
    return {task: [ids for m in eval_messages(task, ev.prompts_per_task, cfg.seed)
                   if len(ids := chat_prompt_ids(tok, m["messages"])) <= limit]
            for task in ev.tasks}


def baseline_key(cfg: JobConfig, prompts: dict[str, list[list[int]]], dtype) -> str:
    """Fingerprint of the target-only arm: target, dtype, sampling settings and the exact prompt ids."""
    ev = cfg.eval
    blob = json.dumps([cfg.target.model, str(dtype), cfg.seed, ev.temperature, ev.top_p, ev.top_k,
                       ev.max_new_tokens, prompts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate_pair(target, draft, tok, cfg: JobConfig, progress: bool = True, baseline: dict | None = None) -> dict:
    """Both arms, every task and γ, batch 1. Returns {"by_gamma": {γ: {"tasks", "overall"}}, "lossless_greedy",
    "baseline"}. `baseline` (a previous result's "baseline" with the same `baseline_key`) skips re-timing
    the target-only arm: its token ids and timings are reused, so two drafts share one denominator."""
    ev = cfg.eval
    params = SamplingParams(temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k,
                            max_new_tokens=ev.max_new_tokens, seed=cfg.seed)
    prompts = eval_prompts(tok, cfg, target.config.max_position_embeddings)
    key = baseline_key(cfg, prompts, next(target.parameters()).dtype)
    if baseline is not None and baseline.get("key") != key:
        baseline = None
    engine = SpecDecoder(target, draft, tok, gamma=ev.gamma[0])
    # warm-up: first-call overheads (allocator, thread pool, KV-cache growth) stay out of the
    # timings; a 4-token warm-up was too short (the first timed task ran at a third of its speed)
    warm, warm_params = next(iter(prompts.values()))[:1], SamplingParams(max_new_tokens=min(32, ev.max_new_tokens))
    for _ in range(2):  # one round left the first timed task (chat) ≈ 8% slower than the others
        engine.generate(warm, warm_params)
        if baseline is None:
            engine.generate_target_only(warm, warm_params)

    checked = mismatches = 0
    by_gamma: dict[int, dict] = {g: {"tasks": {}} for g in ev.gamma}
    sums: dict[int, dict[str, dict]] = {g: {} for g in ev.gamma}
    measured = {"key": key, "measured_at": time.time(), "tasks": {}}
    for task, ids in prompts.items():
        if baseline is not None:
            base_ids, base_stats = baseline["tasks"][task]["token_ids"], baseline["tasks"][task]["stats"]
        else:
            engine.timing.__init__()
            t0 = time.perf_counter()
            base_ids = [g.token_ids for g in (engine.generate_target_only([p], params)[0] for p in ids)]
            base_s = time.perf_counter() - t0
            base_stats = {"base_tokens": sum(map(len, base_ids)), "base_s": base_s,
                          "target_s": engine.timing.target_s, "target_steps": engine.timing.target_steps}
        measured["tasks"][task] = {"token_ids": base_ids, "stats": base_stats}
        for gamma in ev.gamma:
            engine.timing.__init__()
            t0 = time.perf_counter()
            spec = [engine.generate([p], params, gamma=gamma)[0] for p in ids]
            spec_s = time.perf_counter() - t0
            sums[gamma][task] = _sums(spec, spec_s, engine.timing, base_stats)
            row = by_gamma[gamma]["tasks"][task] = _row(sums[gamma][task], gamma)
            if params.greedy:
                checked += len(ids)
                mismatches += sum(a != b.token_ids for a, b in zip(base_ids, spec))
            if progress:
                print(f"  {task:<10} γ={gamma}  τ={row['block_efficiency']:.2f}  α={row['acceptance_rate']:.3f}  "
                      f"speedup={row['speedup']:.2f}x", flush=True)
    for g, block in by_gamma.items():
        cells = list(sums[g].values())
        total = {k: (sum(c[k] for c in cells) if k != "per_position"
                     else [sum(x) for x in zip(*(c[k] for c in cells))]) for k in cells[0]}
        block["overall"] = _row(total, g)
    return {"by_gamma": by_gamma, "lossless_greedy": {"checked": checked, "mismatches": mismatches},
            "baseline": baseline or measured, "baseline_reused": baseline is not None}


def format_table(result: dict) -> str:
    cols = ("task", "γ", "n", "α", "τ", "E[τ]", "c", "target tok/s", "spec tok/s", "speedup")
    rows = []
    for g, block in result["by_gamma"].items():
        for task, r in [*block["tasks"].items(), ("overall", block["overall"])]:
            rows.append((task, str(g), str(r["n_prompts"]), f"{r['acceptance_rate']:.3f}",
                         f"{r['block_efficiency']:.2f}", f"{r['expected_block_efficiency']:.2f}",
                         f"{r['cost_ratio_c']:.3f}", f"{r['target_tokens_per_s']:.1f}",
                         f"{r['spec_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    lg = result["lossless_greedy"]
    out.append(f"lossless greedy: {lg['checked']} prompts checked, {lg['mismatches']} mismatches")
    return "\n".join(out)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None  # absent or torn: measure again


def run_eval(cfg: JobConfig, draft: str | None = None, out: Path | str | None = None,
             baseline: Path | str | None = None) -> dict:
    """Evaluate `draft` (path, 'new', or the job's newest trained draft) against the job's target.

    `baseline`: a file holding the target-only arm. Reused when it matches this target, dtype, sampling
    settings and prompts (`baseline_key`); otherwise the arm is measured and the file (re)written.
    """
    torch.manual_seed(cfg.seed)
    target, draft_model, tok, target_path, draft_name = load_pair(cfg, draft)
    print(f"eval: target={cfg.target.model} draft={draft_name} γ={cfg.eval.gamma} "
          f"T={cfg.eval.temperature} dtype={next(target.parameters()).dtype}", flush=True)
    baseline = Path(baseline) if baseline is not None else None
    res = evaluate_pair(target, draft_model, tok, cfg, baseline=_read_json(baseline))
    if baseline is not None and not res["baseline_reused"]:
        _write_json(baseline, res["baseline"])
    elif res["baseline_reused"]:
        print(f"eval: target-only arm reused from {baseline}", flush=True)
    first = cfg.eval.gamma[0]
    result = {"target": cfg.target.model, "draft": draft_name, "gamma": first,
              "temperature": cfg.eval.temperature, "tasks": res["by_gamma"][first]["tasks"],
              "overall": res["by_gamma"][first]["overall"],
              "by_gamma": {str(g): b for g, b in res["by_gamma"].items()},
              "lossless_greedy": res["lossless_greedy"], "max_new_tokens": cfg.eval.max_new_tokens,
              "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
              "target_only": {"key": res["baseline"]["key"], "reused": res["baseline_reused"],
                              "measured_at": res["baseline"]["measured_at"]}}
    print(format_table({"by_gamma": res["by_gamma"], "lossless_greedy": res["lossless_greedy"]}), flush=True)
    if out is not None:
        _write_json(Path(out), result)
        print(f"wrote {out}")
    return result
