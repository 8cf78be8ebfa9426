"""bf16 decoding against the fp32 reference: greedy mismatches, and the verification cost t(γ+1)/t(1).

Where the CPU computes bf16 natively (AVX512-BF16 / AMX, what `draftalign.models.pick_dtype` detects
for `dtype: auto`), a decoding step reads half the weight bytes and a verification pass over γ + 1
tokens should cost about one step (the engine issue's goal: t(γ+1)/t(1) ≤ 1.15). fp32 stays the
reference. This bench decodes the same held-out prompts, greedy, interleaved per prompt, with

- `fp32_target` target-only decoding in fp32 — the reference;
- `fp32_spec`   speculative decoding in fp32 (must equal the reference: 0 mismatches);
- `bf16_target` target-only decoding with target and draft cast to bf16;
- `bf16_spec`   speculative decoding in bf16 (must equal `bf16_target`: lossless within bf16),

and reports, per arm, tokens/s, τ, and greedy mismatches against the reference with the position of the
first differing token (bf16 rounding flips near-ties of the target's argmax: that count is the price of
bf16, not a losslessness failure). Then the step costs of each dtype (`SpecDecoder.measure_step_costs`):
t(n)/t(1) for n = 1 … γ + 1 target rows, and the draft step. On a CPU without native bf16 the bf16
arithmetic is emulated, so its timings say nothing about an AMX machine: the JSON records which it was.

    .venv/bin/python bench/bf16.py --job cluster/jobs/local.yaml --run runs/local --out bench/results/bf16.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.evaluate import eval_prompts, load_pair, machine  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from draftalign.models import draft_step_dtype  # noqa: E402
from draftalign.sampling import SamplingParams  # noqa: E402
from serve.specdec import SpecDecoder  # noqa: E402

ARMS = ("fp32_target", "fp32_spec", "bf16_target", "bf16_spec")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def step_ratios(engine: SpecDecoder) -> dict:
    """t(n)/t(1) of target passes over n = 1 … γ + 1 rows and the draft step, batch 1 (medians)."""
    costs = engine.measure_step_costs((1,), repeats=5)
    t1 = costs.target[1]
    return {"target_step_ms": 1e3 * t1, "draft_step_ms": 1e3 * costs.draft[1],
            "t_n_over_t_1": {str(n): costs.target[n] / t1 for n in sorted(costs.target)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--run", default="runs/local", help="run dir whose draft_distilled is the draft")
    ap.add_argument("--draft", default=None, help="draft path (default: <run>/draft_distilled)")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16, help="held-out chat prompts (plus a quarter each of code "
                                                             "and summaries)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="runs/bench/bf16.json",
                    help="JSON to write (default under runs/; committed results take an explicit bench/results/ path)")
    args = ap.parse_args()

    n_other = max(1, args.prompts // 4)
    cfg = load_config(args.job, [f"eval.prompts_per_task={{chat: {args.prompts}, code: {n_other}, "
                                 f"summarize: {n_other}}}", f"eval.max_new_tokens={args.max_new_tokens}",
                                 f"eval.gamma=[{args.gamma}]", "eval.temperature=0", "target.dtype=float32"])
    torch.set_num_threads(os.cpu_count() or 1)
    target, draft, tok, vocab, _ = load_pair(cfg, args.draft or str(Path(args.run) / "draft_distilled"))
    prompts = [p for ps in eval_prompts(tok, cfg, target.config.max_position_embeddings).values() for p in ps]
    t16, d16 = copy.deepcopy(target).to(torch.bfloat16), copy.deepcopy(draft).to(torch.bfloat16)
    e32 = SpecDecoder(target, draft, tok, args.gamma, draft_vocab=vocab,
                      draft_step_dtype=draft_step_dtype(cfg.draft.step_dtype, draft.dtype))
    e16 = SpecDecoder(t16, d16, tok, args.gamma, draft_vocab=vocab)
    engines = {"fp32_target": (e32, False), "fp32_spec": (e32, True), "bf16_target": (e16, False),
               "bf16_spec": (e16, True)}
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    info = machine()
    print(f"bf16 bench: {len(prompts)} prompts × {args.max_new_tokens} tokens, γ={args.gamma}, {info}", flush=True)

    def run(arm: str, prompt: list[int]) -> dict:
        engine, spec = engines[arm]
        t0 = time.perf_counter()
        g = engine.generate([prompt], params)[0] if spec else engine.generate_target_only([prompt], params)[0]
        return {"tokens": g.token_ids, "s": time.perf_counter() - t0, "rounds": g.rounds}

    for arm in ARMS:  # warm-up
        run(arm, prompts[0])
    recs: dict[str, list[dict]] = {a: [] for a in ARMS}
    for i, p in enumerate(prompts):
        for arm in ARMS[i % len(ARMS):] + ARMS[:i % len(ARMS)]:
            recs[arm].append(run(arm, p))
        print(f"  prompt {i + 1}/{len(prompts)}", end="\r", flush=True)
    print()

    def mismatches(arm: str, ref: str) -> dict:
        firsts = [first_difference(r["tokens"], x["tokens"]) for r, x in zip(recs[arm], recs[ref])]
        diff = [f for f in firsts if f is not None]
        return {"prompts": len(firsts), "mismatches": len(diff), "first_difference_at": diff}

    rows = {}
    for a in ARMS:
        toks = sum(len(r["tokens"]) for r in recs[a])
        rows[a] = {"tokens_per_s": toks / sum(r["s"] for r in recs[a]),
                   "block_efficiency": toks / sum(r["rounds"] for r in recs[a]),
                   "vs_fp32_reference": mismatches(a, "fp32_target")}
    rows["bf16_spec"]["vs_bf16_target"] = mismatches("bf16_spec", "bf16_target")
    costs = {"float32": step_ratios(e32), "bfloat16": step_ratios(e16)}
    result = {"job": args.job, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens, "machine": info,
              "bf16_native": bool(info.get("bf16_native")), "arms": rows, "step_costs": costs,
              "note": "bf16 timings are emulated (no native bf16) unless bf16_native is true"}
    print("| arm | tokens/s | τ | greedy mismatches vs fp32 target-only | first difference at |")
    print("|---|---|---|---|---|")
    for a, r in rows.items():
        m = r["vs_fp32_reference"]
        print(f"| {a} | {r['tokens_per_s']:.1f} | {r['block_efficiency']:.2f} | {m['mismatches']} / {m['prompts']} "
              f"| {m['first_difference_at'] or '–'} |")
    m = rows["bf16_spec"]["vs_bf16_target"]
    print(f"bf16 speculative vs bf16 target-only (losslessness within bf16): {m['mismatches']} / {m['prompts']}")
    for dt, c in costs.items():
        ratios = ", ".join(f"t({n})/t(1) {v:.2f}" for n, v in c["t_n_over_t_1"].items())
        print(f"{dt}: target step {c['target_step_ms']:.1f} ms, draft step {c['draft_step_ms']:.2f} ms; {ratios}")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
