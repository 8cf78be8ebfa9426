"""The results tables of README.md and docs/, generated from the committed result JSONs.

Each table sits between two marker comments in a Markdown file::

    <!-- summary:headline -->
    ...generated, never edited by hand...
    <!-- /summary:headline -->

and this script rewrites what is between them, so a figure is typed by no one: it is read from the JSON the
table names in its rows. A marker whose name is not a table here is an error.

    python -m bench.summary           # rewrite the tables in README.md and docs/**/*.md
    python -m bench.summary --check   # exit 1, naming the tables, if a committed table differs
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "bench/results"
MARKER = re.compile(r"<!-- summary:(?P<name>[\w-]+) -->\n.*?<!-- /summary:(?P=name) -->", re.DOTALL)


def load(rel: str) -> dict:
    return json.loads((ROOT / RESULTS / rel).read_text())


def link(rel: str) -> str:
    return f"`{RESULTS}/{rel}`"


def machine(d: dict) -> str:
    m = d.get("machine") or {}
    cpu, cores = m.get("cpu", "?"), m.get("cores", "?")
    if "EPYC" in cpu:
        return f"{cores}-core AMD EPYC " + ("(AVX-512, native bf16)" if m.get("bf16_native") else "(AVX2)")
    if "Xeon" in cpu:
        return f"{cores}-core Intel Xeon + AMX" if m.get("amx") or m.get("bf16_native") else f"{cores}-core Intel Xeon"
    return f"{cores}-core {cpu}"


def f2(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def sgn(x: float) -> str:
    """A signed difference, with a typographic minus as the rest of the docs write it."""
    return f"{x:+.2f}".replace("-", "−")


def ci(pair: list[float] | None, signed: bool = False) -> str:
    if not pair:
        return ""
    return " [" + ", ".join(sgn(v) if signed else f"{v:.2f}" for v in pair) + "]"


def tau(s: dict) -> str:
    return f"{s['block_efficiency']:.2f}{ci(s['ci95']['block_efficiency'])}"


def speedup(s: dict) -> str:
    return f"{s['speedup']:.2f}×{ci(s['ci95']['speedup'])}"


def mismatches(d: dict) -> str:
    g = d.get("lossless_greedy") or {}
    return f"{g.get('mismatches', '?')} / {g.get('checked', '?')} greedy mismatches"


def arm_by_gamma(d: dict, gamma: int, task: str = "chat") -> dict:
    g = d["by_gamma"][str(gamma)]
    return g["tasks"][task] if task != "overall" else g["overall"]


def arm_by_tree(d: dict, tree: str, task: str = "chat") -> dict:
    t = d["by_tree"][tree]
    return t["tasks"][task] if task != "overall" else t["overall"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def chat_row(what: str, rel: str, s: dict, d: dict, extra: str = "") -> list[str]:
    return [what, f"chat τ {tau(s)}, speedup {speedup(s)}{extra}; {mismatches(d)}", machine(d), link(rel)]


# ---------------------------------------------------------------- tables


def headline() -> str:
    rows = []
    rel = f"{MAKE_RUN}/eval_distilled.json"
    d = load(rel)
    a, code = arm_by_gamma(d, ADAPTIVE), arm_by_gamma(d, ADAPTIVE, "code")
    rows.append(chat_row("`make run`: the embedded job's 4 × 256 Llama draft (stages 1 + 3), γ = 3", rel,
                         arm_by_gamma(d, 3), d, f"; adaptive γ ≤ 3: chat {speedup(a)}, code {code['speedup']:.2f}×"))
    rel = "make_run_fspad/eval_distilled.json"
    d = load(rel)
    rows.append(chat_row("`make run` with `--set draft.kind=fspad`: the FSPAD head, chain γ = 3", rel,
                         arm_by_gamma(d, 3), d))
    rel = "local-long-amx2/eval_distilled.json"
    d = load(rel)
    rows.append(chat_row("long job (`local-long.yaml`): 6 × 384 Llama draft, γ = 3", rel, arm_by_gamma(d, 3), d))
    rel = "local-long-fspad-amx/eval_fp32.json"
    d = load(rel)
    rows.append(chat_row("long job, FSPAD head with the training-time test, chain γ = 3", rel,
                         arm_by_gamma(d, 3), d))
    rows.append(chat_row("the same head, EAGLE-2 dynamic tree (depth 5, top-3, 10 nodes)", rel,
                         arm_by_tree(d, "dtree:5-3-10"), d))
    rel = "local-long-amx2/ablation/fkl/eval_T1.json"
    d = load(rel)
    s = arm_by_gamma(d, 3)
    rows.append(["long job's Llama draft served sampled (T = 1), γ = 3",
                 f"chat τ {tau(s)}, speedup {speedup(s)}, α {s['acceptance_rate']:.3f}", machine(d), link(rel)])
    rel = "serve_load.json"
    d = load(rel)
    by = {lv["clients"]: lv["arms"]["spec"] for lv in d["levels"]}
    mism = sum(a["greedy_mismatches"] for a in by.values())
    compared = sum(a["greedy_compared"] for a in by.values())
    rows.append(["Ray Serve endpoint, goodput γ ≤ 3, first long-job draft, vs target only",
                 ", ".join(f"{c} client{'s' if c > 1 else ''} {a['speedup_tokens_per_s']:.2f}×"
                           f" (mean γ {a['mean_gamma']:.2f})" for c, a in sorted(by.items()))
                 + f"; {mism} / {compared} greedy mismatches", machine(d), link(rel)])
    rel = "online_defaults.json"
    d = load(rel)
    sh, vs = d["shifted"], d["vs_static"]
    rows.append(["online learning while serving shifted traffic (learner defaults)",
                 f"shifted τ {sh['tau_before']:.2f} → {sh['tau_after']:.2f} "
                 f"({100 * (sh['tau_after'] / sh['tau_before'] - 1):+.1f}%), online ÷ static on the last shifted "
                 f"window {vs['shifted_last_window']:.3f}, chat after the shift ÷ static {vs['chat_again']:.3f}; "
                 f"{d['failed_requests']} failed, {d['greedy_mismatches']} greedy mismatches", machine(d), link(rel)])
    return table(["result", "measured", "machine", "JSON"], rows)


ADAPTIVE = "adaptive"
MAKE_RUN = "make_run_epyc_self"  # the current recipe's fresh-clone run


def make_run_tasks() -> str:
    pre_rel, dis_rel = f"{MAKE_RUN}/eval_pretrained.json", f"{MAKE_RUN}/eval_distilled.json"
    pre, dis = load(pre_rel), load(dis_rel)
    paired = (dis.get("paired") or {}).get("pretrained@3", {})
    rows = []
    for task in [*dis["tasks"], "overall"]:
        a, b, ad = arm_by_gamma(pre, 3, task), arm_by_gamma(dis, 3, task), arm_by_gamma(dis, ADAPTIVE, task)
        p = paired.get(task, {}).get("block_efficiency")
        rows.append([f"{task} ({b['n_prompts']})", f2(a["block_efficiency"]), tau(b),
                     f"{sgn(p['delta'])}{ci(p['ci95'], signed=True)}" if p else "–",
                     f"{a['acceptance_rate']:.3f} → {b['acceptance_rate']:.3f}", speedup(b),
                     f"{b['cost_ratio_c']:.3f} / {b['verify_cost_v']:.2f}",
                     f"{ad['mean_gamma']:.2f} / {tau(ad)} / {speedup(ad)}"])
    return (table(["task (prompts)", "τ after stage 1", "τ after stage 3 [95% CI]", "stage 3 adds Δτ (paired)",
                   "α stage 1 → 3", "speedup after stage 3 [95% CI]", "c / v", "adaptive γ ≤ 3: mean γ / τ / speedup"],
                  rows)
            + f"\n\nγ = 3 and adaptive, greedy, 64 new tokens; {mismatches(dis)} (stage 3), {mismatches(pre)} "
            + f"(stage 1); {machine(dis)}; {link(pre_rel)}, {link(dis_rel)}.")


MAKE_RUNS = {  # one fresh-clone `make run` per machine class: its prompt mix
    "make_run_xeon_self": "chitchat + `embedded:self`",
    "make_run_epyc_self": "chitchat + `embedded:self`",
}


def chat_alphas(run: str, d: dict) -> str:
    """Chat α greedy, then at each sampled temperature the run evaluated (eval.sampled's `eval_distilled_t<T>.json`
    beside it); '–' for a temperature the run did not measure."""
    cells = [f"{arm_by_gamma(d, d['gamma'])['acceptance_rate']:.3f} (greedy)"]
    for path in sorted((ROOT / RESULTS / run).glob("eval_distilled_t*.json")):
        ev = json.loads(path.read_text())
        cells.append(f"{arm_by_gamma(ev, ev['gamma'])['acceptance_rate']:.3f} (T = {ev['temperature']:g})")
    return " / ".join(cells) if len(cells) > 1 else cells[0] + " / – (T > 0 not run)"


def make_run_machines() -> str:
    """`make run` from a fresh clone on each machine class: its wall time (timing.txt) and the distilled draft."""
    rows = []
    for run in MAKE_RUNS:
        d = load(f"{run}/eval_distilled.json")
        timing = (ROOT / RESULTS / run / "timing.txt").read_text()
        total = re.search(r"\[run\] finished in (\d+) s", timing)
        stages = dict(re.findall(r"\[run\] (\w+): done in (\d+) s", timing))
        chat, code = arm_by_gamma(d, 3, "chat"), arm_by_gamma(d, 3, "code")
        adaptive = "–"
        if ADAPTIVE in d["by_gamma"]:
            a_chat, a_code = arm_by_gamma(d, ADAPTIVE, "chat"), arm_by_gamma(d, ADAPTIVE, "code")
            adaptive = f"chat {speedup(a_chat)}, code {a_code['speedup']:.2f}×"
        rows.append([machine(d), MAKE_RUNS[run], f"{int(total[1]) / 60:.1f} min" if total else "–",
                     " / ".join(f"{k} {int(v) / 60:.1f}" for k, v in stages.items()), tau(chat), speedup(chat),
                     chat_alphas(run, d), f"{code['speedup']:.2f}×", adaptive, mismatches(d),
                     link(f"{run}/eval_distilled.json")])
    return table(["machine", "prompts", "`make run` (after setup)", "stages, min", "chat τ [95% CI]",
                  "chat speedup γ = 3 [95% CI]", "chat α greedy / sampled", "code speedup γ = 3", "adaptive γ ≤ 3",
                  "lossless", "JSON"], rows)


def byo(rel: str = "byo/byo.json") -> str:
    """bench/byo.py: a drafter trained on a user's ShareGPT export (chat + code) vs the embedded job's draft."""
    d, ev = load(rel), load(rel.replace("byo.json", "eval_byo.json"))
    rows = []
    for r in d["rows"]:
        rows.append([f"{r['task']} ({r['n_prompts']})",
                     f"{r['tau_embedded']:.2f}{ci(r['tau_embedded_ci'])}", f"{r['tau_byo']:.2f}{ci(r['tau_byo_ci'])}",
                     f"{sgn(r['dtau'])}{ci(r['dtau_ci'], signed=True)}" if r["dtau"] is not None else "–",
                     f"{r['speedup_embedded']:.2f}×", f"{r['speedup_byo']:.2f}×{ci(r['speedup_byo_ci'])}"])
    what = f"{ev['gamma']} γ ≤ {ev['gamma_max']}" if ev["gamma"] == ADAPTIVE else f"γ = {ev['gamma']}"
    return (table(["task (prompts)", "τ embedded draft", "τ BYO draft", "Δτ BYO − embedded (paired)",
                   "speedup embedded", "speedup BYO"], rows)
            + f"\n\n{what}, greedy, one interleaved eval; {mismatches(ev)} (BYO); {machine(ev)}; {link(rel)}.")


def long_job() -> str:
    pre_rel, dis_rel = "local-long-amx2/eval_pretrained.json", "local-long-amx2/eval_distilled.json"
    pre, dis = load(pre_rel), load(dis_rel)
    rows = []
    for label, d, task in [("chat, stage 1 draft", pre, "chat"), ("**chat, stage 3 draft**", dis, "chat"),
                           ("overall, stage 3 draft", dis, "overall")]:
        s = arm_by_gamma(d, 3, task)
        rows.append([f"{label} ({s['n_prompts']})", f"{s['acceptance_rate']:.3f}", tau(s),
                     f"{s['cost_ratio_c']:.3f}", f"{s['verify_cost_v']:.2f}", speedup(s)])
    return (table(["γ = 3, fp32 target", "α", "τ [95% CI]", "c", "v", "speedup [95% CI]"], rows)
            + f"\n\n{mismatches(dis)} (stage 3); {machine(dis)}; {link(pre_rel)}, {link(dis_rel)}.")


def loss_ablation() -> str:
    rel = "local-long-amx2/ablation/ablation.json"
    a = load(rel)
    arms = a["arms"]

    def best(mode: str) -> str:
        return max(arms, key=lambda k: arms[k]["eval"][mode]["chat"]["3"]["block_efficiency"])

    best_t0, best_t1 = best("T=0"), best("T=1")

    def cell(arm: str, mode: str, top: str) -> str:
        c = arms[arm]["eval"][mode]["chat"]["3"]
        if arm == top:
            return f"**{c['block_efficiency']:.2f}**, {c['speedup']:.2f}×"
        p = c["paired_tau"][top]
        return f"{c['block_efficiency']:.2f} (Δ {sgn(p['delta'])}{ci(p['ci95'], signed=True)})"

    rows = []
    for arm, v in arms.items():
        dist = v.get("distill") or {}
        rows.append([arm if arm != "start" else "start (stage 1 only)",
                     f"{dist['heldout_acceptance']:.4f}" if dist else "–",
                     f"{dist['heldout_greedy_acceptance']:.4f}" if dist else "–",
                     f"{dist['wall_time_s']:,.0f} s" if dist else "–",
                     cell(arm, "T=0", best_t0), cell(arm, "T=1", best_t1)])
    start = next((v["distill"]["heldout_acceptance_start"] for v in arms.values() if v.get("distill")), None)
    return (table(["arm", "held-out 1 − TVD", "held-out greedy α", "stage 3 wall time",
                   f"greedy chat τ (paired Δ to {best_t0})", f"T = 1 chat τ (paired Δ to {best_t1})"], rows)
            + f"\n\nHeld-out teacher-forced acceptance at the start: {start:.4f}. Chat, γ = 3, "
            + f"{a['eval']['prompts_per_task']} prompts × {a['eval']['max_new_tokens']} tokens; {link(rel)} "
            + "(each arm's `<arm>/eval_T0.json`, `eval_T1.json` beside it).")


def fspad_trees() -> str:
    rel = "local-long-fspad-amx/eval_fp32.json"
    d = load(rel)
    arms = [(f"chain γ = {g}", arm_by_gamma(d, int(g)), arm_by_gamma(d, int(g), "overall")) for g in d["by_gamma"]]
    for name in d.get("by_tree") or {}:
        kind, shape = name.split(":")
        nums = shape.split("-")
        label = (f"dynamic tree depth {nums[0]}, top-{nums[1]}, {nums[2]} nodes" if kind == "dtree"
                 else f"static tree [{', '.join(nums)}]")
        arms.append((label, arm_by_tree(d, name), arm_by_tree(d, name, "overall")))
    rows = [[label, f"{s['acceptance_rate']:.3f}", tau(s),
             " / ".join(f"{p:.2f}" for p in s["acceptance_per_position"]), f"{s['cost_ratio_c']:.3f}",
             f"{s['verify_cost_v']:.2f} ({s['verify_step_ms']:.0f} ms)", speedup(s), f"{s['speedup_bound']:.2f}×",
             f"{o['block_efficiency']:.2f}, {o['speedup']:.2f}×"] for label, s, o in arms]
    return (table(["chat, fp32 target", "α", "τ [95% CI]", "P(acc.) by depth", "c", "v (pass)",
                   "speedup [95% CI]", "bound", "overall τ, speedup"], rows)
            + f"\n\n{arm_by_gamma(d, 3)['n_prompts']} chat prompts (overall "
            + f"{arm_by_gamma(d, 3, 'overall')['n_prompts']}); {mismatches(d)}; {machine(d)}; {link(rel)}.")


SAMPLING = "sampling/adaptive.json"  # bench/adaptive.py: fixed γ vs adaptive γ, greedy and sampled


def adaptive_vs_fixed(rel: str = SAMPLING) -> str:
    """bench/adaptive.py: per task, fixed γ against the served per-request policy, at T = 0 and the sampled
    temperatures, side by side (α greedy beside α sampled); the adaptive arm's paired Δ speedup to each fixed γ."""
    d = load(rel)
    temps = sorted({r["temperature"] for r in d["rows"]})
    arms = [str(g) for g in d["gammas"]]
    cell = {(r["temperature"], r["task"], r["arm"]): r for r in d["rows"]}
    tasks = list(dict.fromkeys(r["task"] for r in d["rows"]))
    rows = []
    for task in tasks:
        for arm in arms:
            label = f"adaptive (γ ≤ {d['gamma_max']})" if arm == "adaptive" else f"γ = {arm}"
            row = [f"{task} ({cell[(temps[0], task, arm)]['n_prompts']})", label]
            for t in temps:
                r = cell[(t, task, arm)]
                paired = r["paired_speedup_vs_fixed"]
                vs = "; ".join(f"Δ vs γ {g} {sgn(p['delta'])}{ci(p['ci95'], signed=True)}" for g, p in paired.items())
                row.append(f"α {r['acceptance_rate']:.2f}, τ {r['block_efficiency']:.2f}"
                           + (f", γ̄ {r['mean_gamma']:.2f}" if arm == "adaptive" else "")
                           + f", **{r['speedup']:.2f}×**{ci(r['speedup_ci95'])}" + (f" ({vs})" if vs else ""))
            rows.append(row)
    ev = load(f"{Path(rel).parent}/{d['evals'][next(iter(d['evals']))]}")
    return (table(["task (prompts)", "arm", *(f"T = {t:g}" if t else "greedy" for t in temps)], rows)
            + f"\n\n{d['max_new_tokens']} new tokens, top-p 1; one interleaved eval per temperature (all arms and "
            + f"target-only per prompt); {mismatches(ev)} at T = 0; draft `{d['draft']}`; {machine(d)}; "
            + f"{link(rel)} and the eval JSONs beside it.")


ONLINE_RUNS = [  # (label, JSON) in the order they ran; the archived ones are the recipe history
    ("no gate", "archive/online.json"),
    ("gate", "archive/online_gate.json"),
    ("gate, filled draft vocabulary", "archive/online_vfill.json"),
    ("gate, 8 requests × 4 epochs per step, 14 shifted windows", "archive/online_r8.json"),
    ("no gate, 8 requests × 4 epochs, filled draft", "archive/online_nogate_r8.json"),
    ("no gate, rollback beyond noise (live judge, z 1.645)", "archive/online_nogate_z.json"),
    ("no gate, 8 epochs, live judge", "archive/online_nogate_z_ep8.json"),
    ("the same, repeated", "archive/online_nogate_z_ep8_rep.json"),
    ("paired judge, 8 epochs", "archive/online_paired_ep8.json"),
    ("paired judge, 16 epochs", "online_paired_ep16.json"),
    ("**the defaults, no flags** (paired judge, 8 epochs)", "online_defaults.json"),
]


def online_history() -> str:
    rows = []
    for label, rel in ONLINE_RUNS:
        d = load(rel)
        sh, vs = d["shifted"], d.get("vs_static") or {}
        rows.append([label, link(rel), f"{sh['tau_before']:.2f} → {sh['tau_after']:.2f}",
                     f"{100 * (sh['tau_after'] / sh['tau_before'] - 1):+.1f}%",
                     *(f"{vs[k]:.3f}" if vs.get(k) else "–"
                       for k in ("shifted_last_window", "shifted_second_half", "chat_again")),
                     str(d["failed_requests"]), str(d["greedy_mismatches"])])
    return table(["run", "JSON", "shifted τ (online), first → last window", "rise", "online ÷ static, last shifted "
                  "window", "shifted 2nd half", "chat after the shift", "failed", "greedy mismatches"], rows)


TABLES: dict[str, Callable[[], str]] = {
    "headline": headline,
    "make-run-tasks": make_run_tasks,
    "make-run-machines": make_run_machines,
    "byo": byo,
    "byo-adaptive": lambda: byo("byo/adaptive/byo.json"),
    "long-job": long_job,
    "loss-ablation": loss_ablation,
    "fspad-trees": fspad_trees,
    "online-history": online_history,
    "adaptive-vs-fixed": adaptive_vs_fixed,
    "adaptive-policy-v2": lambda: adaptive_vs_fixed("sampling/policy_v2/adaptive.json"),
}


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(text: str, cache: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table <!-- summary:{name} --> (known: {', '.join(TABLES)})")
        if name not in cache:
            cache[name] = TABLES[name]()
        return f"<!-- summary:{name} -->\n\n{cache[name]}\n\n<!-- /summary:{name} -->"

    return MARKER.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a committed table differs")
    args = ap.parse_args(argv)
    cache: dict[str, str] = {}
    stale = []
    for path in documents():
        old = path.read_text()
        new = render(old, cache, str(path.relative_to(ROOT)))
        if new == old:
            continue
        stale.append(path.relative_to(ROOT))
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       f"{path.relative_to(ROOT)} (committed)", "generated"))
        else:
            path.write_text(new)
    if args.check and stale:
        print(f"tables out of date in {', '.join(map(str, stale))}: run `python -m bench.summary`", file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {', '.join(map(str, stale))}" if stale else "tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
