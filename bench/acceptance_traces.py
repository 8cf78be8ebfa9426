"""Per-position acceptance along the target's own continuations, recorded for `bench/adaptive_sim.py --traces`.

For each eval prompt (the job's held-out prompts, as `draftalign eval` picks them) and temperature: the target decodes
--max-new-tokens tokens alone (seeded), then one teacher-forced pass of the target and one of the draft over prompt ++
continuation give p_j and q_j at every generated position j, and the trace is

    α_j = Σ_x min(p_j(x), q_j(x))          (greedy: 1{argmax q_j = argmax p_j}, the same formula on one-hot laws)

the probability that a token drafted at j is accepted given the prefix (`serve.verification`'s accept test). Any
γ policy is then replayed without models: a round at j drafting γ accepts position j + i with probability α_{j+i}
while the ones before it were accepted (greedy: exactly, since an accepted prefix is the target's). Writes --out:
{"temperatures": {"0": {task: [[α_j] per prompt]}, ...}, "draft", "job", "step_costs" (measured here, the costs the
eval's adaptive arm decides on)}.

    .venv/bin/python bench/acceptance_traces.py --draft runs/local/draft_distilled
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from draftalign.config import load_config  # noqa: E402
from draftalign.evaluate import eval_prompts, load_pair, machine  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402
from draftalign.models import draft_step_dtype  # noqa: E402
from draftalign.sampling import SamplingParams, logits_to_probs  # noqa: E402
from serve.specdec import SpecDecoder  # noqa: E402


def trace(target, draft, vocab: list[int] | None, prompt: list[int], continuation: list[int],
          params: SamplingParams) -> list[float]:
    """α_j = Σ min(p_j, q_j) at each position of `continuation` after `prompt` (q = 0 outside the draft's vocab)."""
    ids = torch.tensor([prompt + continuation])
    n = len(continuation)
    with torch.inference_mode():
        p = logits_to_probs(target(ids).logits[0, len(prompt) - 1: -1], params)  # (n, V)
        z = draft(ids).logits[0, len(prompt) - 1: -1]  # (n, V) or (n, V_draft rows)
        if vocab is not None:
            sub = logits_to_probs(z[:, vocab], params)
            q = sub.new_zeros(n, p.shape[-1]).index_copy_(-1, torch.tensor(vocab), sub)
        else:
            q = logits_to_probs(z, params)
    return torch.minimum(p, q[:, : p.shape[-1]]).sum(-1).clamp(0, 1).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--draft", default="runs/local/draft_distilled")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sampling/traces.json")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7, 1.0])
    ap.add_argument("--tasks", default="chat,code,summarize")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    cfg = load_config(args.job, [f"eval.tasks=[{args.tasks}]", f"eval.prompts_per_task={args.prompts}",
                                 f"eval.max_new_tokens={args.max_new_tokens}", "eval.trees=[]"])
    target, draft, tok, vocab, name = load_pair(cfg, args.draft)
    prompts = eval_prompts(tok, cfg, target.config.max_position_embeddings)
    engine = SpecDecoder(target, draft, tok, gamma=cfg.eval.gamma_max, draft_vocab=vocab,
                         draft_step_dtype=draft_step_dtype(cfg.draft.step_dtype, next(draft.parameters()).dtype))
    costs = engine.measure_step_costs(batch_sizes=(1,), repeats=15)
    traces = {}
    for t in args.temperatures:
        params = SamplingParams(temperature=t, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens, seed=cfg.seed)
        traces[f"{t:g}"] = {task: [] for task in prompts}
        for task, ids in prompts.items():
            for prompt in ids:
                out = engine.generate_target_only([prompt], params)[0].token_ids
                traces[f"{t:g}"][task].append(trace(target, draft, vocab, prompt, out, params))
            a = [x for tr in traces[f"{t:g}"][task] for x in tr]
            print(f"T={t:g} {task:<10} {len(ids)} prompts, {len(a)} positions, mean α_j {sum(a) / len(a):.3f}",
                  flush=True)
    write_json_atomic(args.out, {"draft": name, "job": args.job, "max_new_tokens": args.max_new_tokens,
                                 "step_costs": dataclasses.asdict(costs), "machine": machine(),
                                 "temperatures": traces})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
