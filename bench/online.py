"""Online distillation bench (issue #16): does the endpoint learn the traffic it serves?

Two arms serve the same traffic, one after the other, on one Ray Serve instance (native engine, the job's
trained draft, greedy, fixed γ = serve.gamma):

    static   serve.online off: the draft never changes
    online   capture on, the online learner (learner/online.py) next to the endpoint, versions hot-swapped
             (serve/online.py; rollback on a worse version as configured)

Traffic, in windows of W requests from C concurrent clients (chat completions, max_tokens M):

    chat (A windows) → shifted: code + summarize, alternating (S windows) → chat again (A windows)

Per window: block efficiency τ = completion tokens / target passes (the `spec_decoding.rounds` of every
request), per-token α = accepted / (accepted + rejected), completion tokens/s over the window's wall time,
failed requests, and the draft version the replica served at the window's end. Every answer is compared
with target-only greedy decoding of the same prompt (a third app without a draft, run once per prompt).
Summary (`online.json`): shifted τ of the first and last shifted window (`tau_before`, `tau_after`), chat τ of
the first and last chat phase, for both arms; `vs_static`: online ÷ static τ pooled over the same windows (the
last shifted one, the shifted phase's second half, the second chat phase) — paired, since both arms serve the same
prompts per window; failed requests and greedy mismatches; the learner's counters.
Goal of the issue: shifted τ +30% within the run, chat τ within −5%, no failure, no mismatch. The PNG plots
τ and tokens/s per window against requests served.

    .venv/bin/python bench/online.py [--quick] [--job J.yaml] [--draft D] [--set key=value ...] --out F.json

The replay set is the job's distillation set (run_dir/distill_set, with the target's top-k): run the job's
`draftalign generate` first, or `--set serve.online.learner.replay_fraction=0`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clients import QUIET, free_port, run_clients  # noqa: E402
from draftalign.config import load_config  # noqa: E402
from draftalign.data import chat_messages, chat_prompt_ids, code_messages, summarize_messages  # noqa: E402
from draftalign.evaluate import machine  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from serve.acceptance import per_token_acceptance  # noqa: E402

ARMS = ("static", "online")


def schedule(chat_windows: int, shifted_windows: int, per_window: int, seed: int = 1,
             fits=lambda messages: True) -> list[dict]:
    """Windows [{"phase", "prompts": [messages, …]}]: chat, shifted (code and summarize alternating), chat again.
    The two chat phases use different held-out prompts; prompts failing `fits` (too long for the context: the
    endpoint rightly answers 400) are left out, so a failed request means a failure."""
    n_chat, n_shift = 2 * chat_windows * per_window, shifted_windows * per_window

    def take(source, n: int) -> list:
        kept = [m["messages"] for m in source(2 * n + 8) if fits(m["messages"])]
        if len(kept) < n:
            raise ValueError(f"only {len(kept)} of the {n} prompts needed fit the context")
        return kept[:n]

    chat = take(lambda n: chat_messages("eval", n, seed=seed), n_chat)
    code = take(code_messages, (n_shift + 1) // 2)
    summ = take(lambda n: summarize_messages("eval", n, seed=seed), n_shift // 2 + 1)
    shifted = [(code if i % 2 == 0 else summ)[i // 2] for i in range(n_shift)]
    out = []
    for phase, prompts, count in (("chat", chat[: n_chat // 2], chat_windows), ("shifted", shifted, shifted_windows),
                                  ("chat_again", chat[n_chat // 2:], chat_windows)):
        out += [{"phase": phase, "prompts": prompts[w * per_window: (w + 1) * per_window]} for w in range(count)]
    return out


async def _window(url: str, model: str, prompts: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """The window's requests split among `clients` concurrent clients (client i: prompts i, i + clients, …);
    per-request records in prompt order, and the wall time."""
    got = await run_clients(url, model, prompts, [list(range(i, len(prompts), clients)) for i in range(clients)],
                            max_tokens)
    return {"wall_s": got["wall_s"], "records": sorted(got["records"], key=lambda r: r["prompt"])}


def _summary(run: dict) -> dict:
    ok = [r for r in run["records"] if "error" not in r]
    tokens, rounds = sum(r["completion_tokens"] for r in ok), sum(r["rounds"] for r in ok)
    accepted, rejected = sum(r["accepted"] for r in ok), sum(r["rejected"] for r in ok)
    return {"requests": len(run["records"]), "failed": len(run["records"]) - len(ok),
            "errors": [r["error"] for r in run["records"] if "error" in r][:3],
            "tau": tokens / rounds if rounds else None, "alpha": per_token_acceptance(accepted, rejected),
            "completion_tokens": tokens, "rounds": rounds, "wall_s": run["wall_s"],
            "tokens_per_s": tokens / run["wall_s"] if run["wall_s"] else 0.0}


def _phase_tau(windows: list[dict], phase: str, which: int) -> float | None:
    taus = [w["tau"] for w in windows if w["phase"] == phase]
    return taus[which] if taus else None


def vs_static(online: list[dict], static: list[dict], phase: str, last: int | None = None) -> float | None:
    """τ(online) / τ(static) pooled over a phase's windows (its `last` ones): both arms served the same prompts in
    the same windows, so the ratio is paired — what the learner added, net of which prompts a window drew."""
    pick = lambda ws: [w for w in ws if w["phase"] == phase][-last if last else 0:]  # noqa: E731
    on, st = pick(online), pick(static)
    tau = lambda ws: sum(w["completion_tokens"] for w in ws) / max(1, sum(w["rounds"] for w in ws))  # noqa: E731
    return tau(on) / tau(st) if on and st and tau(st) else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for arm, style in zip(ARMS, ("o--", "o-"), strict=True):
        ws = result["arms"][arm]["windows"]
        served = [w["requests_served"] for w in ws]
        axes[0].plot(served, [w["tau"] for w in ws], style, label=arm)
        axes[1].plot(served, [w["tokens_per_s"] for w in ws], style, label=arm)
    ws = result["arms"]["online"]["windows"]
    start = 0
    for w in ws:  # shade the shifted phase
        if w["phase"] == "shifted":
            for ax in axes:
                ax.axvspan(start, w["requests_served"], color="0.9", lw=0)
        start = w["requests_served"]
    axes[0].set_ylabel("τ (tokens / target pass)")
    axes[1].set_ylabel("completion tokens / s")
    axes[1].set_xlabel("requests served (shaded: code + summarize)")
    axes[0].legend()
    axes[0].set_title(f"online distillation: {result['target']} + {Path(result['draft']).name}, γ = {result['gamma']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--draft", default=None, help="draft path (default: the job's newest trained draft)")
    ap.add_argument("--chat-windows", type=int, default=None, help="windows per chat phase (quick 1, else 2)")
    ap.add_argument("--shifted-windows", type=int, default=None, help="shifted windows (quick 2, else 8)")
    ap.add_argument("--per-window", type=int, default=None, help="requests per window (quick 4, else 16)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (quick 2, else 4)")
    ap.add_argument("--max-tokens", type=int, default=None, help="completion tokens (quick 16, else 64)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="job override key.path=value")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few minutes, not a measurement")
    ap.add_argument("--out", default="runs/bench/online.json",
                    help="JSON to write (default under runs/; committed results take an explicit bench/results/ path)")
    args = ap.parse_args()

    quick = {"chat_windows": 1, "shifted_windows": 2, "per_window": 4, "clients": 2, "max_tokens": 16}
    full = {"chat_windows": 2, "shifted_windows": 8, "per_window": 16, "clients": 4, "max_tokens": 64}
    knobs = {k: getattr(args, k) if getattr(args, k) is not None else (quick if args.quick else full)[k]
             for k in quick}
    cfg = load_config(args.job if Path(args.job).exists() else None,
                      [f"serve.max_tokens_cap={knobs['max_tokens']}", "serve.gamma_policy=fixed",
                       *args.overrides])
    base_online = cfg.serve.online.model_dump()

    import ray
    from ray import serve

    from draftalign.models import default_draft, load_tokenizer, resolve_target
    from draftalign.runtime import init_ray
    from learner.online import start_online_learner
    from serve.app import build_app, context_window

    target = resolve_target(cfg.target.model)
    draft = str(Path(args.draft).expanduser().resolve()) if args.draft else default_draft(cfg)
    tok = load_tokenizer(target)
    # the endpoint's own bound (serve/app.py `_params`): prompt + max_tokens + γ within the replica's context
    room = context_window(target, draft, cfg.target.max_model_len) - cfg.serve.gamma - knobs["max_tokens"]
    windows = schedule(knobs["chat_windows"], knobs["shifted_windows"], knobs["per_window"],
                       fits=lambda m: len(chat_prompt_ids(tok, m)) <= room)
    print(f"bench: target={cfg.target.model} draft={draft} gamma={cfg.serve.gamma} windows={len(windows)} × "
          f"{knobs['per_window']} requests, {knobs['clients']} clients, max_tokens={knobs['max_tokens']}", flush=True)
    online = cfg.model_copy(deep=True)
    online.serve.online = type(cfg.serve.online).model_validate({
        **base_online, "enabled": True, "weight_store": base_online["weight_store"] or f"bench-{cfg.name}-weights",
        "learner": {**base_online["learner"], "enabled": True}})
    port, model = free_port(), cfg.serve.model_name
    url = f"http://127.0.0.1:{port}"
    result = {"target": cfg.target.model, "draft": draft, "gamma": cfg.serve.gamma, **knobs,
              "online_config": online.serve.online.model_dump(mode="json"), "machine": machine(), "arms": {}}
    init_ray(cfg)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
        # target-only greedy answers: the reference every speculative answer must equal
        serve.run(build_app(cfg, target, None), name="reference", route_prefix="/reference", logging_config=QUIET)
        reference = [asyncio.run(_window(f"{url}/reference/v1", model, w["prompts"], knobs["clients"],
                                         knobs["max_tokens"])) for w in windows]
        serve.delete("reference")
        for arm in ARMS:
            arm_cfg = online if arm == "online" else cfg
            serve.run(build_app(arm_cfg, target, draft), name=arm, route_prefix=f"/{arm}", logging_config=QUIET)
            learner = start_online_learner(arm_cfg, draft)[0] if arm == "online" else None
            replica = serve.get_deployment_handle("SpecDecodeReplica", app_name=arm)
            served, out = 0, []
            for i, w in enumerate(windows):
                run = asyncio.run(_window(f"{url}/{arm}/v1", model, w["prompts"], knobs["clients"],
                                          knobs["max_tokens"]))
                s = _summary(run)
                ref = {r["prompt"]: r.get("text") for r in reference[i]["records"]}
                s["greedy_mismatches"] = sum(r["text"] != ref.get(r["prompt"]) for r in run["records"]
                                             if "error" not in r)
                served += s["requests"]
                st = replica.online_stats.remote().result() if arm == "online" else None
                s |= {"phase": w["phase"], "requests_served": served,
                      "draft_version": st["draft_version"] if st else 0}
                out.append(s)
                print(f"{arm} window {i} ({w['phase']}): τ {s['tau']:.2f} α {s['alpha']:.3f} "
                      f"{s['tokens_per_s']:.1f} tokens/s, failed {s['failed']}, mismatches {s['greedy_mismatches']}, "
                      f"draft version {s['draft_version']}", flush=True)
            arm_result = {"windows": out}
            if learner is not None:
                ls = ray.get(learner.stats.remote())
                arm_result["learner"] = {k: v for k, v in ls.items() if k != "history"}
                trials = [e for e in st["events"] if e["event"] in ("keep", "rollback")]  # the replica keeps ≤ 256
                arm_result["replica"] = {k: v for k, v in st.items() if k != "events"} | {
                    "events": [e for e in st["events"] if e["event"] != "error"][-20:], "trials": trials,
                    "verdicts": {"kept": sum(e["event"] == "keep" for e in trials),
                                 "rolled_back": sum(e["event"] == "rollback" for e in trials),
                                 "live_rule_would_roll_back": sum(e.get("live_verdict") == "rollback"
                                                                  for e in trials)}}
                ray.get(learner.stop.remote())
            result["arms"][arm] = arm_result
            serve.delete(arm)
    finally:
        serve.shutdown()
        ray.shutdown()

    for arm in ARMS:
        ws = result["arms"][arm]["windows"]
        result["arms"][arm] |= {"shifted": {"tau_before": _phase_tau(ws, "shifted", 0),
                                            "tau_after": _phase_tau(ws, "shifted", -1)},
                                "chat": {"tau_before": _phase_tau(ws, "chat", 0),
                                         "tau_after": _phase_tau(ws, "chat_again", -1)}}
    on = result["arms"]["online"]
    won, wst = on["windows"], result["arms"]["static"]["windows"]
    half = max(1, sum(w["phase"] == "shifted" for w in won) // 2)
    result["vs_static"] = {"shifted_last_window": vs_static(won, wst, "shifted", 1),
                           "shifted_second_half": vs_static(won, wst, "shifted", half),
                           "chat_again": vs_static(won, wst, "chat_again")}
    result |= {"shifted": on["shifted"], "chat": on["chat"],
               "failed_requests": sum(w["failed"] for a in ARMS for w in result["arms"][a]["windows"]),
               "greedy_mismatches": sum(w["greedy_mismatches"] for a in ARMS for w in result["arms"][a]["windows"]),
               "reference_failed": sum(_summary(r)["failed"] for r in reference)}
    print("\n| arm | shifted τ first → last window | chat τ first → last phase | failed | greedy mismatches |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        a = result["arms"][arm]
        f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"| {arm} | {f(a['shifted']['tau_before'])} → {f(a['shifted']['tau_after'])} | "
              f"{f(a['chat']['tau_before'])} → {f(a['chat']['tau_after'])} | "
              f"{sum(w['failed'] for w in a['windows'])} | {sum(w['greedy_mismatches'] for w in a['windows'])} |")
    print("online ÷ static τ on the same windows' prompts: " + ", ".join(
        f"{k} {v:.3f}" if v else f"{k} n/a" for k, v in result["vs_static"].items()))
    out = Path(args.out)
    write_json_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
