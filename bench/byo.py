"""Bring-your-own-data bench (issue #33): a drafter trained on a user's ShareGPT export of chat and code
conversations, against the embedded job's draft, per task, in one interleaved eval on one machine.

1. The export, as a user would have it: `my_conversations.jsonl` (ShareGPT) mixing train-split chitchat
   conversations (up to 8 turns, a system prompt) and code conversations — a HumanEval prompt and its reference
   solution — for the HumanEval problems outside the held-out code set. The held-out code set
   (`code_eval.jsonl`, `--code-eval` problems chosen by md5 of the task id) is named only under data.eval:
   never trained on.
2. The job: `cluster/jobs/local.yaml` (make run's recipe and sizes) with data.train = the export and its own run
   dir; `draftalign run` regenerates the answers with the target, pretrains, distills, evaluates.
3. One interleaved eval of both drafts (`draftalign eval --draft embedded=… --draft byo=…`): chat (held-out
   chitchat), code (the held-out HumanEval problems), summarize; greedy, γ = 3.

    .venv/bin/python bench/byo.py --embedded runs/local/draft_distilled --out bench/results/byo

Writes <out>/eval_embedded.json, <out>/eval_byo.json (the eval schema), <out>/byo.json (the table: τ and speedup
per task for both drafts, paired Δτ byo − embedded with its 95% interval) and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from draftalign.data import CODE_INSTRUCTION, chitchat_conversations, humaneval_problems  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402

SYSTEM = "You are a helpful assistant."


def code_conversation(p: dict) -> dict:
    return {"conversations": [{"from": "system", "value": SYSTEM},
                              {"from": "human", "value": CODE_INSTRUCTION + p["prompt"]},
                              {"from": "gpt", "value": p["prompt"] + p["canonical_solution"]}]}


def build_export(work: Path, chat_conversations: int, code_eval: int) -> tuple[Path, Path]:
    """(the training export, the held-out code set), both ShareGPT JSONL."""
    problems = sorted(humaneval_problems(), key=lambda p: hashlib.md5(p["task_id"].encode()).hexdigest())
    held, train_code = problems[:code_eval], problems[code_eval:]
    rows = []
    for _, turns in chitchat_conversations("train")[:chat_conversations]:
        conv = [{"from": "system", "value": SYSTEM}]
        conv += [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns[:8])]
        rows.append({"conversations": conv})
    rows += [code_conversation(p) for p in train_code]
    work.mkdir(parents=True, exist_ok=True)
    export, evalset = work / "my_conversations.jsonl", work / "code_eval.jsonl"
    export.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evalset.write_text("".join(json.dumps(code_conversation(p)) + "\n" for p in held))
    return export, evalset


def cli(*args: str) -> None:
    """A draftalign verb in its own process, as a user runs it (bench/magpie.py uses these helpers too)."""
    subprocess.run([sys.executable, "-m", "draftalign.cli", *args], cwd=ROOT, check=True)


def set_args(overrides: list[str]) -> list[str]:
    return [x for kv in overrides for x in ("--set", kv)]


def compare(ev: dict[str, dict], new: str, ref: str, tasks: list[str]) -> list[dict]:
    """Rows per task and overall of one interleaved eval ({draft name: eval JSON}): τ and speedup of every draft
    with their 95% intervals, and the paired Δτ new − ref with its interval."""
    rows = []
    for task in (*tasks, "overall"):
        cell = {n: (ev[n]["tasks"][task] if task != "overall" else ev[n]["overall"]) for n in ev}
        paired = (ev[new].get("paired", {}).get(f"{ref}@{ev[new]['gamma']}", {}).get(task, {})
                  .get("block_efficiency", {}))
        rows.append({"task": task, "n_prompts": cell[new]["n_prompts"],
                     **{f"tau_{n}": cell[n]["block_efficiency"] for n in ev},
                     **{f"tau_{n}_ci": cell[n].get("ci95", {}).get("block_efficiency") for n in ev},
                     **{f"speedup_{n}": cell[n]["speedup"] for n in ev},
                     **{f"speedup_{n}_ci": cell[n].get("ci95", {}).get("speedup") for n in ev},
                     "dtau": paired.get("delta"), "dtau_ci": paired.get("ci95")})
    return rows


def print_rows(rows: list[dict], ref: str, new: str) -> None:
    print(f"{'task':10} {'n':>3} {'τ ' + ref:>11} {'τ ' + new:>7} {'× ' + ref:>11} {'× ' + new:>7}  Δτ [95% CI]")
    for r in rows:
        ci = r["dtau_ci"]
        print(f"{r['task']:10} {r['n_prompts']:>3} {r[f'tau_{ref}']:>11.2f} {r[f'tau_{new}']:>7.2f} "
              f"{r[f'speedup_{ref}']:>11.2f} {r[f'speedup_{new}']:>7.2f}  "
              + (f"{r['dtau']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if r["dtau"] is not None and ci else "–"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embedded", default="runs/local/draft_distilled", help="the embedded job's draft")
    ap.add_argument("--job", default="cluster/jobs/local.yaml", help="the recipe both drafts share")
    ap.add_argument("--work", default="runs/byo", help="the BYO job's run dir (and its export)")
    ap.add_argument("--chat-conversations", type=int, default=280, help="≈ 640 prompts with the code ones, as make run")
    ap.add_argument("--code-eval", type=int, default=24, help="HumanEval problems held out for the code task")
    ap.add_argument("--prompts", default="chat=24,code=24,summarize=8", help="eval prompts per task")
    ap.add_argument("--gamma", default="3", help="eval.gamma of the comparison: an int or 'adaptive' (per-request "
                    "goodput γ ≤ eval.gamma_max)")
    ap.add_argument("--eval-only", action="store_true", help="the BYO job is trained already (--work): only the eval")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="job override key=value")
    ap.add_argument("--out", default="runs/bench/byo", help="directory for the eval JSONs and byo.json")
    a = ap.parse_args()

    work, out = Path(a.work).resolve(), Path(a.out)
    export, evalset = build_export(work, a.chat_conversations, a.code_eval)
    counts = {k: int(v) for k, v in (kv.split("=") for kv in a.prompts.split(","))}
    common = [f"data.eval={{code: {{source: {evalset}}}}}", f"eval.prompts_per_task={json.dumps(counts)}",
              "eval.tasks=[chat,code,summarize]", f"eval.gamma=[{a.gamma}]"]
    sets = lambda extra: set_args([*common, *extra, *a.overrides])  # noqa: E731
    if not a.eval_only:
        cli("run", a.job, *sets(["name=byo", f"run_dir={work}", f"data.train=[{export}]"]))
    out.mkdir(parents=True, exist_ok=True)
    if a.eval_only and not (work / "draft_distilled").is_dir():
        sys.exit(f"--eval-only: no trained BYO draft in {work / 'draft_distilled'}")
    cli("eval", a.job, "--draft", f"embedded={Path(a.embedded).resolve()}", "--draft",
        f"byo={work / 'draft_distilled'}", "--out", str(out), *sets([f"run_dir={work}"]))

    ev = {n: json.loads((out / f"eval_{n}.json").read_text()) for n in ("embedded", "byo")}
    rows = compare(ev, "byo", "embedded", ["chat", "code", "summarize"])
    summary = {"rows": rows, "machine": ev["byo"].get("machine"), "export": str(export), "code_eval": str(evalset),
               "recipe": a.job, "overrides": a.overrides}
    write_json_atomic(out / "byo.json", summary)
    print_rows(rows, "embedded", "byo")


if __name__ == "__main__":
    main()
