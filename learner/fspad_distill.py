"""Stage 3 for `draft.kind: fspad`: distil the FSPAD head on the target's features of the distillation set.

    TargetFeatures ×M (HF target) ──► fspad_features/ ──► StoredFeatures ──batch(step, rank)──► learner ×W
                                   (or, streamed: TargetFeatures ──batch(step, rank)──► learner ×W)

Data. With `draft.fspad.feature_store` (the default) the target first runs over the whole set once, on all
the CPUs, into `<run_dir>/fspad_features/` (`actors/feature_store.py`; resumable by shard), and a
StoredFeatures actor serves batches from it; otherwise TargetFeatures actors compute each batch. Either
way each learner rank asks for its FeatureBatch of step s + 1 while it trains on step s, and a batch is a
pure function of (seed, step, rank), so a resumed or restarted learner sees the same batches.
Rows: `rollout.batch_size` distillation-set rows per step (all ranks together), every position of the
answers; the held-out prompts (`learner.heldout`, `learner.distill.load_split`) never enter a training batch.

Loss (partial alignment distillation, `learner.losses.partial_alignment_loss`), per loss position n:
    L_n = w_f · SmoothL1(f̂_n[:m], f_n[:m]) + w_l · D(p_n ‖ q_n),  q_n = softmax(W f̂_n / T), m = ⌈a·H⌉,
D = `distill.loss` (TVD++ by default, FKL/RKL/TVD/JSD) on the target's top-k buckets restricted to the
draft vocabulary exactly as the standalone draft's stage 3 (`learner.distill.distill_loss`, tempered
by `distill.temperature`), w_f, w_l, a = `draft.fspad.feature_weight`, `logit_weight`,
`aligned_fraction`. With `draft.fspad.unroll` = K > 1 (from step `unroll_from_step` on) the chain steps
2 … K are trained too, each on the head's own predicted features as it decodes them (`unrolled_steps`,
EAGLE-3's training-time test), and their positions join the mean. The sum is divided by the global
count of loss positions (one all-reduce) times the world size, so DDP's averaging gives the full-batch
mean whatever the split.

Held-out estimate. Rank 0 evaluates the head teacher-forced on the held-out answers (target
features, data tokens) at step 0, at every checkpoint and at the end: `heldout_acceptance` = 1 − TVD
on the buckets and `heldout_greedy_acceptance` (argmax q = argmax p) — the per-token acceptance of
the first draft step — and, whatever `unroll`, chain steps 2 and 3 on the head's own f̂ as decoded
(`heldout_acceptance_<k>`, `heldout_greedy_acceptance_<k>`).

Stage 1. There is none for this kind: the head only exists on top of the target's features, and the
target's own answers are the data it learns from (EAGLE trains on fixed conversations with no
separate pretraining); `draftalign run` skips pretraining and starts the head from random weights
(seed `seed`).

Checkpoints and logs follow stage 3: `<run_dir>/ray_results/fspad/checkpoint_step_<step>_<session>/`
holding the head (`learner/fspad.py` layout), `trainer_state.pt` (optimizer, scheduler, step, RNG,
metrics) and `manifest.json`; `<run_dir>/fspad_log.jsonl`, TensorBoard under `tensorboard/fspad`;
the final head in `<run_dir>/draft_fspad/` and the summary in `fspad_done.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from actors.feature_store import (
    build_store,
    create_stored_feature_actor,
    fingerprint,
    load_heldout,
    save_heldout,
    store_dtype,
)
from actors.features import FeatureBatch, create_feature_actors
from draftalign.config import JobConfig
from draftalign.io import atomic_dir, write_json_atomic
from draftalign.models import load_causal_lm, load_tokenizer, resolve_target
from draftalign.runtime import init_ray, run_dir
from draftalign.vocab import job_draft_vocab
from learner.distill import distill_loss, load_split
from learner.fspad import CONFIG_FILE, WEIGHTS_FILE, FSPADHead
from learner.losses import BaselineState, TargetDist, masked_mean, partial_alignment_loss, tvd
from learner.trainer import (
    STATE_FILE,
    adamw,
    all_reduce,
    checkpoint_to_restore,
    fit_stage,
    lr_factor,
    param_groups,
    prepare_resume,
    rng_state,
    say_as,
    set_rng_state,
    verify_checkpoint,
    worker_resources,
    worker_setup,
    write_manifest,
)

EXPERIMENT = "fspad"
FINAL_DIR = "draft_fspad"
DONE_FILE = "fspad_done.json"
PRINT_EVERY = 10

_say = partial(say_as, "fspad")


# ------------------------------------------------------------------------------------ math

def _to(fb: FeatureBatch, device) -> FeatureBatch:
    return FeatureBatch(*(getattr(fb, f).to(device) for f in FeatureBatch.__dataclass_fields__))


def _losses(core: FSPADHead, f_hat: torch.Tensor, t_feat: torch.Tensor, t_ids: torch.Tensor, t_lps: torch.Tensor,
            cfg: JobConfig, baseline_state: BaselineState | None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """f̂ (N, H) against the target's next feature (N, H) and top-k (N, k) → per-position loss (N,), stats, logits."""
    fs = cfg.draft.fspad
    logits = core.logits(f_hat)  # (N, n)
    n = logits.shape[0]
    bt = {"on_policy": torch.zeros(n, dtype=torch.bool, device=logits.device), "target_ids": t_ids,
          "target_logprobs": t_lps, "tokens": torch.zeros(n, dtype=torch.long, device=logits.device)}
    logit_loss, stats = distill_loss(logits.float(), bt, cfg.distill, baseline_state, core.vocab)  # (N,)
    per_pos, pad = partial_alignment_loss(f_hat, t_feat, logit_loss, aligned_fraction=fs.aligned_fraction,
                                          feature_weight=fs.feature_weight, logit_weight=fs.logit_weight)
    return per_pos, {**stats, **pad}, logits


def head_loss(model, core: FSPADHead, fb: FeatureBatch, cfg: JobConfig, baseline_state: BaselineState | None,
              cache=None) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Teacher-forced step (chain step 1): per-position loss (N,), float stats, the logits (N, n) and f̂ (B, T, H)
    of one FeatureBatch (module docstring). `model` is the (possibly DDP-wrapped) head whose forward runs; `core`
    the unwrapped one; `cache` (a DynamicCache) keeps the nodes' keys for `unrolled_steps`."""
    f_hat = model(fb.features, fb.input_ids, fb.position_ids, fb.allowed, past_key_values=cache)  # (B, T, H)
    per_pos, stats, logits = _losses(core, f_hat[fb.loss_mask], fb.target_features, fb.target_ids,
                                     fb.target_logprobs, cfg, baseline_state)
    return per_pos, stats, logits, f_hat


@dataclass
class UnrolledStep:
    """Chain step k ≥ 2 of the training-time test, at its N_k loss positions."""

    k: int
    loss: torch.Tensor  # (N_k,) per-position loss
    stats: dict
    logits: torch.Tensor  # (N_k, n)
    target_ids: torch.Tensor  # (N_k, k_top)
    target_logprobs: torch.Tensor  # (N_k, k_top)


def unrolled_steps(core: FSPADHead, fb: FeatureBatch, f_hat: torch.Tensor, cache, depth: int, cfg: JobConfig,
                   baseline_state: BaselineState | None) -> list[UnrolledStep]:
    """Training-time test (EAGLE-3, Li et al. 2025, arXiv 2503.01840, §3; HASS, Zhang et al. 2024, arXiv
    2408.15766): chain steps 2 … K are trained on the head's own predictions, as they are decoded.

    After step 1 (`head_loss`, data node d reads (F_d, s_{d+1}) and gives f̂¹_{d+1}), step k of base node d is a
    node at rotary position d + k − 1 that reads (f̂^{k−1}, s_{d+k}) and attends to the data nodes ≤ d (the
    verified context, real features, from `cache`), to base d's own nodes of steps 2 … k − 1 and to itself:

        f̂^k_{d+k} = head(f̂^{k−1}_{d+k−1}, s_{d+k}; position d + k − 1)

    exactly what `serve.fspad_proposer.draft_chain` computes at its k-th step when the first k − 1 proposals
    were the data tokens (accepted). Its targets are data node (d + k − 1)'s: F_{d+k} and the top-k of
    s_{d+k+1}; loss positions are the base nodes with d ≥ P − 2 and d + k − 1 ≤ L − 3. Gradients flow through
    f̂^{k−1} and the cached keys, so earlier steps learn to leave a feature later steps can use. Cost: one
    extra head pass per step over the answer window (queries) against T + (k − 1)·Q keys."""
    B, T = fb.next_mask.shape
    cols = fb.next_mask.any(0).nonzero()[:, 0]
    if depth < 2 or cols.numel() == 0:
        return []
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    Q, dev = hi - lo, fb.features.device
    d = torch.arange(lo, hi, device=dev)  # (Q,) base nodes
    data_keys = torch.arange(T, device=dev)[None, :] <= d[:, None]  # (Q, T): data nodes ≤ d
    own = torch.eye(Q, dtype=torch.bool, device=dev)  # (Q, Q): base d's node of one step
    f_prev, out = f_hat[:, lo:hi], []
    for k in range(2, depth + 1):
        src = d + k - 1  # (Q,) the data node whose input token and targets step k uses
        fits = src < T
        src = src.clamp(max=T - 1)
        valid = fb.next_mask[:, lo:hi] & fb.next_mask[:, src] & fits[None]  # (B, Q)
        allowed = torch.cat([data_keys] + [own] * (k - 1), 1)[None].expand(B, Q, T + (k - 1) * Q)
        f_k = core(f_prev, fb.input_ids[:, src], (d + k - 1)[None].expand(B, Q), allowed,
                   past_key_values=cache)  # (B, Q, H)
        if valid.any():
            t_feat = fb.features[:, (src + 1).clamp(max=T - 1)][valid]  # F_{d+k}
            t_ids, t_lps = fb.next_ids[:, src][valid], fb.next_lps[:, src][valid]
            loss, stats, logits = _losses(core, f_k[valid], t_feat, t_ids, t_lps, cfg, baseline_state)
            out.append(UnrolledStep(k, loss, stats, logits, t_ids, t_lps))
        f_prev = f_k
    return out


@torch.no_grad()
def acceptance(core: FSPADHead, logits: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor) -> dict:
    """Summed per-token acceptance of one draft step over N positions: 1 − TVD(p, q) on the buckets (q on the
    draft vocabulary) and greedy agreement argmax q = argmax p."""
    sub, target = core.vocab.restrict(logits.float(), TargetDist(target_logprobs, target_ids))
    p_arg = target_ids.gather(-1, target_logprobs.argmax(-1, keepdim=True)).squeeze(-1)  # (N,)
    return {"tvd": float(tvd(sub, target).sum()),
            "greedy": float((core.vocab.full_ids(logits.argmax(-1)) == p_arg).sum()), "n": logits.shape[0]}


HELDOUT_DEPTH = 3  # held-out acceptance is reported for chain steps 1 … 3 whatever the training depth


def _slice_rows(hb: FeatureBatch, i: int, j: int, offsets: torch.Tensor) -> FeatureBatch:
    lo, hi = int(offsets[i]), int(offsets[j])
    return FeatureBatch(hb.features[i:j], hb.input_ids[i:j], hb.position_ids[i:j], hb.allowed[i:j],
                        hb.loss_mask[i:j], hb.target_features[lo:hi], hb.target_ids[lo:hi],
                        hb.target_logprobs[lo:hi], hb.sampled[lo:hi], hb.next_ids[i:j], hb.next_lps[i:j],
                        hb.next_mask[i:j])


@torch.no_grad()
def evaluate_heldout(core: FSPADHead, hb: FeatureBatch, cfg: JobConfig, device, rows_per_chunk: int = 8) -> dict:
    """Held-out estimate, chunked by rows: step 1 teacher-forced (`heldout_acceptance`, `heldout_greedy_acceptance`)
    and steps 2 … HELDOUT_DEPTH on the head's own f̂ (`heldout_acceptance_<k>`, `heldout_greedy_acceptance_<k>`):
    the per-token acceptance at draft position k given positions < k were accepted (the data tokens)."""
    from transformers import DynamicCache

    was = core.training
    core.eval()
    tot = {"tvd": 0.0, "greedy": 0.0, "n": 0, "feature": 0.0}
    deep = {k: {"tvd": 0.0, "greedy": 0.0, "n": 0} for k in range(2, HELDOUT_DEPTH + 1)}
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), hb.loss_mask.sum(1).cumsum(0)])  # (B + 1,)
    for i in range(0, hb.features.shape[0], rows_per_chunk):
        part = _to(_slice_rows(hb, i, min(i + rows_per_chunk, hb.features.shape[0]), offsets), device)
        cache, bs = DynamicCache(), BaselineState(decay=cfg.distill.ema_decay)
        per_pos, stats, logits, f_hat = head_loss(core, core, part, cfg, bs, cache)
        acc = acceptance(core, logits, part.target_ids, part.target_logprobs)
        for key in ("tvd", "greedy", "n"):
            tot[key] += acc[key]
        tot["feature"] += stats["feature_loss"] * acc["n"]
        for st in unrolled_steps(core, part, f_hat, cache, HELDOUT_DEPTH, cfg, bs):
            a = acceptance(core, st.logits, st.target_ids, st.target_logprobs)
            for key in ("tvd", "greedy", "n"):
                deep[st.k][key] += a[key]
    core.train(was)
    n = max(1, tot["n"])
    out = {"heldout_tvd": tot["tvd"] / n, "heldout_acceptance": 1.0 - tot["tvd"] / n,
           "heldout_greedy_acceptance": tot["greedy"] / n, "heldout_feature_loss": tot["feature"] / n,
           "heldout_positions": tot["n"]}
    for k, t in deep.items():
        if t["n"]:
            out[f"heldout_acceptance_{k}"] = 1.0 - t["tvd"] / t["n"]
            out[f"heldout_greedy_acceptance_{k}"] = t["greedy"] / t["n"]
    return out


# ----------------------------------------------------------------------------- worker loop

def _build_head(config: dict, cfg: JobConfig, ckpt_dir: Path | None) -> FSPADHead:
    """The head on the target's frozen embedding and LM head: from the checkpoint, else fresh (seed)."""
    target = load_causal_lm(config["target_path"])
    if ckpt_dir is not None:
        head = FSPADHead.load(ckpt_dir, target)
    else:
        head = FSPADHead.from_target(target, config["draft_vocab"], cfg.draft.fspad.model_dump(), seed=cfg.seed)
    del target  # only the embedding and LM-head rows stay (as the head's buffers)
    return head


def _save_checkpoint(core: FSPADHead, opt, sched, baseline_state: BaselineState, step: int, rank: int,
                     world: int, config: dict, metrics: dict, writer) -> None:
    """Every rank: gather RNG states; rank 0 writes the head, trainer_state.pt and, last, the manifest; every
    rank reports to Ray Train."""
    import ray.train
    import torch.distributed as dist

    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            writer.flush()
            d = Path(tmp)
            core.write(d)
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "rng": rngs,
                        "baseline_state": asdict(baseline_state),
                        "config": config["cfg"], "metrics": metrics}, d / STATE_FILE)
            write_manifest(d, step)  # last: its presence + matching files = a complete checkpoint
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_step_{step:08d}_{config['session']}")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: fetch FeatureBatches from the feature actors (one ahead), step the head, checkpoint."""
    import ray
    import ray.train
    import ray.train.torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import DynamicCache

    cfg, rank, world, device = worker_setup(config)
    lc = cfg.learner
    fs = cfg.draft.fspad
    unroll_from = fs.unroll_start(lc.max_steps)
    actors = config["actors"]

    with checkpoint_to_restore(config["resume_from"], say=_say) as ckpt_dir:  # None: fresh start
        head = _build_head(config, cfg, ckpt_dir)
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False) if ckpt_dir else None
    head.train()
    # the target's embedding and LM head are buffers: broadcast once at wrap time, never per step
    model = ray.train.torch.prepare_model(head, parallel_strategy_kwargs={"broadcast_buffers": False})
    core: FSPADHead = model.module if hasattr(model, "module") else model
    opt = adamw(param_groups(core, lc.weight_decay), lr=lc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        lr_factor, warmup=lc.warmup_steps, max_steps=lc.max_steps, min_ratio=lc.min_lr_ratio))
    step, heldout_start = 0, None
    baseline_state = BaselineState(decay=cfg.distill.ema_decay)  # TVD++ with distill.baseline=ema
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        baseline_state = BaselineState(**state["baseline_state"])
        heldout_start = state["metrics"].get("heldout_acceptance_start")
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rank)

    writer = jlog = hb = None
    if rank == 0:
        writer = SummaryWriter(config["tb_dir"], purge_step=step + 1 if step else None)
        jlog = open(config["log_path"], "a")
        hb = ray.get(config["heldout_ref"][0]) if config["heldout_ref"] else None
        _say(f"rank 0/{world}: {'resuming at step ' + str(step) if step else 'starting'}; head "
             f"{core.num_parameters() / 1e6:.2f}M parameters, loss {cfg.distill.loss}, feature sampling "
             f"{fs.feature_sampling}, aligned fraction {fs.aligned_fraction}, chain steps trained {fs.unroll} "
             f"(from step {unroll_from}), held-out "
             f"{0 if hb is None else hb.n_tokens} positions")
        if hb is not None and heldout_start is None:
            heldout_start = evaluate_heldout(core, hb, cfg, device)["heldout_acceptance"]
            writer.add_scalar("heldout/heldout_acceptance", heldout_start, step)

    def request(s: int):
        return actors[(s * world + rank) % len(actors)].batch.remote(s, rank, world)

    nxt = request(step) if step < lc.max_steps else None
    while step < lc.max_steps:
        t0 = time.perf_counter()
        fb = _to(ray.get(nxt), device)
        waited = time.perf_counter() - t0
        nxt = request(step + 1) if step + 1 < lc.max_steps else None  # the target works while the head trains
        depth = fs.unroll if step >= unroll_from else 1
        cache = DynamicCache() if depth > 1 else None
        per_pos, stats, logits, f_hat = head_loss(model, core, fb, cfg, baseline_state, cache)
        deep = unrolled_steps(core, fb, f_hat, cache, depth, cfg, baseline_state)
        all_pos = torch.cat([per_pos] + [st.loss for st in deep])  # every chain step's loss positions
        n_global = float(all_reduce(torch.tensor(float(all_pos.shape[0]), dtype=torch.float64, device=device)))
        (masked_mean(all_pos, None, global_count=n_global) * world).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        acc = acceptance(core, logits, fb.target_ids, fb.target_logprobs)
        deep_acc = [acceptance(core, st.logits, st.target_ids, st.target_logprobs) for st in deep]
        n = float(fb.n_tokens)
        keys = ["loss", "feature_loss", "logit_loss", "tvd", "greedy", "tail_mass", "sampled", "tokens", "wait_s",
                "step_s", "positions", "deep_tvd", "deep_greedy", "deep_n"]
        local = [float(all_pos.detach().sum()), stats["feature_loss"] * n, stats["logit_loss"] * n, acc["tvd"],
                 acc["greedy"], stats["tail_mass"] * n, float(fb.sampled.sum()), n, waited,
                 time.perf_counter() - t0, float(all_pos.shape[0]), sum(a["tvd"] for a in deep_acc),
                 sum(a["greedy"] for a in deep_acc), float(sum(a["n"] for a in deep_acc))]
        tot = dict(zip(keys, all_reduce(torch.tensor(local, dtype=torch.float64, device=device)).tolist()))
        tokens = tot["tokens"]
        metrics = {"step": step, "loss": tot["loss"] / tot["positions"], "feature_loss": tot["feature_loss"] / tokens,
                   "logit_loss": tot["logit_loss"] / tokens, "tvd": tot["tvd"] / tokens,
                   "acceptance": 1.0 - tot["tvd"] / tokens, "greedy_acceptance": tot["greedy"] / tokens,
                   "tail_mass": tot["tail_mass"] / tokens, "sampled_frac": tot["sampled"] / tokens,
                   "tokens_per_s": tokens / max(tot["step_s"] / world, 1e-9),
                   "target_wait_frac": tot["wait_s"] / max(tot["step_s"], 1e-9), "lr": lr, "grad_norm": grad_norm}
        if tot["deep_n"]:  # chain steps 2 … depth, on the head's own f̂ (training-time test)
            metrics.update(unrolled_acceptance=1.0 - tot["deep_tvd"] / tot["deep_n"],
                           unrolled_greedy_acceptance=tot["deep_greedy"] / tot["deep_n"])
        is_ckpt = step % lc.checkpoint_every == 0 or step == lc.max_steps
        if rank == 0:
            if is_ckpt and hb is not None:
                metrics.update(evaluate_heldout(core, hb, cfg, device))
            if heldout_start is not None:
                metrics["heldout_acceptance_start"] = heldout_start
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(("heldout/" if k.startswith("heldout_") else "train/") + k, v, step)
            jlog.write(json.dumps({**metrics, "session": config["session"]}) + "\n")
            jlog.flush()
            if step % PRINT_EVERY == 0 or is_ckpt:
                ha = metrics.get("heldout_acceptance")
                deeper = [metrics.get(f"heldout_greedy_acceptance_{k}") for k in range(2, HELDOUT_DEPTH + 1)]
                _say(f"step {step}: loss {metrics['loss']:.4f} (feature {metrics['feature_loss']:.4f}, logit "
                     f"{metrics['logit_loss']:.4f}) acceptance {metrics['acceptance']:.4f} greedy "
                     f"{metrics['greedy_acceptance']:.4f} {metrics['tokens_per_s']:,.0f} tok/s target wait "
                     f"{metrics['target_wait_frac']:.2f}"
                     + (f" held-out acceptance {ha:.4f}" if ha is not None else "")
                     + (" greedy at steps 2…: " + " ".join(f"{g:.3f}" for g in deeper) if None not in deeper else ""))
        if is_ckpt:
            _save_checkpoint(core, opt, sched, baseline_state, step, rank, world, config, metrics, writer)
    if rank == 0:
        writer.close()
        jlog.close()


# ---------------------------------------------------------------------------------- driver

def export_head(ckpt: Path, dest: Path) -> Path:
    """The checkpoint's head files (config, weights, draft vocabulary) copied to `dest` atomically."""
    from draftalign.vocab import VOCAB_FILE

    def write(tmp: Path) -> None:
        for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE):
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)

    return atomic_dir(dest, write)


def run_fspad(cfg: JobConfig, resume: bool = False) -> Path:
    """Train the FSPAD head on the distillation set; return `<run_dir>/draft_fspad/`.

    resume=True continues from the newest good checkpoint under `ray_results/fspad/` (or returns at once when
    `fspad_done.json` already covers `learner.max_steps`); resume=False starts over (earlier checkpoints moved
    to `ray_results/fspad.prev`). Writes `<run_dir>/fspad_done.json`."""
    import ray

    if cfg.draft.kind != "fspad":
        raise ValueError(f"run_fspad trains draft.kind=fspad heads; this job has draft.kind={cfg.draft.kind}")
    if cfg.target.top_k_logprobs < 1:
        raise ValueError("draft.kind=fspad distils on the target's top-k: target.top_k_logprobs must be ≥ 1 "
                         f"(got {cfg.target.top_k_logprobs}; full-vocabulary features batches would not fit)")
    t_start = time.time()
    lc = cfg.learner
    rdir = run_dir(cfg)
    final, done_path = rdir / FINAL_DIR, rdir / DONE_FILE
    storage, log_path, tb_dir = rdir / "ray_results", rdir / "fspad_log.jsonl", rdir / "tensorboard" / "fspad"
    target_path = resolve_target(cfg.target.model)
    load_tokenizer(target_path)  # a target without a usable tokenizer fails here, not in a worker
    draft_vocab = job_draft_vocab(cfg, rdir)

    skipped: list = []
    start, start_step, resume_from = prepare_resume(
        resume, exp=storage / EXPERIMENT, done_path=done_path, final=final, max_steps=lc.max_steps, tb_dir=tb_dir,
        log_path=log_path, skipped=skipped, fallback="a fresh head", say=_say)
    if start == "done":
        return final
    train_rows, held_rows = load_split(rdir, cfg.target.max_model_len, 0)
    if not train_rows:
        raise ValueError(f"the distillation set under {rdir / 'distill_set'} has no row that fits "
                         f"target.max_model_len={cfg.target.max_model_len}")
    _say(f"{len(train_rows)} train rows, {len(held_rows)} held-out rows; {cfg.rollout.batch_size} rows per step")

    if resume_from is not None and start_step >= lc.max_steps:
        _say(f"checkpoint step {start_step} already covers the run: exporting it")
        ckpt = resume_from
        metrics = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)["metrics"]
    else:
        init_ray(cfg)
        need = cfg.target.num_engines * cfg.target.cpus_per_engine + lc.num_workers * lc.cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0.0)
        if need > have + 1e-9:
            raise ValueError(f"the fspad stage needs {need:g} CPUs (target.num_engines × cpus_per_engine + "
                             f"learner.num_workers × cpus_per_worker) but the Ray cluster has {have:g}")
        actors = []
        try:
            rows_ref = ray.put(train_rows)  # held until the end: restarted actors re-read their arguments
            store = build_store(cfg, target_path, train_rows, rdir, say=_say) if cfg.draft.fspad.feature_store else None
            held_key = fingerprint(target_path, cfg.target.top_k_logprobs, cfg.seed, held_rows, store_dtype(cfg))
            hb = load_heldout(store, held_key) if store is not None and held_rows else None
            if store is None or (held_rows and hb is None):  # a target to stream from, or for the held-out rows
                actors = create_feature_actors(cfg, target_path, rows_ref, name_prefix=f"draftalign-{cfg.name}")
                if held_rows and hb is None:
                    hb = ray.get(actors[0].fixed_batch.remote(held_rows))
                    if store is not None:
                        save_heldout(store, held_key, hb)
            if store is not None:  # the store serves the batches
                for a in actors:
                    ray.kill(a, no_restart=True)
                actors = create_stored_feature_actor(cfg, store, rows_ref, name_prefix=f"draftalign-{cfg.name}")
            tb_dir.mkdir(parents=True, exist_ok=True)
            config = {"cfg": cfg.model_dump(mode="json"), "target_path": target_path, "draft_vocab": draft_vocab,
                      "actors": actors, "heldout_ref": [ray.put(hb)] if hb is not None else [],
                      "resume_from": str(resume_from) if resume_from else None, "tb_dir": str(tb_dir),
                      "log_path": str(log_path), "session": uuid.uuid4().hex[:8]}
            result = fit_stage(train_loop_per_worker, config, name=EXPERIMENT, storage=storage,
                               num_workers=lc.num_workers, use_gpu=lc.use_gpu,
                               resources_per_worker=worker_resources(lc.cpus_per_worker, lc.use_gpu, lc.resources),
                               max_failures=lc.max_failures, log_path=log_path, total=lc.max_steps,
                               start_step=start_step, fields={"loss": "loss", "acceptance": "acceptance",
                                                              "heldout_acceptance": "heldout"})
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
        ckpt, metrics = Path(result.checkpoint.path), result.metrics
    verify_checkpoint(ckpt)
    export_head(ckpt, final)
    done = {"steps": metrics["step"], "loss": metrics["loss"], "feature_loss": metrics["feature_loss"],
            "logit_loss": metrics["logit_loss"], "train_acceptance": metrics["acceptance"],
            "train_greedy_acceptance": metrics["greedy_acceptance"], "sampled_frac": metrics["sampled_frac"],
            "heldout_acceptance": metrics.get("heldout_acceptance"),
            "heldout_acceptance_start": metrics.get("heldout_acceptance_start"),
            "heldout_greedy_acceptance": metrics.get("heldout_greedy_acceptance"),
            "heldout_feature_loss": metrics.get("heldout_feature_loss"),
            **{f"heldout_{g}acceptance_{k}": metrics.get(f"heldout_{g}acceptance_{k}")
               for k in range(2, HELDOUT_DEPTH + 1) for g in ("", "greedy_")},
            "heldout_positions": metrics.get("heldout_positions"), "tokens_per_s": metrics.get("tokens_per_s"),
            "target_wait_frac": metrics.get("target_wait_frac"), "fspad": cfg.draft.fspad.model_dump(),
            "loss_name": cfg.distill.loss, "skipped_checkpoints": skipped, "resumed_from_step": start_step,
            "wall_time_s": round(time.time() - t_start, 1), "checkpoint": str(ckpt), "draft": str(final)}
    write_json_atomic(done_path, done)
    ha = done["heldout_acceptance"]
    _say(f"done: step {done['steps']}, loss {done['loss']:.4f}, held-out acceptance "
         f"{'n/a' if ha is None else f'{ha:.4f}'}, {done['wall_time_s']}s -> {final}")
    return final
