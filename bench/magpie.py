"""`embedded:self` bench (issue #33 item 6): does adding queries the target wrote itself (Magpie) to the embedded
mix help on everyday assistant questions that neither source produced, without losing chat?

Two drafts at `make run`'s recipe and size (cluster/jobs/local.yaml), each trained in its own run dir by the
stages of `draftalign run` (generate, pretrain, distill, resumable; not its own eval). They share the generate
budget (generate.num_prompts = 640 prompts answered by the target) and the training steps (stages 1 and 3 as the
job sets them); only data.train differs:

  embedded  today's mix: data.train = [embedded:chitchat]          (`--embedded PATH` reuses a trained draft)
  self      [embedded:chitchat, {embedded:self, max_prompts: 320}], weight 1 each: about half of the 640 prompts
            are queries the target wrote itself, from ⌈2 × 320 / 0.9⌉ = 712 samples, filtered and deduplicated

One interleaved eval of both drafts (greedy, γ = 3) on chat (held-out chitchat), code (HumanEval) and everyday:
the first turns of the 80 MT-bench questions (bench/data/mt_bench/, named only under data.eval: never trained
on). The self queries' overlap with those questions is counted (exact and near duplicates) and reported.

    .venv/bin/python bench/magpie.py --out bench/results/magpie

Writes <out>/eval_embedded.json, <out>/eval_self.json (the eval schema), <out>/magpie.json (per task: τ and speedup
of both drafts with 95% intervals, paired Δτ self − embedded with its interval; what the filters dropped; the
overlap; the verdict — everyday Δτ interval above 0 and chat's not below 0 — and the time of every phase) and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.byo import cli, compare, print_rows, set_args  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from draftalign.query_filters import jaccard, normalise, shingles  # noqa: E402

MT_BENCH = ROOT / "bench" / "data" / "mt_bench" / "question.jsonl"
TASKS = ["chat", "code", "everyday"]


def everyday_set(work: Path) -> tuple[Path, list[str]]:
    """The MT-bench first turns as a `prompt`-format JSONL (the eval task's file source) and the questions."""
    questions = [json.loads(line)["turns"][0] for line in MT_BENCH.read_text().splitlines() if line.strip()]
    path = work / "everyday.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return path, questions


def overlap(queries: list[str], questions: list[str], threshold: float) -> dict:
    """Self queries equal (normalised) to a held-out question, or near it (Jaccard of shingles ≥ threshold)."""
    keys = {normalise(q) for q in questions}
    held = [shingles(q) for q in questions]
    exact = sum(normalise(q) in keys for q in queries)
    near = sum(any(jaccard(shingles(q), h) >= threshold for h in held) for q in queries)
    return {"self_queries": len(queries), "exact": exact, "near": near, "threshold": threshold}


def self_share(run: Path) -> dict:
    """How many of the answered prompts the target wrote itself (the distillation set's plan)."""
    ids = json.loads((run / "distill_set" / "plan.json").read_text())["prompt_ids"]
    return {"prompts": len(ids), "self": sum(i.startswith("self.jsonl/") for i in ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="cluster/jobs/local.yaml", help="the recipe both drafts share")
    ap.add_argument("--embedded", default=None, help="a trained draft for the embedded arm (default: train it "
                                                     "here, on this machine and code, like the self arm)")
    ap.add_argument("--work", default="runs/magpie", help="the arms' run dirs (embedded/, self/) and the eval set")
    ap.add_argument("--self-prompts", type=int, default=320, help="max_prompts of embedded:self in the self arm")
    ap.add_argument("--prompts", default="chat=24,code=16,everyday=80", help="eval prompts per task")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="job override key=value (both "
                                                                                  "arms and the eval)")
    ap.add_argument("--out", default="runs/bench/magpie", help="directory for the eval JSONs and magpie.json")
    a = ap.parse_args()

    work, out = Path(a.work).resolve(), Path(a.out)
    evalset, questions = everyday_set(work)
    counts = {k: int(v) for k, v in (kv.split("=") for kv in a.prompts.split(","))}
    mixes = {"embedded": "[embedded:chitchat]",
             "self": f"[embedded:chitchat, {{source: embedded:self, max_prompts: {a.self_prompts}}}]"}
    drafts, seconds = {}, {}
    for arm, mix in mixes.items():
        if arm == "embedded" and a.embedded:
            drafts[arm] = Path(a.embedded).resolve()
            continue
        sets = set_args([f"name=magpie-{arm}", f"run_dir={work / arm}", f"data.train={mix}", *a.overrides])
        for verb in ("generate", "pretrain", "distill"):  # `run`'s stages; its eval is the one below
            t0 = time.perf_counter()
            cli(verb, a.job, *([] if verb == "generate" else ["--resume"]), *sets)
            seconds[f"{verb}_{arm}"] = round(time.perf_counter() - t0, 1)
        drafts[arm] = work / arm / "draft_distilled"

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cli("eval", a.job, *(x for n in drafts for x in ("--draft", f"{n}={drafts[n]}")), "--out", str(out),
        *set_args([f"run_dir={work / 'self'}", f"data.eval={{everyday: {{source: {evalset}}}}}",
                   f"eval.tasks=[{','.join(TASKS)}]", f"eval.prompts_per_task={json.dumps(counts)}", *a.overrides]))
    seconds["eval"] = round(time.perf_counter() - t0, 1)

    ev = {n: json.loads((out / f"eval_{n}.json").read_text()) for n in drafts}
    rows = compare(ev, "self", "embedded", TASKS)
    by = {r["task"]: r for r in rows}
    meta = json.loads((work / "self" / "self_queries" / "meta.json").read_text())
    queries = [json.loads(line)["prompt"] for line in (work / "self" / "self_queries" / "self.jsonl").open()]
    cis = {t: by[t]["dtau_ci"] for t in ("everyday", "chat")}
    verdict = {"everyday_wins": bool(cis["everyday"] and cis["everyday"][0] > 0),
               "chat_kept": bool(cis["chat"] and cis["chat"][1] >= 0)}
    verdict["add_to_embedded_mix"] = verdict["everyday_wins"] and verdict["chat_kept"]
    summary = {"rows": rows, "verdict": verdict, "self_queries": meta["counts"],
               "self_query_settings": {**meta["sampler"], **meta["filters"], "n_samples": meta["n_samples"]},
               "answered": {arm: self_share(work / arm) for arm in mixes if (work / arm / "distill_set").is_dir()},
               "overlap_with_everyday": overlap(queries, questions, meta["filters"]["near_duplicate"]),
               "seconds": seconds, "machine": ev["self"].get("machine"), "recipe": a.job,
               "self_prompts": a.self_prompts, "overrides": a.overrides, "everyday": str(MT_BENCH.relative_to(ROOT))}
    write_json_atomic(out / "magpie.json", summary)
    print_rows(rows, "embedded", "self")
    print(f"self queries: {meta['counts']}; overlap with everyday: {summary['overlap_with_everyday']}")
    print(f"verdict: {verdict}; seconds: {seconds}; wrote {out / 'magpie.json'}")


if __name__ == "__main__":
    main()
