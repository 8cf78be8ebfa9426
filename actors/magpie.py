"""`embedded:self`: the target writes the user turns itself (Magpie, Xu et al. 2024, arXiv 2406.08464).

Given its chat template up to the opening of a user turn — the *pre-query template*, e.g. ChatML's
`<|im_start|>system\\n…<|im_end|>\\n<|im_start|>user\\n` — an aligned chat model samples what a user would ask,
and stops at the end of that turn. The template is derived, not hard-coded: render one user message holding a
sentinel and cut at the sentinel (`pre_query_template`); a template that cannot be cut there is refused.

Each sample i is drawn with its own seed (hashed from the job seed and i, T = data.self_queries.temperature,
top-p, at most max_tokens), so a bigger n_samples extends a smaller one. Then, in sample order, the queries are
filtered and deduplicated (`draftalign.query_filters`: unfinished, length, template tokens, unprintable, few
letters, answer-shaped, repetitive; exact and near duplicates), each drop counted under its reason.

Layout `<run_dir>/self_queries/`: `samples.json` (every raw sample: token ids and finish reason, rewritten
atomically after each chunk — the resume unit), `self.jsonl` (the kept queries, `{"prompt": …}` rows: the file
source that `embedded:self` is read as, with the content-hash held-out split of any file source) and `meta.json`
(the sampler, the filters, what each dropped; written last: the queries are complete iff it matches). A rerun
reuses them; a rerun with other sampler settings stops with the difference named.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from draftalign.config import SELF_SOURCE, ConfigError, JobConfig, SelfQueryConfig
from draftalign.io import read_json, write_atomic, write_json_atomic
from draftalign.query_filters import deduplicate, reject_reason
from draftalign.sources import SELF_COPY

SENTINEL = "\ue000draftalign-query\ue001"  # private-use characters: no chat template writes them itself
CHUNK = 64  # samples per engine call
DIR, QUERIES = SELF_COPY  # <run_dir>/self_queries/self.jsonl


class PreQueryError(ConfigError):
    """The target's chat template gives no pre-query template (embedded:self cannot sample queries)."""


# ------------------------------------------------------------------------------------------ the pre-query template
@dataclass(frozen=True)
class PreQuery:
    """Where a user turn opens and how it ends, under one tokenizer's chat template."""

    text: str                      # the template rendered up to the first character of a user message
    stop: tuple[str, ...]          # strings that end a user turn (the text after the message, e.g. "<|im_end|>")
    stop_token_ids: tuple[int, ...]  # the stop strings that are single special tokens, and EOS
    markers: tuple[str, ...]       # template strings no query may contain (special tokens, the stops)


def _render(tokenizer, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 — a template raises whatever its author chose
        raise PreQueryError(f"embedded:self: the target's chat template cannot render a lone user message "
                            f"({type(e).__name__}: {e}), so no pre-query template can be derived") from None


def special_strings(tokenizer) -> list[str]:
    """Every special token's text (the named ones and the added tokens marked special)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return sorted({*tokenizer.all_special_tokens, *added} - {""})


def pre_query_template(tokenizer) -> PreQuery:
    """The chat template up to a user turn, from `apply_chat_template` on a sentinel user message:
    render(user = S) = text + S + after; the turn ends with after.strip(), or, for a template that closes a user
    turn only when the assistant's opens, with the generation prompt's text after S."""
    rendered = _render(tokenizer, False)
    if rendered.count(SENTINEL) != 1:
        raise PreQueryError("embedded:self: the target's chat template does not render a user message's text "
                            "verbatim (exactly once), so it cannot be cut where the message begins")
    text, after = rendered.split(SENTINEL)
    if not text.strip():
        raise PreQueryError("embedded:self: the target's chat template writes nothing before a user message (no "
                            "role header), so nothing cues the model to write a user turn")
    end = after.strip() or _render(tokenizer, True).split(SENTINEL)[1].strip()
    if not end:
        raise PreQueryError("embedded:self: the target's chat template writes nothing after a user message, so the "
                            "end of a sampled user turn cannot be recognised")
    specials = special_strings(tokenizer)
    eos = tokenizer.eos_token_id
    eos = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    stops = list(dict.fromkeys([end, *(ln.strip() for ln in end.splitlines() if ln.strip()),
                                *tokenizer.convert_ids_to_tokens(eos)]))
    ids = sorted({*(tokenizer.convert_tokens_to_ids(s) for s in stops if s in specials), *eos})
    return PreQuery(text=text, stop=tuple(stops), stop_token_ids=tuple(ids),
                    markers=tuple(sorted({*specials, *stops})))


def query_text(decoded: str, pre: PreQuery) -> str:
    """The user turn in a sample decoded with its special tokens: the text before the first stop, stripped."""
    return decoded[:min([i for s in pre.stop if (i := decoded.find(s)) >= 0] + [len(decoded)])].strip()


def select_queries(samples: list[dict], decode, pre: PreQuery, q: SelfQueryConfig) -> tuple[list[str], dict]:
    """Filter, then deduplicate, samples [{"token_ids", "finish_reason"}] in order. decode(ids) → text with its
    special tokens. Returns (the kept queries, counts: sampled, every reason dropped, kept)."""
    counts: dict[str, int] = {"sampled": len(samples)}
    survivors = []
    for s in samples:
        text = query_text(decode(s["token_ids"]), pre)
        reason = reject_reason(text, s["finish_reason"] == "stop", pre.markers, q)
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
        else:
            survivors.append(text)
    kept, dropped = deduplicate(survivors, q.near_duplicate)
    counts.update(dropped)
    counts["kept"] = len(kept)
    return [survivors[i] for i in kept], counts


def counts_line(counts: dict) -> str:
    dropped = ", ".join(f"{n} {k}" for k, n in counts.items() if k not in ("sampled", "kept") and n)
    return f"{counts['sampled']} sampled → {counts['kept']} kept" + (f" (dropped: {dropped})" if dropped else "")


# -------------------------------------------------------------------------------------------------------- sampling
def self_query_budget(cfg: JobConfig, eval_tasks: list[str]) -> int:
    """Samples to draw: data.self_queries.n_samples, else ⌈oversample × wanted⌉ with wanted = the train source's
    max_prompts (else generate.num_prompts) ÷ (1 − holdout), or for an eval-only source its eval count."""
    q, d = cfg.data.self_queries, cfg.data
    if q.n_samples:
        return q.n_samples
    trained = [s for s in d.train if s.source == SELF_SOURCE]
    if trained:
        wanted = max(s.max_prompts or cfg.generate.num_prompts for s in trained) / (1 - d.holdout)
    else:
        wanted = max(cfg.eval.count(t) for t in eval_tasks if d.eval[t].source == SELF_SOURCE)
    return math.ceil(q.oversample * wanted)


def sampler_key(cfg: JobConfig, pre: PreQuery) -> dict:
    """What the raw samples depend on: samples stored under another key are not this job's."""
    q = cfg.data.self_queries
    return {"target": cfg.target.model, "dtype": cfg.generate.dtype, "seed": cfg.seed,
            "temperature": q.temperature, "top_p": q.top_p, "max_tokens": q.max_tokens, "pre_query": pre.text}


def _sample(cfg: JobConfig, model_path: str, pre_ids: list[int], pre: PreQuery, todo: list[int], store,
            engines=None) -> None:
    """Draw samples `todo` (indices) on stage 2's target engines (`engines`, a pool the caller owns, else a pool
    and a Ray instance of this call's own), calling store(list of samples) per chunk."""
    from tqdm import tqdm

    from actors.generate import prompt_seed, stage2_actors
    from actors.target import one_per_engine

    q = cfg.data.self_queries
    with stage2_actors(cfg, model_path, engines) as actors:
        def submit(actor, idx: list[int]):
            return actor.generate.remote([pre_ids] * len(idx), temperature=q.temperature, top_p=q.top_p,
                                         max_tokens=q.max_tokens,
                                         seed=[prompt_seed(cfg.seed, f"self/{i}") for i in idx],
                                         stop=list(pre.stop), stop_token_ids=list(pre.stop_token_ids))

        def done(idx: list[int], answers: list) -> None:
            store([{"i": i, "token_ids": a[0]["token_ids"], "finish_reason": a[0]["finish_reason"]}
                   for i, a in zip(idx, answers, strict=True)])
            bar.update(len(idx))

        bar = tqdm(total=len(todo), unit="query", desc="self queries", file=sys.stderr, dynamic_ncols=True)
        one_per_engine(actors, (todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)), submit, done)
        bar.close()


def materialise(cfg: JobConfig, n: int, engines=None) -> Path:
    """Sample (or reuse) n queries of the job's target and write the kept ones to `<run_dir>/self_queries/
    self.jsonl`; returns that path. `engines`: stage 2's pool, where the caller shares one (`_sample`)."""
    from draftalign.models import load_target_tokenizer, resolve_target
    from draftalign.runtime import run_dir

    t0 = time.perf_counter()
    d = run_dir(cfg) / DIR
    out, meta_path, samples_path = d / QUERIES, d / "meta.json", d / "samples.json"
    model_path = resolve_target(cfg.target.model)
    tok = load_target_tokenizer(model_path)
    pre = pre_query_template(tok)
    key = sampler_key(cfg, pre)
    filters = cfg.data.self_queries.model_dump(exclude={"n_samples", "oversample", "temperature", "top_p",
                                                          "max_tokens"})
    meta = read_json(meta_path)
    if meta and out.is_file() and meta["sampler"] == key and meta["n_samples"] == n and meta["filters"] == filters:
        print(f"self queries: {meta['counts']['kept']} reused ({out})", flush=True)
        return out

    stored = read_json(samples_path)
    if stored and stored["sampler"] != key:
        diff = sorted(k for k in set(key) | set(stored["sampler"]) if key.get(k) != stored["sampler"].get(k))
        raise ConfigError(f"{d} holds queries sampled with different settings (differs in: {', '.join(diff)}); "
                          f"use another run dir or delete {d}")
    samples = {s["i"]: s for s in (stored or {}).get("samples", [])}
    todo = [i for i in range(n) if i not in samples]
    if todo:
        pre_ids = tok(pre.text, add_special_tokens=False).input_ids
        if len(pre_ids) + cfg.data.self_queries.max_tokens > cfg.target.max_model_len:
            raise ConfigError(f"data.self_queries.max_tokens={cfg.data.self_queries.max_tokens} plus the "
                              f"{len(pre_ids)}-token pre-query template exceed target.max_model_len")

        def store(chunk: list[dict]) -> None:
            samples.update({s["i"]: s for s in chunk})
            doc = {"sampler": key, "samples": [samples[i] for i in sorted(samples)]}
            write_atomic(samples_path, lambda tmp: tmp.write_text(json.dumps(doc)))

        print(f"self queries: sampling {len(todo)} of {n} ({n - len(todo)} stored) from the target, pre-query "
              f"template {pre.text!r}", flush=True)
        _sample(cfg, model_path, pre_ids, pre, todo, store, engines)

    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    queries, counts = select_queries([samples[i] for i in range(n)], decode, pre, cfg.data.self_queries)
    if not queries:
        raise ConfigError(f"embedded:self: none of {n} sampled queries passed the filters ({counts_line(counts)}); "
                          f"see {samples_path}")
    write_atomic(out, lambda tmp: tmp.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in queries)))
    write_json_atomic(meta_path, {"sampler": key, "n_samples": n, "filters": filters, "counts": counts,
                                  "pre_query": pre.text, "stop": list(pre.stop)})
    print(f"self queries: {counts_line(counts)} | {time.perf_counter() - t0:.1f} s | {out}", flush=True)
    return out


def resolve_self_sources(cfg: JobConfig, eval_tasks: list[str] | None = None, engines=None) -> JobConfig:
    """The job with every `embedded:self` source replaced by its sampled query file (sampled first where missing):
    for the generate stage (eval_tasks None) when data.train names it, for an eval when one of `eval_tasks` does.
    Otherwise the job comes back unchanged. `engines`: stage 2's pool where the caller shares one."""
    d = cfg.data
    if eval_tasks is None:
        used = any(s.source == SELF_SOURCE for s in d.train)
    else:
        used = any(d.eval[t].source == SELF_SOURCE for t in eval_tasks if t in d.eval)
    if not used:
        return cfg
    path = str(materialise(cfg, self_query_budget(cfg, eval_tasks or []), engines))
    swap = lambda s: s.model_copy(update={"source": path}) if s.source == SELF_SOURCE else s  # noqa: E731
    data = d.model_copy(update={"train": [swap(s) for s in d.train], "eval": {k: swap(v) for k, v in d.eval.items()}})
    return cfg.model_copy(update={"data": data})
