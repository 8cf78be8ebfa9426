"""Decoding benchmark: every arm on the same prompts, batch 1, greedy, interleaved per prompt, one process.

Arms (order rotating from prompt to prompt, so machine drift falls on all of them alike):
- `target_only`   draftalign's engine without a draft;
- `hf_generate`   Hugging Face `generate` of the target alone — the independent greedy reference;
- `draftalign`    speculative decoding in draftalign's engine with the draft's own vocabulary and the
                  job's `draft.step_dtype` (float16 single-row draft products on CPU by default);
- `draftalign_own_dtype`  the same with every draft product in the draft's own dtype (when they differ);
- `hf_assisted`   HF assisted generation (`assistant_model=draft`, γ constant) with the same draft;
- `draftalign_N`  the same draft decoded with its head restricted to the N most frequent target tokens
                  of the run's distillation set (FR-Spec, training-free), N in --vocab;
- `vllm_spec`     vLLM's own speculative decoding (`draft_model`), timed after the others (its engine
                  owns the process); skipped with --no-vllm.
Per arm: tokens/s, greedy mismatches against `hf_generate`; for draftalign's arms τ, α, the step costs
t₁ (target step), t_v (verification of γ + 1 tokens), t_d (draft step), c = t_d / t₁, v = t_v / t₁ and
the bound τ / (γc + v). Roofline: the target's weight bytes read per step ÷ the measured memory
bandwidth (a large tensor copy). Then one sampling check (T = 1): the target's mean log-prob of the
tokens each arm samples must match plain target sampling (KS two-sample, p > 0.01).

    .venv/bin/python bench/specdec.py --run runs/local [--quick] --out bench/results/specdec.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import ks_2samp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import load_config  # noqa: E402
from draftalign.evaluate import eval_prompts, load_pair, machine  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from draftalign.models import draft_step_dtype, resolve_target, save_pretrained_atomic  # noqa: E402
from draftalign.runtime import configure_vllm_env  # noqa: E402
from draftalign.sampling import SamplingParams  # noqa: E402
from draftalign.vocab import frequent_tokens  # noqa: E402
from serve.acceptance import per_token_acceptance  # noqa: E402
from serve.specdec import SpecDecoder  # noqa: E402

P_MIN = 0.01


def bandwidth_gb_s(mib: int = 512, reps: int = 5) -> float:
    """Memory bandwidth of a large tensor copy (read + write bytes per second), best of `reps`."""
    a = torch.empty(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every parameter, the embedding table counted once as the
    (tied) LM head — the input lookup reads one row."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def target_logprob_means(target, prompt: list[int], samples: list[list[int]]) -> list[float]:
    """Mean target log-prob (temperature 1) of each sampled continuation, teacher-forced."""
    out = []
    for s in samples:
        if s:
            ids = torch.tensor([prompt + s])
            logp = torch.log_softmax(target(ids).logits[0, len(prompt) - 1:-1].float(), -1)  # (T, V)
            out.append(logp.gather(-1, torch.tensor(s)[:, None]).mean().item())
    return out


def _cut(y: list[int], eos: int) -> list[int]:
    return y[: y.index(eos) + 1] if eos in y else y


def hf_generate(target, prompt, max_new, eos, assistant=None, gamma=3, sample_seed=None):
    """HF `generate` of the target alone, or assisted by `assistant` with γ constant draft tokens."""
    kw = {"do_sample": False}
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        kw = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    if assistant is not None:
        gc_ = assistant.generation_config
        gc_.num_assistant_tokens, gc_.num_assistant_tokens_schedule = gamma, "constant"
        gc_.assistant_confidence_threshold = 0.0
        kw["assistant_model"] = assistant
    ids = torch.tensor([prompt])
    y = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, pad_token_id=eos,
                        **kw)[0, len(prompt):].tolist()
    return _cut(y, eos)


class VllmSpec:
    """vLLM's own speculative decoding with the same draft (method "draft_model")."""

    def __init__(self, target_path: str, draft_path: str, gamma: int, dtype: str, max_len: int):
        configure_vllm_env(1.0, threads=os.cpu_count())
        from vllm import LLM

        self.llm = LLM(target_path, dtype=dtype, enforce_eager=True, max_model_len=max_len, seed=0,
                       speculative_config={"method": "draft_model", "model": draft_path,
                                           "num_speculative_tokens": gamma})

    def run(self, prompt, max_new, temperature=0.0, seed=0) -> list[int]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        sp = VSP(max_tokens=max_new, temperature=temperature, top_p=1.0, seed=seed, detokenize=False)
        return list(self.llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0]
                    .outputs[0].token_ids)

    def shutdown(self):
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the engine may already be gone
            pass
        del self.llm
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--run", default="runs/local", help="run dir: its distilled draft and distillation set")
    ap.add_argument("--draft", default=None, help="draft path (default: <run>/draft_distilled)")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--vocab", type=int, nargs="*", default=[4096, 8192, 16384, 0],
                    help="decode-time draft vocabulary sizes N to compare (0 = full)")
    ap.add_argument("--quick", action="store_true", help="few prompts: finishes in a few minutes")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", default="runs/bench/specdec.json",
                    help="JSON to write (default under runs/; committed results take an explicit bench/results/ path)")
    args = ap.parse_args()

    n_chat, n_other, max_new, n_samples = (6, 2, 32, 12) if args.quick else (20, 15, 64, 40)
    cfg = load_config(args.job, [f"eval.prompts_per_task={{chat: {n_chat}, code: {n_other}, summarize: {n_other}}}",
                                 f"eval.max_new_tokens={max_new}", f"eval.gamma=[{args.gamma}]",
                                 "eval.temperature=0"])
    torch.set_num_threads(os.cpu_count() or 1)
    draft_path = args.draft or str(Path(args.run) / "draft_distilled")
    target, draft, tok, vocab, _ = load_pair(cfg, draft_path)
    eos = tok.eos_token_id
    prompts = [p for ps in eval_prompts(tok, cfg, target.config.max_position_embeddings).values() for p in ps]
    params = SamplingParams(max_new_tokens=max_new)
    g = args.gamma

    from draftalign.distset import load_distill_set

    answers = load_distill_set(args.run)["response_token_ids"]
    step = draft_step_dtype(cfg.draft.step_dtype, draft.dtype)
    engines = {"target_only": SpecDecoder(target, None, tok),
               "draftalign": SpecDecoder(target, draft, tok, g, draft_vocab=vocab, draft_step_dtype=step)}
    if step is not None:
        engines["draftalign_own_dtype"] = SpecDecoder(target, draft, tok, g, draft_vocab=vocab)
    for n in args.vocab:
        sub = None if n == 0 else frequent_tokens(answers, n, always=[eos, tok.bos_token_id, tok.pad_token_id])
        engines[f"draftalign_{n or 'full'}"] = SpecDecoder(target, draft, tok, g, draft_vocab=sub,
                                                           draft_step_dtype=step)
    ref_target = type(target).from_pretrained(resolve_target(cfg.target.model), dtype=target.dtype).eval()
    ref_draft = type(draft).from_pretrained(draft_path, dtype=draft.dtype).eval()  # HF's own, unpatched copies

    def run(arm: str, prompt: list[int]) -> dict:
        if arm == "hf_generate":
            t = _timed(lambda: out.append(hf_generate(ref_target, prompt, max_new, eos)))
            return {"tokens": out.pop(), "s": t}
        if arm == "hf_assisted":
            t = _timed(lambda: out.append(hf_generate(ref_target, prompt, max_new, eos, ref_draft, g)))
            return {"tokens": out.pop(), "s": t}
        e = engines[arm]
        e.timing.__init__()
        t = _timed(lambda: out.append(e.generate_target_only([prompt], params)[0] if arm == "target_only"
                                      else e.generate([prompt], params)[0]))
        gen = out.pop()
        tm = e.timing
        return {"tokens": gen.token_ids, "s": t, "rounds": gen.rounds, "accepted": gen.accepted,
                "rejected": gen.rejected, "target_s": tm.target_s, "target_steps": tm.target_steps,
                "draft_s": tm.draft_s, "draft_steps": tm.draft_steps}

    out: list = []
    arms = ["target_only", "hf_generate", "hf_assisted", *(a for a in engines if a != "target_only")]
    print(f"bench: {len(prompts)} prompts × {max_new} tokens, γ={g}, arms {arms}, {machine()}", flush=True)
    for _ in range(2):  # warm-up, every arm
        for arm in arms:
            run(arm, prompts[0])
    recs: dict[str, list[dict]] = {a: [] for a in arms}
    for i, p in enumerate(prompts):
        for arm in arms[i % len(arms):] + arms[:i % len(arms)]:
            recs[arm].append(run(arm, p))
        print(f"  prompt {i + 1}/{len(prompts)}", end="\r", flush=True)

    ref = [r["tokens"] for r in recs["hf_generate"]]
    tot = lambda arm, k: sum(r[k] for r in recs[arm])
    tps = {a: sum(len(r["tokens"]) for r in recs[a]) / tot(a, "s") for a in arms}
    t1 = tot("target_only", "target_s") / tot("target_only", "target_steps")
    rows = {}
    for a in arms:
        row = {"tokens_per_s": tps[a], "greedy_mismatches_vs_hf": sum(r["tokens"] != x for r, x in zip(recs[a], ref)),
               "vs_target_only": tps[a] / tps["target_only"], "vs_hf_generate": tps[a] / tps["hf_generate"]}
        if a.startswith("draftalign"):
            tau = sum(len(r["tokens"]) for r in recs[a]) / tot(a, "rounds")
            c = tot(a, "draft_s") / tot(a, "draft_steps") / t1
            v = tot(a, "target_s") / tot(a, "target_steps") / t1
            row.update(block_efficiency=tau, acceptance_rate=per_token_acceptance(tot(a, "accepted"),
                                                                                  tot(a, "rejected")),
                       cost_ratio_c=c, verify_cost_v=v, speedup_bound=tau / (g * c + v),
                       draft_step_ms=1e3 * c * t1, verify_step_ms=1e3 * v * t1,
                       speedup_vs_bound=(tps[a] / tps["target_only"]) / (tau / (g * c + v)),
                       vs_hf_assisted=tps[a] / tps["hf_assisted"])
        rows[a] = row
    bw = bandwidth_gb_s()
    wb = weight_bytes(target)
    roofline = {"bandwidth_gb_s": bw, "target_weight_bytes": wb, "floor_ms": 1e3 * wb / (bw * 1e9),
                "target_step_ms": 1e3 * t1,
                "note": "floor = weight bytes / copy bandwidth (read + write bytes/s): one read of every weight"}

    # sampling check: T = 1, n_samples continuations of one prompt per arm
    probe, samp_new = prompts[0], 24
    sp = lambda i: SamplingParams(temperature=1.0, max_new_tokens=samp_new, seed=10_000 + i)
    samples = {"target_only": [engines["target_only"].generate_target_only([probe], sp(i))[0].token_ids
                               for i in range(n_samples)],
               "draftalign": [engines["draftalign"].generate([probe], sp(i))[0].token_ids for i in range(n_samples)],
               "hf_assisted": [hf_generate(ref_target, probe, samp_new, eos, ref_draft, g, 10_000 + i)
                               for i in range(n_samples)]}
    notes = {}
    if not args.no_vllm:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                dtype = str(target.dtype).removeprefix("torch.")
                dp = str(save_pretrained_atomic(draft, tok, Path(tmp) / "d"))
                vs = VllmSpec(resolve_target(cfg.target.model), dp, g, dtype, cfg.target.max_model_len)
                vs.run(prompts[0], 4)
                t0 = time.perf_counter()
                outs = [vs.run(p, max_new) for p in prompts]
                secs = time.perf_counter() - t0
                rows["vllm_spec"] = {"tokens_per_s": sum(map(len, outs)) / secs,
                                     "greedy_mismatches_vs_hf": sum(o != x for o, x in zip(outs, ref)),
                                     "timed": "after the interleaved arms (own engine)"}
                samples["vllm_spec"] = [vs.run(probe, samp_new, 1.0, 10_000 + i) for i in range(n_samples)]
                vs.shutdown()
            except Exception as e:  # noqa: BLE001 - record why the arm could not run here
                notes["vllm_spec"] = f"unavailable here: {type(e).__name__}: {e}"[:400]
    base = target_logprob_means(ref_target, probe, samples["target_only"])
    sampling = {}
    for a, s in samples.items():
        got = target_logprob_means(ref_target, probe, s)
        sampling[a] = {"mean_target_logprob": sum(got) / len(got),
                       "ks_p": None if a == "target_only" else float(ks_2samp(base, got).pvalue)}
        if a != "target_only":
            sampling[a]["lossless"] = sampling[a]["ks_p"] > P_MIN

    result = {"target": cfg.target.model, "draft": draft_path, "gamma": g, "n_prompts": len(prompts),
              "max_new_tokens": max_new, "machine": machine(), "arms": rows, "roofline": roofline,
              "sampling": sampling, "sampling_test": f"KS on per-sequence mean target log-prob, T=1, p > {P_MIN}",
              "notes": notes, "quick": args.quick}
    print("\n| arm | tok/s | × target-only | × HF generate | greedy mismatches vs HF | τ | α | c | v | bound | "
          "measured / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for a, r in rows.items():
        extra = (f"{r['block_efficiency']:.2f} | {r['acceptance_rate']:.3f} | {r['cost_ratio_c']:.3f} | "
                 f"{r['verify_cost_v']:.2f} | {r['speedup_bound']:.2f}x | {r['speedup_vs_bound']:.0%}"
                 if "block_efficiency" in r else "| | | | | ")
        print(f"| {a} | {r['tokens_per_s']:.1f} | {r.get('vs_target_only', float('nan')):.2f} | "
              f"{r.get('vs_hf_generate', float('nan')):.2f} | {r['greedy_mismatches_vs_hf']} | {extra} |")
    print(f"roofline: {roofline}")
    print(f"sampling: {sampling}")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
