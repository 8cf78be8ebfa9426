"""`draftalign eval`: acceptance, block efficiency and wall-clock speedup per task and γ, for one or
more drafts against their target, measured in one interleaved run.

Spec-Bench practice: batch 1, the same engine and prompts for every arm. The arms — target-only
decoding and speculative decoding with each (draft, γ) — run **interleaved per prompt** (their order
rotating from one prompt to the next) in one process with a fixed thread count and no Ray workers
alive, so machine drift and background load fall on every arm alike; every speedup's numerator and
denominator come from the same prompts, minutes apart at most. Definitions (serve.acceptance):

* acceptance_rate α̂ = accepted / (accepted + rejected rounds), per-token (the α of E[τ]);
* draft_acceptance_rate = accepted / proposed (vLLM's counters);
* block_efficiency τ = emitted tokens / target passes; expected_block_efficiency E[τ] from α̂;
* step costs, in ms, measured in this run (prefill passes excluded): target step t₁ (target-only),
  verification pass t_v over γ + 1 tokens, draft step t_d; c = t_d / t₁, v = t_v / t₁;
* speedup = speculative tokens/s ÷ target-only tokens/s, next to its bound τ / (γc + v);
* intervals: 95% percentile bootstrap over prompts (ratios of sums recomputed on every resample);
* paired differences: for drafts measured at the same γ (or tree), Δ = this − other of τ, α and speedup with a
  bootstrap that resamples the *same* prompts for both arms — prompt difficulty cancels, so two drafts whose
  own intervals overlap can still be told apart (`paired` in each cell).

Greedy arms are checked token for token against the target-only arm on every prompt.

An `adaptive` entry of eval.gamma adds, per Llama draft, an arm `<name>@adaptive` that decodes as the served
engine does: each round's γ ≤ eval.gamma_max from the request's own acceptance and this engine's step costs,
measured at the start (`serve.goodput`; γ = 0 rounds are target steps). Its cells report the mean γ̄ drafted per
round (`mean_gamma`, γ = 0 rounds included; `target_only_rounds`) and put γ̄ in E[τ] and the bound (its v averages
its target steps and its verification passes); each is also paired with the same
draft's fixed-γ arms (Δ adaptive − fixed over the same prompts). FSPAD heads have no adaptive arm (fixed γ).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from draftalign.config import ADAPTIVE, JobConfig
from draftalign.data import chat_prompt_ids
from draftalign.io import write_json_atomic
from draftalign.models import (
    ModelError,
    build_draft,
    cpu_flags,
    default_draft,
    draft_step_dtype,
    load_causal_lm,
    load_target_tokenizer,
    pick_dtype,
    resolve_target,
)
from draftalign.sampling import SamplingParams
from draftalign.sources import eval_prompts as task_prompts
from draftalign.tree_shapes import DynamicTree, tree_depth, tree_spec
from learner.feature_heads import is_head
from learner.fspad import FSPADHead
from serve.acceptance import draft_acceptance, expected_block_efficiency, per_token_acceptance
from serve.drafts import load_engine_draft
from serve.goodput import GoodputPolicy
from serve.specdec import Generation, SpecDecoder

METRICS = ("n_prompts", "acceptance_rate", "draft_acceptance_rate", "block_efficiency",
           "expected_block_efficiency", "cost_ratio_c", "verify_cost_v", "target_tokens_per_s",
           "spec_tokens_per_s", "speedup", "speedup_bound")
BOOTSTRAP = 1000
WARMUP_ROUNDS = 2


def load_target(cfg: JobConfig):
    """(target model, tokenizer) in the job's dtype."""
    target_path = resolve_target(cfg.target.model)
    tok = load_target_tokenizer(target_path)
    return load_causal_lm(target_path, pick_dtype(cfg.target.dtype)), tok


def load_draft_for(cfg: JobConfig, target, tok, draft: str | None):
    """(draft model, its vocabulary or None, name) for a path, 'new', or None (the job's default draft,
    else a fresh one)."""
    if not draft:
        try:
            draft = default_draft(cfg)
        except ModelError:
            draft = "new"
    dtype = next(target.parameters()).dtype
    if draft == "new" and cfg.draft.kind == "fspad":
        return FSPADHead.from_target(target, seed=cfg.seed).eval(), None, draft
    if draft == "new" and cfg.draft.kind == "eagle3":
        from learner.eagle3 import EAGLE3Head

        return EAGLE3Head.from_target(target, aux_layers=cfg.draft.eagle3.aux_layers, seed=cfg.seed).eval(), None, draft
    if draft == "new":
        model = build_draft(cfg.draft.arch, tok, target, cfg.draft.init, cfg.draft.copy_layers, cfg.seed).to(dtype)
        return model, None, draft
    model, vocab = load_engine_draft(draft, target, tok, dtype)  # an HF-format Llama draft or an FSPAD head
    return model, vocab, draft


def load_pair(cfg: JobConfig, draft: str | None):
    """(target, draft, tokenizer, draft vocabulary, draft name), tokenizers checked."""
    target, tok = load_target(cfg)
    model, vocab, name = load_draft_for(cfg, target, tok, draft)
    return target, model, tok, vocab, name


def eval_prompts(tok, cfg: JobConfig, max_positions: int) -> dict[str, list[list[int]]]:
    """Held-out prompt token ids per task, dropping prompts that leave no room to generate."""
    ev = cfg.eval
    limit = min(cfg.target.max_model_len, max_positions) - ev.max_new_tokens - ev.longest_draft - 1
    return {task: [ids for m in task_prompts(cfg.data, task, ev.count(task), cfg.seed)
                   if len(ids := chat_prompt_ids(tok, m["messages"])) <= limit]
            for task in ev.tasks}


def machine() -> dict:
    """What the timings were measured on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = cpu_flags()
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "bf16_native": bool(flags & {"amx_bf16", "avx512_bf16"}), "amx": "amx_bf16" in flags,
            "torch": torch.__version__}


# ------------------------------------------------------------------------------ measuring

def tree_label(tree) -> str:
    """An arm's label for a token tree: [2, 2, 1] → "tree:2-2-1"; dynamic depth 5, topk 3, 12 nodes → "dtree:5-3-12"."""
    spec = tree_spec(tree)
    if isinstance(spec, DynamicTree):
        return f"dtree:{spec.depth}-{spec.topk}-{spec.nodes}"
    return "tree:" + "-".join(str(k) for k in spec)


def parse_tree_label(label: str) -> list[int] | DynamicTree | None:
    """The tree of a `tree_label`, None for a chain's γ label."""
    kind, _, shape = label.partition(":")
    if kind not in ("tree", "dtree") or not shape:
        return None
    ks = [int(k) for k in shape.split("-")]
    return DynamicTree(*ks) if kind == "dtree" else ks


def _record(g: Generation, seconds: float, engine: SpecDecoder) -> dict:
    t = engine.timing
    return {"tokens": len(g.token_ids), "seconds": seconds, "rounds": g.rounds, "accepted": g.accepted,
            "rejected": g.rejected, "proposed": g.proposed, "per_position": list(g.accepted_per_position),
            "histogram": list(g.accepted_histogram), "draft_s": t.draft_s, "draft_steps": t.draft_steps,
            "target_s": t.target_s, "target_steps": t.target_steps, "target_only_rounds": g.target_only_rounds,
            "token_ids": list(g.token_ids)}


def _run(engine: SpecDecoder, prompt: list[int], params: SamplingParams, gamma: int | None) -> dict:
    engine.timing.__init__()
    t0 = time.perf_counter()
    g = (engine.generate_target_only([prompt], params) if gamma is None
         else engine.generate([prompt], params, gamma=gamma))[0]
    return _record(g, time.perf_counter() - t0, engine)


def adaptive_engine(target, draft, tok, vocab, step_dtype, gamma_max: int) -> SpecDecoder:
    """An engine whose every round plays the served policy (`serve.goodput.GoodputPolicy`) on step costs measured
    here, at batch 1 (the eval's batch)."""
    engine = SpecDecoder(target, draft, tok, gamma=gamma_max, draft_vocab=vocab, draft_step_dtype=step_dtype)
    costs = engine.measure_step_costs(batch_sizes=(1,), repeats=15)  # ≈ 1 s idle; the ratios decide γ
    engine.policy = GoodputPolicy(costs, gamma_max=gamma_max)
    print(f"  adaptive γ ≤ {gamma_max}: measured t_T(rows) " + ", ".join(
        f"{r}: {1e3 * t:.1f}" for r, t in costs.target.items()) + f" ms, t_D {1e3 * costs.draft[1]:.1f} ms", flush=True)
    return engine


def measure(target, drafts: dict[str, tuple], tok, cfg: JobConfig, progress: bool = True,
            trees_for: set[str] | None = None) -> dict:
    """Every arm on every prompt, interleaved. drafts: {name: (model, vocabulary or None)}; eval.trees are
    measured for the drafts in `trees_for` (None: every draft); dynamic trees for FSPAD heads only.
    Returns {"prompts": {task: [ids]}, "records": {arm: {task: [record per prompt]}}} with arm
    "target" for target-only decoding and "<name>@<γ>" for speculative decoding; "step_costs": {arm: the
    measured costs its policy decides on} for the adaptive arms."""
    ev = cfg.eval
    params = SamplingParams(temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k,
                            max_new_tokens=ev.max_new_tokens, seed=cfg.seed)
    prompts = eval_prompts(tok, cfg, target.config.max_position_embeddings)
    base = SpecDecoder(target, None, tok)
    step = {name: draft_step_dtype(cfg.draft.step_dtype, next(model.parameters()).dtype)
            for name, (model, _) in drafts.items()}
    fixed = [g for g in ev.gamma if g != ADAPTIVE]
    engines = {name: SpecDecoder(target, model, tok, gamma=max(fixed, default=1), draft_vocab=vocab,
                                 draft_step_dtype=step[name])
               for name, (model, vocab) in drafts.items()}
    arms = [("target", base, None)]
    for name, (model, vocab) in drafts.items():
        for g in ev.gamma:
            if g != ADAPTIVE:
                arms.append((f"{name}@{g}", engines[name], g))
            elif not is_head(model):  # the policy measures Llama draft steps
                arms.append((f"{name}@{ADAPTIVE}", adaptive_engine(target, model, tok, vocab, step[name],
                                                                  ev.gamma_max), ev.gamma_max))
            elif not fixed:
                raise ValueError(f"draft {name!r} is a feature head, which drafts a fixed γ: eval.gamma={ev.gamma} "
                                 "leaves it no arm; add a fixed γ, e.g. [adaptive, 3]")
    arms += [(f"{name}@{tree_label(t)}", SpecDecoder(target, model, tok, draft_vocab=vocab, tree=tree_spec(t),
                                                      draft_step_dtype=step[name]), tree_depth(t))
             for name, (model, vocab) in drafts.items() for t in ev.trees if (trees_for is None or name in trees_for)
             and (is_head(model) or not isinstance(tree_spec(t), DynamicTree))]  # dynamic: feature heads only
    # warm-up: every arm, so the first timed prompt runs like the last (allocator, thread pool, caches)
    warm = next(iter(prompts.values()))[0]
    for _ in range(WARMUP_ROUNDS):
        for _, engine, g in arms:
            _run(engine, warm, params, g)
    records = {arm: {task: [] for task in prompts} for arm, _, _ in arms}
    for task, ids in prompts.items():
        for i, prompt in enumerate(ids):
            order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate: no arm always runs first
            for arm, engine, g in order:
                records[arm][task].append(_run(engine, prompt, params, g))
        if progress:
            base = _sums(records["target"][task])
            rows = {arm: _point(base, _sums(records[arm][task]), _gamma_of(arm)) for arm, _, _ in arms[1:]}
            print(f"  {task:<10} n={len(ids):<3} " + "  ".join(
                f"{arm}: τ={r['block_efficiency']:.2f} α={r['acceptance_rate']:.3f} "
                f"speedup={r['speedup']:.2f}x" for arm, r in rows.items()), flush=True)
    costs = {arm: dataclasses.asdict(engine.policy.costs) for arm, engine, _ in arms if engine.policy is not None}
    return {"prompts": prompts, "records": records, "step_costs": costs}


# ------------------------------------------------------------------------------ statistics

SUM_KEYS = ("tokens", "seconds", "rounds", "accepted", "rejected", "proposed", "draft_s", "draft_steps",
            "target_s", "target_steps")
CI_KEYS = ("block_efficiency", "acceptance_rate", "speedup")  # the metrics given intervals (and paired Δ)


def _sums(recs: list[dict]) -> dict:
    return {k: sum(r[k] for r in recs) for k in SUM_KEYS}


def _bootstrap_ci95(stat, n: int, strata: list[int] | None = None, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of stat(idx)[k] for k in CI_KEYS over BOOTSTRAP resamples idx of the n prompts
    (drawn within `strata`, e.g. tasks, when given); {} for a single prompt."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(np.asarray(strata) == s) for s in set(strata)]
    draws = [stat(np.concatenate([rng.choice(g, len(g)) for g in groups])) for _ in range(BOOTSTRAP if n > 1 else 0)]
    return {k: [float(np.percentile([d[k] for d in draws], q)) for q in (2.5, 97.5)] for k in CI_KEYS} if draws else {}


def _gamma_of(arm: str) -> int | None:
    """An arm's γ for E[τ] and the bound: a chain's γ, a tree's depth, None for an adaptive arm (its γ̄)."""
    label = arm.rsplit("@", 1)[1]
    tree = parse_tree_label(label)
    return None if label == ADAPTIVE else tree_depth(tree) if tree else int(label)


def _point(base: dict, spec: dict, gamma: float | None) -> dict:
    """Metrics from summed records of the target-only arm and a speculative arm; gamma None (an adaptive arm):
    the mean γ̄ = proposed / rounds, γ = 0 rounds included."""
    if gamma is None:
        gamma = spec["proposed"] / spec["rounds"] if spec["rounds"] else 0.0
    t1 = base["target_s"] / base["target_steps"] if base["target_steps"] else 0.0
    tv = spec["target_s"] / spec["target_steps"] if spec["target_steps"] else 0.0
    td = spec["draft_s"] / spec["draft_steps"] if spec["draft_steps"] else 0.0
    c, v = (td / t1, tv / t1) if t1 else (0.0, 0.0)
    alpha = per_token_acceptance(spec["accepted"], spec["rejected"])
    tau = spec["tokens"] / spec["rounds"] if spec["rounds"] else 0.0
    base_tps = base["tokens"] / base["seconds"] if base["seconds"] else 0.0
    spec_tps = spec["tokens"] / spec["seconds"] if spec["seconds"] else 0.0
    return {"acceptance_rate": alpha, "draft_acceptance_rate": draft_acceptance(spec["accepted"], spec["proposed"]),
            "block_efficiency": tau, "expected_block_efficiency": expected_block_efficiency(alpha, gamma),
            "cost_ratio_c": c, "verify_cost_v": v, "target_step_ms": 1e3 * t1, "verify_step_ms": 1e3 * tv,
            "draft_step_ms": 1e3 * td, "target_tokens_per_s": base_tps, "spec_tokens_per_s": spec_tps,
            "speedup": spec_tps / base_tps if base_tps else 0.0,
            "speedup_bound": tau / (gamma * c + v) if (gamma * c + v) else 0.0}


def _target_row(recs: list[dict]) -> dict:
    """The target-only arm on its own: tokens/s and ms per target step."""
    s = _sums(recs)
    return {"n_prompts": len(recs), "tokens_per_s": s["tokens"] / s["seconds"] if s["seconds"] else 0.0,
            "target_step_ms": 1e3 * s["target_s"] / max(1, s["target_steps"]), "generated_tokens": s["tokens"]}


def _row(base_recs: list[dict], spec_recs: list[dict], gamma: int | None, strata: list[int] | None = None,
         seed: int = 0) -> dict:
    """One (task, arm) cell: point estimates, per-position acceptance, accepted-count histogram, and 95%
    bootstrap intervals over prompts (resampled within `strata`, e.g. tasks, when given)."""
    n = len(spec_recs)
    row = {"n_prompts": n, **_point(_sums(base_recs), _sums(spec_recs), gamma)}
    rounds = sum(r["rounds"] for r in spec_recs)
    row["acceptance_per_position"] = [sum(x) / rounds if rounds else 0.0
                                      for x in zip(*(r["per_position"] for r in spec_recs))]
    row["accepted_histogram"] = [sum(x) for x in zip(*(r["histogram"] for r in spec_recs))]
    row["generated_tokens"] = sum(r["tokens"] for r in spec_recs)
    row["mean_gamma"] = sum(r["proposed"] for r in spec_recs) / rounds if rounds else 0.0
    row["target_only_rounds"] = sum(r.get("target_only_rounds", 0) for r in spec_recs)
    row["ci95"] = _bootstrap_ci95(lambda idx: _point(_sums([base_recs[i] for i in idx]),
                                                     _sums([spec_recs[i] for i in idx]), gamma), n, strata, seed)
    return row


def paired_difference(base_recs: list[dict], a_recs: list[dict], b_recs: list[dict], gamma_a: int | None,
                      gamma_b: int | None,
                      strata: list[int] | None = None, seed: int = 0) -> dict:
    """Δ = metric(a) − metric(b) for two arms run on the same prompts, with a 95% paired bootstrap interval:
    every resample draws one set of prompt indices and recomputes both arms (and the shared target-only
    denominator of speedup) on it. {metric: {"delta": Δ, "ci95": [lo, hi]}} for τ, α and speedup."""
    n = len(a_recs)
    if not (len(base_recs) == n == len(b_recs)):
        raise ValueError(f"paired arms need the same prompts: {len(base_recs)}, {n}, {len(b_recs)} records")
    arr = {name: np.array([[r[k] for k in SUM_KEYS] for r in recs], dtype=float).reshape(n, len(SUM_KEYS))
           for name, recs in (("base", base_recs), ("a", a_recs), ("b", b_recs))}

    def delta(idx) -> dict:
        sums = {name: dict(zip(SUM_KEYS, m[idx].sum(0))) for name, m in arr.items()}
        pa, pb = _point(sums["base"], sums["a"], gamma_a), _point(sums["base"], sums["b"], gamma_b)
        return {k: pa[k] - pb[k] for k in CI_KEYS}

    point, ci = delta(np.arange(n)), _bootstrap_ci95(delta, n, strata, seed)
    return {k: {"delta": point[k], "ci95": ci.get(k)} for k in CI_KEYS}


def summarize(measured: dict, cfg: JobConfig) -> dict:
    """{"arms": {arm: {"gamma", "tasks": {task: row}, "overall": row, "lossless_greedy"}}, "target_only"}."""
    rec, greedy = measured["records"], cfg.eval.temperature == 0
    base = rec["target"]
    tasks = list(base)
    flat_b = [r for t in tasks for r in base[t]]
    strata = [i for i, t in enumerate(tasks) for _ in base[t]]
    out = {"target_only": {task: _target_row(base[task]) for task in tasks}}
    out["target_only"]["overall"] = _target_row(flat_b)
    out["arms"] = {}
    for arm, by_task in rec.items():
        if arm == "target":
            continue
        label = arm.rsplit("@", 1)[1]
        tree = parse_tree_label(label)
        gamma = _gamma_of(arm)  # a tree's depth: one draft pass per depth; None: adaptive
        cell = {"gamma": label if gamma is None else gamma,
                "tree": dataclasses.asdict(tree) if isinstance(tree, DynamicTree) else tree,
                "tasks": {t: _row(base[t], by_task[t], gamma, seed=cfg.seed) for t in tasks}}
        if gamma is None:  # what the policy decided on: {"target": {rows: s}, "draft": {batch: s}}
            cell["gamma_max"] = cfg.eval.gamma_max
            cell["step_costs"] = measured.get("step_costs", {}).get(arm)
        flat_s = [r for t in tasks for r in by_task[t]]
        cell["overall"] = _row(flat_b, flat_s, gamma, strata=strata, seed=cfg.seed)
        mismatches = sum(a["token_ids"] != b["token_ids"] for a, b in zip(flat_b, flat_s)) if greedy else None
        cell["lossless_greedy"] = {"checked": len(flat_s) if greedy else 0, "mismatches": mismatches or 0}
        out["arms"][arm] = cell
    _add_paired(out["arms"], rec, tasks, strata, cfg.seed)
    return out


def _comparable(a: str, b: str) -> bool:
    """Arms worth a paired Δ: two drafts at the same γ / tree, or one draft's adaptive arm and its fixed chains."""
    (na, la), (nb, lb) = a.rsplit("@", 1), b.rsplit("@", 1)
    chain = lambda label: label == ADAPTIVE or label.isdigit()  # noqa: E731
    return la == lb or (na == nb and ADAPTIVE in (la, lb) and chain(la) and chain(lb))


def _add_paired(cells: dict, rec: dict, tasks: list[str], strata: list[int], seed: int) -> None:
    """cell["paired"][other] = paired Δ (this − other) per task and overall, for `_comparable` arms."""
    arms = list(cells)
    flat = lambda arm: [r for t in tasks for r in rec[arm][t]]  # noqa: E731  (every task's prompts, in order)
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            if not _comparable(a, b):
                continue
            ga, gb = _gamma_of(a), _gamma_of(b)
            rows = {t: paired_difference(rec["target"][t], rec[a][t], rec[b][t], ga, gb, seed=seed) for t in tasks}
            rows["overall"] = paired_difference(*(flat(arm) for arm in ("target", a, b)), ga, gb, strata, seed)
            cells[a].setdefault("paired", {})[b] = rows
            flip = lambda d: {"delta": -d["delta"], "ci95": [-d["ci95"][1], -d["ci95"][0]] if d["ci95"] else None}
            cells[b].setdefault("paired", {})[a] = {t: {k: flip(d) for k, d in row.items()} for t, row in rows.items()}


def format_table(summary: dict) -> str:
    cols = ("arm", "task", "n", "γ̄", "α", "τ [95% CI]", "E[τ]", "c", "v", "target tok/s", "spec tok/s",
            "speedup [95% CI]", "bound")
    rows = []
    for arm, cell in summary["arms"].items():
        for task, r in [*cell["tasks"].items(), ("overall", cell["overall"])]:
            ci = r.get("ci95", {})
            tau_ci = "[{:.2f}, {:.2f}]".format(*ci["block_efficiency"]) if "block_efficiency" in ci else ""
            sp_ci = "[{:.2f}, {:.2f}]".format(*ci["speedup"]) if "speedup" in ci else ""
            rows.append((arm, task, str(r["n_prompts"]), f"{r['mean_gamma']:.2f}", f"{r['acceptance_rate']:.3f}",
                         f"{r['block_efficiency']:.2f} {tau_ci}", f"{r['expected_block_efficiency']:.2f}",
                         f"{r['cost_ratio_c']:.3f}", f"{r['verify_cost_v']:.2f}", f"{r['target_tokens_per_s']:.1f}",
                         f"{r['spec_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x {sp_ci}", f"{r['speedup_bound']:.2f}x"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    seen: dict[str, str] = {}  # label → the first draft arm measured at it: every other arm is paired with it
    pairs = []
    for arm, cell in summary["arms"].items():
        ref = seen.setdefault(arm.rsplit("@", 1)[1], arm)
        pairs += [(arm, ref)] if ref != arm and ref in cell.get("paired", {}) else []
        name = arm.rsplit("@", 1)[0]
        if arm == f"{name}@{ADAPTIVE}":  # adaptive − each fixed γ of the same draft
            pairs += [(arm, other) for other in cell.get("paired", {}) if other.rsplit("@", 1)[0] == name]
    for arm, ref in pairs:
        d = summary["arms"][arm]["paired"][ref]["overall"]
        out.append(f"{arm} − {ref} (paired over prompts): " + ", ".join(
            f"Δ{sym} {d[k]['delta']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]" if d[k]["ci95"]
            else f"Δ{sym} {d[k]['delta']:+.3f}" for k, sym in (("block_efficiency", "τ"),
                                                              ("acceptance_rate", "α"), ("speedup", "speedup"))))
    for arm, cell in summary["arms"].items():
        lg = cell["lossless_greedy"]
        if lg["checked"]:
            out.append(f"{arm}: lossless greedy, {lg['checked']} prompts checked, {lg['mismatches']} mismatches")
    return "\n".join(out)


def _eval_json(cfg: JobConfig, name: str, draft: str, summary: dict, dtype, info: dict) -> dict:
    """One draft's results in the eval schema (first γ at the top level, every γ under by_gamma)."""
    cells = {g: summary["arms"][arm] for g in cfg.eval.gamma if (arm := f"{name}@{g}") in summary["arms"]}
    trees = {tree_label(t): summary["arms"][arm] for t in cfg.eval.trees
             if (arm := f"{name}@{tree_label(t)}") in summary["arms"]}
    top = next(iter(cells))  # an FSPAD head has no adaptive arm
    first = cells[top]
    return {"target": cfg.target.model, "draft": draft, "gamma": top,
            **({"gamma_max": cfg.eval.gamma_max} if ADAPTIVE in cells else {}),
            "temperature": cfg.eval.temperature, "tasks": first["tasks"], "overall": first["overall"],
            "paired": first.get("paired", {}),
            "by_gamma": {str(g): {"tasks": c["tasks"], "overall": c["overall"], "paired": c.get("paired", {}),
                                  **({"step_costs": c["step_costs"]} if "step_costs" in c else {})}
                         for g, c in cells.items()},  # "adaptive": the served policy's arm (γ̄ in mean_gamma)
            "by_tree": {label: {"tree": c["tree"], "tasks": c["tasks"], "overall": c["overall"],
                                "paired": c.get("paired", {})} for label, c in trees.items()},
            "lossless_greedy": {k: sum(c["lossless_greedy"][k] for c in [*cells.values(), *trees.values()])
                                for k in ("checked", "mismatches")},
            "max_new_tokens": cfg.eval.max_new_tokens, "dtype": str(dtype).removeprefix("torch."),
            "draft_step_dtype": str(draft_step_dtype(cfg.draft.step_dtype, dtype)).removeprefix("torch."),
            "target_only": summary["target_only"], "machine": info, "interleaved_with": list(summary["arms"])}


def run_eval(cfg: JobConfig, drafts: dict[str, str | None] | str | None = None,
             out: Path | str | dict[str, Path | str] | None = None, threads: int | None = None,
             trees_for: set[str] | None = None) -> dict:
    """Evaluate drafts (name → path, 'new', or None for the job's newest trained draft) against the job's
    target in one interleaved run. Writes one eval JSON per draft: `out` is a path (one draft) or
    {name: path}. Returns {name: eval JSON}."""
    from actors.magpie import resolve_self_sources

    cfg = resolve_self_sources(cfg, cfg.eval.tasks)  # an embedded:self task: its queries sampled (Ray down after)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if not isinstance(drafts, dict):
        drafts = {"draft": drafts}
    target, tok = load_target(cfg)
    loaded = {name: load_draft_for(cfg, target, tok, d) for name, d in drafts.items()}
    dtype = next(target.parameters()).dtype
    info = machine()
    print(f"eval: target={cfg.target.model} drafts={', '.join(f'{n}={d[2]}' for n, d in loaded.items())} "
          f"γ={cfg.eval.gamma} T={cfg.eval.temperature} dtype={dtype} threads={info['threads']} ({info['cpu']})",
          flush=True)
    measured = measure(target, {n: (m, v) for n, (m, v, _) in loaded.items()}, tok, cfg, trees_for=trees_for)
    summary = summarize(measured, cfg)
    print(format_table(summary), flush=True)
    results = {name: _eval_json(cfg, name, d[2], summary, dtype, info) for name, d in loaded.items()}
    paths = out if isinstance(out, dict) else ({next(iter(results)): out} if out is not None else {})
    for name, path in paths.items():
        write_json_atomic(Path(path), results[name])
        print(f"wrote {path}")
    return results
