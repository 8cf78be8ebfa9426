"""`report.md` + `report.png` of a run: block efficiency by task and γ (pretrained vs distilled),
acceptance by draft position, and the training curves logged to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from draftalign.io import read_json
from draftalign.storage import published

STAGE_TIMES = "stage_times.json"  # {stage: {"seconds", "machine"}}, each timed by the run that did the stage


def _machine_words(m: dict) -> str:
    isa = "AMX" if m.get("amx") else "native bf16" if m.get("bf16_native") else "no native bf16"
    return f"{m.get('cores')} cores of {m.get('cpu')} ({isa})"


def stages_line(run: Path) -> str:
    """'generate 254 s · pretrain 98 s · … on 2 cores of <cpu> (native bf16)' from the run dir's stage times, each
    stage's machine named where they differ ('' when none is recorded)."""
    times = read_json(run / STAGE_TIMES) or {}
    machines = {_machine_words(t["machine"]) for t in times.values()}
    if len(machines) == 1:
        return " · ".join(f"{k} {t['seconds']:.0f} s" for k, t in times.items()) + f" on {machines.pop()}"
    return " · ".join(f"{k} {t['seconds']:.0f} s on {_machine_words(t['machine'])}" for k, t in times.items())


CURVES = [("pretrain", "loss"), ("distill", "loss"), ("distill", "heldout_acceptance"), ("distill", "acceptance")]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _scalars(run: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under <run>/tensorboard/<stage> (event files, any depth)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    root = run / "tensorboard" / stage
    for ev in sorted(root.rglob("events.out.tfevents.*")) if root.exists() else []:
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series.setdefault(tag.split("/")[-1], []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in series.items()}


def _stage3_adds(distilled: dict, task: str, gamma: int) -> str:
    """"; stage 3 adds Δτ [paired CI]" from the distilled eval's paired difference with the pretrained arm."""
    paired = distilled.get("paired", {}).get(f"pretrained@{gamma}", {})
    d = paired.get(task, {}).get("block_efficiency")
    if not d or not d.get("ci95"):
        return ""
    return f"; stage 3 adds Δτ {d['delta']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] (paired over prompts)"


def _ci(r: dict, key: str, fmt: str = "{:.2f}") -> str:
    lo_hi = r.get("ci95", {}).get(key)
    return f" [{fmt.format(lo_hi[0])}, {fmt.format(lo_hi[1])}]" if lo_hi else ""


def _table(evals: dict[str, dict]) -> list[str]:
    lines = ["| draft | γ | task | n | α (per token) | τ [95% CI] | E[τ] | c | v | speedup [95% CI] | bound τ/(γc+v) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, ev in evals.items():
        for g, block in ev.get("by_gamma", {str(ev["gamma"]): ev}).items():
            for task, r in [*block["tasks"].items(), ("overall", block["overall"])]:
                lines.append(f"| {name} | {g} | {task} | {r['n_prompts']} | {r['acceptance_rate']:.3f}"
                             f"{_ci(r, 'acceptance_rate', '{:.3f}')} | {r['block_efficiency']:.2f}"
                             f"{_ci(r, 'block_efficiency')} | {r['expected_block_efficiency']:.2f} | "
                             f"{r['cost_ratio_c']:.3f} | {r.get('verify_cost_v', 0):.2f} | {r['speedup']:.2f}x"
                             f"{_ci(r, 'speedup')} | {r.get('speedup_bound', 0):.2f}x |")
    return lines


def headline_gamma(run: Path, evals: dict[str, dict]) -> int:
    """The γ the headline reports: the job's served γ (serve.gamma) when every eval measured it, else the
    first γ measured (an eval over γ = 1, 3, 5 of a job serving γ = 3 headlines γ = 3, not 1)."""
    job = _load(run / "job.json") or {}
    g = job.get("serve", {}).get("gamma")
    if g is not None and all(str(g) in ev.get("by_gamma", {}) for ev in evals.values()):
        return int(g)
    return next(iter(evals.values()))["gamma"] if evals else 0


def _at(ev: dict, g: int) -> dict:
    """An eval's {tasks, overall} block at γ = g (the top level holds the first γ)."""
    return ev.get("by_gamma", {}).get(str(g), ev)


def _sampled_evals(run: Path) -> dict[str, dict]:
    """eval.sampled's evals ({draft: eval JSON}, e.g. eval_distilled_t1.json), when the job ran one."""
    job = (_load(run / "job.json") or {}).get("eval", {}).get("sampled")
    if not job:
        return {}
    tag = f"t{job['temperature']:g}"
    return {name: ev for name in ("pretrained", "distilled") if (ev := _load(run / f"eval_{name}_{tag}.json"))}


def _headlines(run: Path, evals: dict[str, dict], stage3: str) -> list[str]:
    """τ, α and speedup on chat and overall at the headline γ: stage 1 → stage 3 with stage 3's paired gain, or the
    one draft of an FSPAD run."""
    if not evals:
        return []
    g = headline_gamma(run, evals)
    t = next(iter(evals.values()))["temperature"]
    mode = f"γ = {g}" + (f", T = {t:g}" if t else "")
    lines = []
    b = _at(evals["distilled"], g) if "distilled" in evals else None
    a = _at(evals["pretrained"], g) if "pretrained" in evals else None
    for task in ("chat", "overall"):
        rb = (b["tasks"].get(task) if task != "overall" else b["overall"]) if b else None
        ra = (a["tasks"].get(task) if task != "overall" else a["overall"]) if a else None
        if ra and rb:
            lines.append(f"- **{task}** ({mode}): block efficiency τ {ra['block_efficiency']:.2f}"
                         f"{_ci(ra, 'block_efficiency')} after stage 1 (pretrained) → "
                         f"{rb['block_efficiency']:.2f}{_ci(rb, 'block_efficiency')} after stage 3 (distilled); "
                         f"α {ra['acceptance_rate']:.3f} → {rb['acceptance_rate']:.3f}; speedup over target-only "
                         f"{ra['speedup']:.2f}x → {rb['speedup']:.2f}x{_ci(rb, 'speedup')}"
                         + _stage3_adds(evals["distilled"], task, g))
        elif rb and len(evals) == 1:
            lines.append(f"- **{task}** ({mode}, {stage3}): block efficiency τ {rb['block_efficiency']:.2f}"
                         f"{_ci(rb, 'block_efficiency')}; α {rb['acceptance_rate']:.3f}; speedup over "
                         f"target-only {rb['speedup']:.2f}x{_ci(rb, 'speedup')}")
    return lines


def _train_serve_gap(distill: dict, ev: dict | None) -> list[str]:
    """The training-side held-out acceptance beside the engine's, same definition on both sides: a greedy eval
    ↔ argmax agreement, a sampled eval ↔ 1 − TVD."""
    measured = (ev or {}).get("overall", {})
    if not distill or not measured:
        return []
    greedy = ev["temperature"] == 0
    key = "heldout_greedy_acceptance" if greedy else "heldout_acceptance"
    at = "" if greedy else f" at T = {ev['temperature']:g}"
    lines = []
    if distill.get(key) is not None:
        lines.append(f"- acceptance estimated in training on held-out target answers ({key}): "
                     f"{distill[key]:.3f}; measured by the engine on the eval prompts{at}: "
                     f"{measured['acceptance_rate']:.3f}; gap {distill[key] - measured['acceptance_rate']:+.3f}")
    steps = [distill.get(key)] + [distill.get(f"{key}_{k}") for k in (2, 3)]
    pos = measured.get("acceptance_per_position") or []
    if None not in steps and len(pos) >= 2:  # the head's training-time test logs steps 2, 3 on its own f̂
        cond = [pos[0]] + [pos[i] / pos[i - 1] if pos[i - 1] else 0.0 for i in range(1, min(3, len(pos)))]
        lines.append(f"- acceptance by chain step k, held-out in training (steps ≥ 2 on the head's own "
                     f"features): {' / '.join(f'{a:.3f}' for a in steps)}; the engine's P(accepted at k | "
                     f"accepted at k − 1): {' / '.join(f'{a:.3f}' for a in cond)}")
    return lines


def write_report(run: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = {name: ev for name in ("pretrained", "distilled") if (ev := _load(run / f"eval_{name}.json"))}
    stage3 = "fspad" if (run / "fspad_done.json").is_file() else "distill"  # draft.kind=fspad: no stage 1
    distill = _load(run / f"{stage3}_done.json") or {}
    curves = {stage: _scalars(run, stage) for stage in ("pretrain", stage3)}

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0, 0]
    tasks = sorted({t for ev in evals.values() for t in ev["tasks"]})
    for i, (name, ev) in enumerate(evals.items()):
        ax.bar([j + 0.4 * i for j in range(len(tasks))], [ev["tasks"][t]["block_efficiency"] for t in tasks],
               width=0.4, label=f"{name} (γ={ev['gamma']})")
    ax.set_xticks([j + 0.2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("block efficiency τ")
    ax.set_title("Block efficiency by task")
    ax.legend()
    ax = axes[0, 1]
    for name, ev in evals.items():
        pos = ev["overall"]["acceptance_per_position"]
        ax.plot(range(1, len(pos) + 1), pos, marker="o", label=name)
    ax.set_xlabel("draft position i")
    ax.set_ylabel("P(accepted at i)")
    ax.set_title("Acceptance by draft position")
    ax.legend()
    for ax, (stage, key) in zip(axes[1], [("pretrain", "loss"), (stage3, "loss")]):
        s = curves[stage].get(key, [])
        if s:
            ax.plot(*zip(*s), label=f"{stage} {key}")
        if stage == stage3:
            for extra in ("heldout_acceptance", "acceptance"):
                if extra in curves[stage]:
                    ax2 = ax.twinx()
                    ax2.plot(*zip(*curves[stage][extra]), color="tab:green", label=extra)
                    ax2.set_ylabel(extra)
                    break
        ax.set_xlabel("step")
        ax.set_title(f"{stage} curves")
        if ax.get_legend_handles_labels()[0]:  # an FSPAD run has no stage-1 loss curve to label
            ax.legend(loc="upper right")
    fig.tight_layout()
    png = run / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    lines = [f"# draftalign report: {run.name}", "", *_headlines(run, evals, stage3),
             *_train_serve_gap(distill, evals.get("distilled"))]
    sampled = _sampled_evals(run)
    if sampled:
        lines += [*_headlines(run, sampled, stage3), *_train_serve_gap(distill, sampled.get("distilled"))]
    if any(ev.get("interleaved_with") for ev in evals.values()):
        ev = next(iter(evals.values()))
        m = ev.get("machine", {})
        lines.append(f"- one interleaved measurement: target-only and every draft arm ran prompt by prompt in "
                     f"turn ({', '.join(ev['interleaved_with'])}), batch 1, {ev['dtype']}, "
                     f"{m.get('threads')} threads on {m.get('cores')} cores ({m.get('cpu')}); intervals are "
                     f"95% bootstrap over prompts")
    if stages := stages_line(run):
        lines.append(f"- stage times (each from the run that did it): {stages}")
    lines += ["", *_table(evals), ""]
    if sampled:
        t = next(iter(sampled.values()))["temperature"]
        lines += [f"Sampled at T = {t:g} (eval.sampled; its own interleaved run):", "", *_table(sampled), ""]
    lines += ["![report](report.png)", ""]
    if distill:
        lines += ["## Distillation counters", "", "```json", json.dumps(distill, indent=2), "```", ""]
    md = run / "report.md"
    md.write_text("\n".join(lines))
    for f in (png, md):
        published(f)  # a URI run: to its storage
    return md
