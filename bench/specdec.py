"""Speculative decoding benchmark: four arms on the same prompts, batch 1, greedy, one process.

Arms: target-only decoding, draftalign's engine, Hugging Face assisted generation
(`generate(assistant_model=draft)`), and vLLM's own speculative decoding with the same draft.
Tokens/s per arm, greedy mismatches against the target-only arm, and one shared sampling check:
at temperature 1, the target's mean log-probability of the tokens an arm samples must match that of
plain target sampling (two-sample Kolmogorov–Smirnov over per-sequence means, p > 0.01). A fast
arm that is not lossless is reported as such.

    .venv/bin/python bench/specdec.py [--quick] [--draft PATH] --out F.json
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
from draftalign.evaluate import eval_prompts, evaluate_pair, format_table, load_pair  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from draftalign.models import save_pretrained_atomic  # noqa: E402
from draftalign.runtime import configure_vllm_env  # noqa: E402
from serve.sampling import SamplingParams  # noqa: E402
from serve.specdec import SpecDecoder  # noqa: E402

P_MIN = 0.01


@torch.inference_mode()
def target_logprob_means(target, prompt: list[int], samples: list[list[int]]) -> list[float]:
    """Mean target log-prob (temperature 1) of each sampled continuation, teacher-forced."""
    out = []
    for s in samples:
        if not s:
            continue
        ids = torch.tensor([prompt + s])
        logp = torch.log_softmax(target(ids).logits[0, len(prompt) - 1:-1].float(), -1)  # (T, V)
        out.append(logp.gather(-1, torch.tensor(s)[:, None]).mean().item())
    return out


def hf_assisted(target, draft, prompts, max_new, gamma, do_sample=False, seed=0):
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    eos = target.generation_config.eos_token_id
    outs, t0 = [], time.perf_counter()
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([p])
        kw = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {"do_sample": False}
        y = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, max_new_tokens=max_new,
                            pad_token_id=eos, **kw)[0, len(p):].tolist()
        outs.append(y[: y.index(eos) + 1] if eos in y else y)
    return outs, time.perf_counter() - t0


class VllmSpec:
    """vLLM's own speculative decoding with the same draft (method "draft_model")."""

    def __init__(self, target_path: str, draft_path: str, gamma: int, dtype: str, max_len: int):
        configure_vllm_env(1.0, threads=os.cpu_count())
        from vllm import LLM

        self.llm = LLM(target_path, dtype=dtype, enforce_eager=True, max_model_len=max_len, seed=0,
                       speculative_config={"method": "draft_model", "model": draft_path,
                                           "num_speculative_tokens": gamma})

    def run(self, prompts, max_new, temperature=0.0, seed=0):
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        outs, t0 = [], time.perf_counter()
        for i, p in enumerate(prompts):  # batch 1, like every other arm
            sp = VSP(max_tokens=max_new, temperature=temperature, top_p=1.0, seed=seed + i, detokenize=False)
            outs.append(list(self.llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
                             .outputs[0].token_ids))
        return outs, time.perf_counter() - t0

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
    ap.add_argument("--draft", default=None, help="draft path (default: the job's newest trained draft, else new)")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="few prompts: finishes in a few minutes")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--out", default="bench/results/specdec.json")
    args = ap.parse_args()

    n_per_task, max_new, n_samples = (4, 32, 12) if args.quick else (70, 64, 40)
    cfg = load_config(args.job, [f"eval.prompts_per_task={n_per_task}", f"eval.max_new_tokens={max_new}",
                                 f"eval.gamma=[{args.gamma}]", "eval.temperature=0"])
    torch.set_num_threads(os.cpu_count() or 1)
    target, draft, tok, target_path, draft_name = load_pair(cfg, args.draft)
    print(f"bench: target={cfg.target.model} draft={draft_name} γ={args.gamma} "
          f"{sum(map(len, eval_prompts(tok, cfg, target.config.max_position_embeddings).values()))} prompts, "
          f"max_new_tokens={max_new}", flush=True)

    # Arms 1 + 2: target-only and draftalign (the eval harness, batch 1, greedy).
    res = evaluate_pair(target, draft, tok, cfg)
    block = res["by_gamma"][args.gamma]
    prompts = [p for ps in eval_prompts(tok, cfg, target.config.max_position_embeddings).values() for p in ps]
    engine = SpecDecoder(target, draft, tok, gamma=args.gamma)
    greedy_ref = [g.token_ids for g in (engine.generate_target_only([p], SamplingParams(max_new_tokens=max_new))[0]
                                        for p in prompts)]
    arms = {"target_only": block["overall"]["target_tokens_per_s"], "draftalign": block["overall"]["spec_tokens_per_s"]}
    mismatches = {"draftalign": res["lossless_greedy"]["mismatches"]}
    notes: dict[str, str] = {}

    # Shared sampling check: one prompt, n_samples continuations per arm at temperature 1.
    probe, samp_new = prompts[0], 24
    sp = lambda i: SamplingParams(temperature=1.0, max_new_tokens=samp_new, seed=10_000 + i)
    samples = {"target_only": [engine.generate_target_only([probe], sp(i))[0].token_ids for i in range(n_samples)],
               "draftalign": [engine.generate([probe], sp(i))[0].token_ids for i in range(n_samples)]}

    # Arm 3: HF assisted generation.
    outs, secs = hf_assisted(target, draft, prompts, max_new, args.gamma)
    arms["hf_assisted"] = sum(map(len, outs)) / secs
    mismatches["hf_assisted"] = sum(a != b for a, b in zip(outs, greedy_ref))
    samples["hf_assisted"] = hf_assisted(target, draft, [probe] * n_samples, samp_new, args.gamma, True, 10_000)[0]

    # Arm 4: vLLM's own speculative decoding.
    arms["vllm_spec"] = None
    if args.no_vllm:
        notes["vllm_spec"] = "skipped (--no-vllm)"
    else:
        dtype = str(next(target.parameters()).dtype).removeprefix("torch.")
        with tempfile.TemporaryDirectory() as tmp:
            draft_path = draft_name if draft_name != "new" else str(save_pretrained_atomic(draft, tok, Path(tmp) / "d"))
            try:
                v = VllmSpec(target_path, draft_path, args.gamma, dtype, cfg.target.max_model_len)
                v.run(prompts[:1], 4)  # warm-up
                outs, secs = v.run(prompts, max_new)
                arms["vllm_spec"] = sum(map(len, outs)) / secs
                mismatches["vllm_spec"] = sum(a != b for a, b in zip(outs, greedy_ref))
                samples["vllm_spec"] = [v.run([probe], samp_new, 1.0, 10_000 + i)[0][0] for i in range(n_samples)]
                v.shutdown()
            except Exception as e:  # noqa: BLE001 - record why the arm could not run here
                notes["vllm_spec"] = f"vLLM speculative decoding unavailable here: {type(e).__name__}: {e}"[:500]

    ref = target_logprob_means(target, probe, samples["target_only"])
    sampling = {}
    logprob_means = {"target_only": sum(ref) / len(ref)}
    for arm in ("draftalign", "hf_assisted", "vllm_spec"):
        if arm in samples:
            got = target_logprob_means(target, probe, samples[arm])
            logprob_means[arm] = sum(got) / len(got)
            sampling[arm] = bool(ks_2samp(ref, got).pvalue > P_MIN)
        else:
            sampling[arm] = None

    result = {"target": cfg.target.model, "draft": draft_name, "gamma": args.gamma, "temperature": 0.0,
              "tasks": block["tasks"], "overall": block["overall"], "lossless_greedy": res["lossless_greedy"],
              "arms": arms, "greedy_mismatches": mismatches, "n_prompts": len(prompts), "max_new_tokens": max_new,
              "sampling_lossless": sampling, "sampling_check": {
                  "test": "KS two-sample on per-sequence mean target log-prob at T=1", "p_min": P_MIN,
                  "n_samples": n_samples, "mean_target_logprob": logprob_means},
              "notes": notes, "quick": args.quick, "threads": torch.get_num_threads()}
    print(format_table({"by_gamma": {args.gamma: block}, "lossless_greedy": res["lossless_greedy"]}))
    print("\n| arm | tokens/s | greedy mismatches | sampling lossless | mean target log-prob (T=1) |")
    print("|---|---|---|---|---|")
    for arm, tps in arms.items():
        lossless = "reference" if arm == "target_only" else sampling.get(arm)
        lp = logprob_means.get(arm)
        print(f"| {arm} | {'n/a' if tps is None else f'{tps:.1f}'} | {mismatches.get(arm, '-')} | {lossless} | "
              f"{'n/a' if lp is None else f'{lp:.2f}'} |")
    for k, v in notes.items():
        print(f"note {k}: {v}")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
