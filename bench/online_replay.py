"""The online learner, offline (issue #16): bench/online.py's traffic fed through the online learner's own step and
gate, window by window, without serving it — minutes per learner setting instead of the served bench's 45, to
choose the settings the served bench then measures.

Why it is exact for greedy traffic. A greedy endpoint's answer is the target's greedy answer whatever the draft,
and every answer position is scored by some verification pass (an accepted proposal, or a recovered / bonus token:
serve/online.py `request_records`), so a served request's record is the prompt, the target's greedy answer and
the target's top-k at every answer position. They are computed here with the target itself (Hugging Face, the
job's dtype), once per traffic schedule, and cached.

Per window, in the bench's order (chat → code + summarize → chat again):

    α_tf(window)   teacher-forced greedy acceptance, 1{argmax q = argmax p} over the window's answer positions, of
                   the version the learner last published — measured before the learner sees the window, i.e. the
                   draft the window would be served with had the replica installed it at once
    then           the window's records enter the learner as the replicas push them: every probe_every-th into
                   the gate's probe, the rest collected records_per_step at a time, each batch stepped `epochs`
                   times (`OnlineLearnerWorker.step`: replay, publish every steps_per_publish steps through the gate)

    α_tf static    the same for the disk draft (what bench/online.py's static arm serves throughout)

α_tf is not the served α (served α is accepted ÷ (accepted + rejections) of γ-chains; α_tf weighs every position
once), but both rise and fall with the draft's agreement on the same answers. Summary: α_tf of the first and last
shifted windows; online ÷ static α_tf (paired: same answers) on the last shifted window, the shifted phase's second
half and the second chat phase; versions published and held back. Learner settings share one training trajectory
when only the gate differs (same seed, same records; the gate decides only which steps are published).

    .venv/bin/python bench/online_replay.py [--job J.yaml] [--draft D] [--shifted-windows 14] \\
        [--set serve.online.learner.lr=1e-3 ...] --out runs/online_replay/X.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.online import schedule  # noqa: E402
from draftalign.config import load_config  # noqa: E402
from draftalign.data import chat_prompt_ids  # noqa: E402
from draftalign.io import write_json_atomic  # noqa: E402


@torch.no_grad()
def greedy_records(target, tok, prompts: list[list[int]], max_tokens: int, k: int, batch: int = 16) -> list[dict]:
    """The record a greedy endpoint captures for each prompt: tokens = prompt + the target's greedy answer (up to
    max_tokens, the end-of-turn token included), positions = the answer's, the target's log-softmax top-k there.
    Answers come from batched (left-padded) greedy decoding; the top-k from one unpadded forward per sequence,
    the numerics the engine scores with (positions where a near-tie flips the argmax are counted)."""
    out, flips = [], 0
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    for i in range(0, len(prompts), batch):
        part = prompts[i: i + batch]
        width = max(map(len, part))
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in part])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in part])
        g = target.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                            eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
        for x, y in zip(part, g):
            y = y[: y.index(eos) + 1] if eos in y else y
            seq = torch.tensor([x + y])
            lp = torch.log_softmax(target(seq).logits[0, len(x) - 1: len(x) - 1 + len(y)].float(), -1)
            top_lp, top_ids = lp.topk(k, -1)
            flips += int((top_ids[:, 0] != torch.tensor(y)).sum())
            out.append({"tokens": np.asarray(x + y, np.int32), "positions": np.arange(len(x), len(x) + len(y)),
                        "target_ids": top_ids.numpy().astype(np.int32),
                        "target_logprobs": top_lp.numpy().astype(np.float32),
                        "draft_logprobs": np.zeros(len(y), np.float32), "policy_version": 0, "temperature": 0.0})
        print(f"records: {len(out)}/{len(prompts)} (argmax flips vs the batched answer: {flips})", flush=True)
    return out


def window_acceptance(worker, core, records: list[dict]) -> float:
    """α_tf of `core` over the records' answer positions (pooled)."""
    from actors.traffic import to_rollout_batch

    return worker._acceptance(core, to_rollout_batch(records, pad_id=worker.pad_id), greedy=True)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="cluster/jobs/local.yaml")
    ap.add_argument("--draft", default=None, help="draft path (default: the job's newest trained draft)")
    ap.add_argument("--chat-windows", type=int, default=2)
    ap.add_argument("--shifted-windows", type=int, default=14)
    ap.add_argument("--per-window", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cache", default="runs/online_replay", help="where the traffic's records are cached")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="job override key.path=value")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = load_config(args.job if Path(args.job).exists() else None,
                      ["serve.online.enabled=true", "serve.online.learner.enabled=true",
                       "serve.online.weight_store=replay-weights", *args.overrides])
    import ray

    from draftalign.evaluate import load_target, machine
    from draftalign.models import default_draft, load_tokenizer, resolve_target
    from learner.online import OnlineLearnerWorker, replay_rows

    torch.set_num_threads(2)
    draft = str(Path(args.draft).expanduser().resolve()) if args.draft else default_draft(cfg)
    tok = load_tokenizer(resolve_target(cfg.target.model))
    k = cfg.serve.online.top_k_logprobs or cfg.target.top_k_logprobs
    room = cfg.target.max_model_len - cfg.serve.gamma - args.max_tokens
    windows = schedule(args.chat_windows, args.shifted_windows, args.per_window,
                       fits=lambda m: len(chat_prompt_ids(tok, m)) <= room)
    prompts = [[chat_prompt_ids(tok, m) for m in w["prompts"]] for w in windows]
    key = hashlib.md5(json.dumps([cfg.target.model, cfg.target.dtype, k, args.max_tokens, prompts]).encode())
    cache = Path(args.cache) / f"records-{key.hexdigest()[:12]}.pt"
    if cache.is_file():
        per_window = torch.load(cache, weights_only=False)
    else:
        flat = greedy_records(load_target(cfg)[0], tok, [p for w in prompts for p in w], args.max_tokens, k)
        per_window, i = [], 0
        for w in prompts:
            per_window.append(flat[i: i + len(w)])
            i += len(w)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(per_window, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)

    lo = cfg.serve.online.learner
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=cfg.serve.online.namespace)
    try:
        heldout = replay_rows(cfg, k, heldout=True) if lo.gate and lo.probe_replay_rows else []
        worker = OnlineLearnerWorker(cfg.model_dump(mode="json"), draft, replay_rows(cfg, k), heldout)
        static = copy.deepcopy(worker.learner.core).eval()  # the disk draft: what the static arm serves throughout
        served = copy.deepcopy(static)  # the version a replica would serve: 0 = the disk draft until a publish
        n_published, pending, rows, t0 = 0, [], [], time.time()
        for w, recs in zip(windows, per_window):
            alpha, base = window_acceptance(worker, served, recs), window_acceptance(worker, static, recs)
            rows.append({"phase": w["phase"], "alpha_tf": alpha, "alpha_tf_static": base, "version":
                         len(worker.published) and worker.published[-1]["version"], "step": worker.learner.step})
            print(f"window {len(rows):2d} {w['phase']:10s} α_tf {alpha:.3f} (static {base:.3f})  version "
                  f"{rows[-1]['version']}  step {worker.learner.step}  ({time.time() - t0:.0f} s)", flush=True)
            for r in recs:  # as `OnlineLearnerWorker.run` takes them from the buffer
                if worker.admit(r):
                    pending.append(r)
                if len(pending) >= lo.records_per_step:
                    batch, pending = pending[: lo.records_per_step], pending[lo.records_per_step:]
                    worker.train_on(batch)
                    if len(worker.published) > n_published:
                        n_published = len(worker.published)
                        served.load_state_dict(worker.learner.core.state_dict())
        stats = worker.stats()
    finally:
        ray.shutdown()

    def mean(phase: str, key: str = "alpha_tf", part: slice = slice(None)) -> float:
        return float(np.mean([r[key] for r in rows if r["phase"] == phase][part]))

    n_shift = sum(r["phase"] == "shifted" for r in rows)
    half, last = slice(n_shift // 2, None), slice(-1, None)
    summary = {"shifted": {"alpha_first": mean("shifted", part=slice(0, 1)), "alpha_last": mean("shifted", part=last),
                           "vs_static_last": mean("shifted", part=last) / mean("shifted", "alpha_tf_static", last),
                           "vs_static_second_half": mean("shifted", part=half) / mean("shifted", "alpha_tf_static",
                                                                                       half)},
               "chat": {"alpha_before": mean("chat"), "alpha_after": mean("chat_again"),
                        "vs_static_after": mean("chat_again") / mean("chat_again", "alpha_tf_static")},
               "published": len(stats["published"]), "held_back": stats["held_back"], "steps": stats["step"]}
    result = {"draft": draft, "learner": lo.model_dump(mode="json"), "windows": rows, "summary": summary,
              "gates": stats["gates"], "machine": machine(), "wall_s": time.time() - t0}
    write_json_atomic(Path(args.out), result)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
