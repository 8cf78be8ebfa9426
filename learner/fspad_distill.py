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
EAGLE-3's training-time test), and their positions join the mean. With `draft.fspad.on_policy` those steps
read the head's *own* tokens instead (`sample_chains`: x_1 … x_{K−1} drawn at `rollout.temperature` from its
current q, as it drafts), and the target scores each drawn token where it stands — its feature after x_j and
the top-k of softmax(W g) (`actors.features.branch_features`, one tree pass per batch on the feature actor) —
the head's analogue of the standalone draft's on-policy rollouts scored by the target. The sum is divided by the global
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
    use_store,
)
from actors.features import FeatureBatch, batch_seed, create_feature_actors, job_aux_layers
from draftalign.config import FEATURE_KINDS, JobConfig
from draftalign.io import atomic_dir, write_json_atomic
from draftalign.models import load_causal_lm, load_tokenizer, resolve_target
from draftalign.runtime import init_ray, run_dir
from draftalign.sampling import sample
from draftalign.vocab import job_draft_vocab
from learner.distill import distill_loss, load_split
from learner.eagle3 import EAGLE3Head
from learner.feature_heads import load_head
from learner.fspad import CONFIG_FILE, WEIGHTS_FILE, FSPADHead
from learner.losses import BaselineState, TargetDist, masked_mean, partial_alignment_loss, tvd
from learner.trainer import (
    STATE_FILE,
    BatchDigest,
    adamw,
    all_reduce,
    check_restored,
    checkpoint_to_restore,
    fit_stage,
    lr_factor,
    param_groups,
    prepare_resume,
    publish_logs,
    result_checkpoint,
    rng_state,
    say_as,
    set_rng_state,
    stage_logs_in,
    state_digest,
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
    if not getattr(core, "feature_regression", True):  # EAGLE-3: tokens only, its ĥ is not the target's feature
        return logit_loss, {**stats, "feature_loss": 0.0, "logit_loss": float(logit_loss.detach().mean()) if n
                            else 0.0}, logits
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


@dataclass
class Chains:
    """The head's own chains on one batch (on-policy training-time test): base data node d = lo + j of row b drew
    x_1 … x_m (m = depth − 1; x_j enters the sequence at position d + 1 + j) where valid[b, j]; after scoring, the
    target's feature after each x_j and the top-k of the token after it (`actors.features.branch_features`)."""

    lo: int
    tokens: torch.Tensor  # (B, Q, m) int64, full-vocabulary ids
    valid: torch.Tensor  # (B, Q) bool: the base node carries a loss (fb.next_mask)
    features: torch.Tensor | None = None  # (B, Q, m, H)
    target_ids: torch.Tensor | None = None  # (B, Q, m, k)
    target_logprobs: torch.Tensor | None = None  # (B, Q, m, k)

    def requests(self) -> list[list[tuple[int, list[int]]]]:
        """Per row, what the target scores: (c, [x_1 … x_m]) grafted after position c = d + 1 (s_{d+1}, the token
        base node d read)."""
        return [[(self.lo + j + 1, self.tokens[b, j].tolist()) for j in self.valid[b].nonzero()[:, 0].tolist()]
                for b in range(self.tokens.shape[0])]

    def scored(self, results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Chains:
        """The chains with the target's side filled in from `branch_features`' per-row results (chain order)."""
        B, Q, m = self.tokens.shape
        H, k = next(g.shape[-1] for g, _, _ in results if g.numel()), next(i.shape[-1] for _, i, _ in results)
        feats, ids, lps = torch.zeros(B, Q, m, H), torch.zeros(B, Q, m, k, dtype=torch.long), torch.zeros(B, Q, m, k)
        for b, (g, i, lp) in enumerate(results):
            js = self.valid[b].nonzero()[:, 0]
            if g.shape[0] != js.numel() * m:
                raise ValueError(f"row {b}: {g.shape[0]} scored tokens for {js.numel()} chains of {m}")
            feats[b, js], ids[b, js], lps[b, js] = (g.float().reshape(-1, m, H), i.long().reshape(-1, m, k),
                                                    lp.float().reshape(-1, m, k))
        dev = self.tokens.device
        return Chains(self.lo, self.tokens, self.valid, feats.to(dev), ids.to(dev), lps.to(dev))


def _bases(fb: FeatureBatch) -> tuple[int, int]:
    """[lo, hi): the data nodes from the first to the last one with an answer token two ahead (any row)."""
    cols = fb.next_mask.any(0).nonzero()[:, 0]
    return (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)


def _chain_allowed(T: int, lo: int, hi: int, k: int, B: int, device) -> torch.Tensor:
    """Keys of chain step k's nodes (B, Q, T + (k − 1)·Q): base d's data nodes ≤ d, then its own node at each of
    steps 2 … k (the cache holds the T nodes of step 1, then Q nodes per later step)."""
    d = torch.arange(lo, hi, device=device)
    data_keys = torch.arange(T, device=device)[None, :] <= d[:, None]  # (Q, T)
    own = torch.eye(hi - lo, dtype=torch.bool, device=device)  # (Q, Q)
    return torch.cat([data_keys] + [own] * (k - 1), 1)[None].expand(B, hi - lo, T + (k - 1) * (hi - lo))


def unrolled_steps(core: FSPADHead, fb: FeatureBatch, f_hat: torch.Tensor, cache, depth: int, cfg: JobConfig,
                   baseline_state: BaselineState | None, chains: Chains | None = None) -> list[UnrolledStep]:
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
    extra head pass per step over the answer window (queries) against T + (k − 1)·Q keys.

    On-policy (`chains`, from `sample_chains` and scored by the target): step k reads the head's own x_{k−1}
    in place of s_{d+k}, and its targets are the target's on that chain — g_{k−1}, its feature after x_{k−1}
    at position d + k, and the top-k of softmax(W g_{k−1}) — at every base node with a loss (no data token
    two ahead is needed: the chain is the head's, not the data's)."""
    B, T = fb.next_mask.shape
    lo, hi = _bases(fb)
    if depth < 2 or hi == lo:
        return []
    if chains is not None and (chains.lo, chains.tokens.shape[1]) != (lo, hi - lo):
        raise ValueError(f"chains cover base nodes {chains.lo} + {chains.tokens.shape[1]}, the batch {lo} … {hi}")
    Q, dev = hi - lo, fb.features.device
    d = torch.arange(lo, hi, device=dev)  # (Q,) base nodes
    f_prev, out = f_hat[:, lo:hi], []
    for k in range(2, depth + 1):
        src = d + k - 1  # (Q,) the data node whose input token and targets step k uses
        if chains is None:
            fits = src < T
            src = src.clamp(max=T - 1)
            valid = fb.next_mask[:, lo:hi] & fb.next_mask[:, src] & fits[None]  # (B, Q)
            tokens = fb.input_ids[:, src]
        else:
            valid, tokens = chains.valid, chains.tokens[:, :, k - 2]
        f_k = core(f_prev, tokens, (d + k - 1)[None].expand(B, Q), _chain_allowed(T, lo, hi, k, B, dev),
                   past_key_values=cache)  # (B, Q, H)
        if valid.any():
            if chains is None:
                t_feat = fb.features[:, (src + 1).clamp(max=T - 1)][valid]  # F_{d+k}
                t_ids, t_lps = fb.next_ids[:, src][valid], fb.next_lps[:, src][valid]
            else:
                t_feat = chains.features[:, :, k - 2][valid]  # g_{k−1}
                t_ids, t_lps = chains.target_ids[:, :, k - 2][valid], chains.target_logprobs[:, :, k - 2][valid]
            loss, stats, logits = _losses(core, f_k[valid], t_feat, t_ids, t_lps, cfg, baseline_state)
            out.append(UnrolledStep(k, loss, stats, logits, t_ids, t_lps))
        f_prev = f_k
    return out


@torch.no_grad()
def sample_chains(core: FSPADHead, fb: FeatureBatch, depth: int, temperature: float,
                  generator: torch.Generator | None = None) -> Chains:
    """The head drafts from every base node as it decodes (`serve.fspad_proposer.draft_chain`): step 1 reads the
    data (F_d, s_{d+1}), x_1 ~ q_1 = softmax(W f̂¹ / T); step j ≥ 2 reads (f̂^{j−1}, x_{j−1}) at position
    d + j − 1, x_j ~ q_j; x_1 … x_{depth−1} are kept (argmax q at T = 0). The chains are what the on-policy
    `unrolled_steps` read once the target has scored them."""
    from transformers import DynamicCache

    B, T = fb.next_mask.shape
    lo, hi = _bases(fb)
    Q, dev = hi - lo, fb.features.device
    if Q == 0 or depth < 2:
        return Chains(lo, torch.zeros(B, Q, max(depth - 1, 0), dtype=torch.long), torch.zeros(B, Q, dtype=torch.bool))
    cache = DynamicCache()
    f_prev = core(fb.features, fb.input_ids, fb.position_ids, fb.allowed, past_key_values=cache)[:, lo:hi]
    d, xs = torch.arange(lo, hi, device=dev), []
    for j in range(1, depth):
        logits = core.logits(f_prev).float()  # (B, Q, n)
        slot = logits.argmax(-1) if temperature == 0 else sample(torch.softmax(logits / temperature, -1), generator)
        xs.append(core.vocab.full_ids(slot))
        if j < depth - 1:
            f_prev = core(f_prev, xs[-1], (d + j)[None].expand(B, Q), _chain_allowed(T, lo, hi, j + 1, B, dev),
                          past_key_values=cache)
    return Chains(lo, torch.stack(xs, -1), fb.next_mask[:, lo:hi].clone())


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
    """The head on the target's frozen embedding and LM head: from the checkpoint, else fresh (seed) — for
    draft.kind=eagle3 an EAGLE-3 head, fresh or from `draft.eagle3.init_from` (a speculators checkpoint)."""
    target = load_causal_lm(config["target_path"])
    e3 = cfg.draft.eagle3
    if ckpt_dir is not None:
        head = load_head(ckpt_dir, target)
    elif cfg.draft.kind == "eagle3" and e3.init_from:
        head = EAGLE3Head.from_speculators(e3.init_from, target, cfg.draft.fspad.model_dump())
    elif cfg.draft.kind == "eagle3":
        head = EAGLE3Head.from_target(target, config["draft_vocab"], config["aux_layers"], e3.norm_before_residual,
                                      cfg.draft.fspad.model_dump(), seed=cfg.seed)
    else:
        head = FSPADHead.from_target(target, config["draft_vocab"], cfg.draft.fspad.model_dump(), seed=cfg.seed)
    del target  # only the embedding and LM-head rows stay (as the head's buffers)
    return head


def _save_checkpoint(core: FSPADHead, opt, sched, baseline_state: BaselineState, step: int, rank: int,
                     world: int, config: dict, metrics: dict, writer, digest: str | None) -> None:
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
                        "config": config["cfg"], "metrics": metrics, "state_digest": digest}, d / STATE_FILE)
            write_manifest(d, step)  # last: its presence + matching files = a complete checkpoint
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_step_{step:08d}_{config['session']}")
        if rank == 0:
            publish_logs(config)


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
        restored_name = ckpt_dir.name if ckpt_dir else None
    head.train()
    # the target's embedding and LM head are buffers: broadcast once at wrap time, never per step
    model = ray.train.torch.prepare_model(head, parallel_strategy_kwargs={"broadcast_buffers": False})
    core: FSPADHead = model.module if hasattr(model, "module") else model
    opt = adamw(param_groups(core, lc.weight_decay), lr=lc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        lr_factor, warmup=lc.warmup_steps, max_steps=lc.max_steps, min_ratio=lc.min_lr_ratio))
    step, heldout_start, digests, seen = 0, None, {}, BatchDigest()
    baseline_state = BaselineState(decay=cfg.distill.ema_decay)  # TVD++ with distill.baseline=ema
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        digests["restored_digest"] = check_restored(core, opt, state, restored_name)
        step = state["step"]
        baseline_state = BaselineState(**state["baseline_state"])
        heldout_start = state["metrics"].get("heldout_acceptance_start")
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rank)

    writer = jlog = hb = None
    if rank == 0:
        stage_logs_in(config)
        writer = SummaryWriter(config["tb_dir"], purge_step=step + 1 if step else None)
        jlog = open(config["log_path"], "a")
        hb = ray.get(config["heldout_ref"][0]) if config["heldout_ref"] else None
        _say(f"rank 0/{world}: {'resuming at step ' + str(step) if step else 'starting'}; head "
             f"{core.num_parameters() / 1e6:.2f}M parameters, loss {cfg.distill.loss}, feature sampling "
             f"{fs.feature_sampling}, aligned fraction {fs.aligned_fraction}, chain steps trained {fs.unroll} "
             f"(from step {unroll_from}{', on-policy chains' if fs.on_policy else ''}), held-out "
             f"{0 if hb is None else hb.n_tokens} positions")
        if hb is not None and heldout_start is None:
            heldout_start = evaluate_heldout(core, hb, cfg, device)["heldout_acceptance"]
            writer.add_scalar("heldout/heldout_acceptance", heldout_start, step)

    def request(s: int):
        return actors[(s * world + rank) % len(actors)].batch.remote(s, rank, world)

    nxt = request(step) if step < lc.max_steps else None
    while step < lc.max_steps:
        t0 = time.perf_counter()
        fb = ray.get(nxt)
        seen.update(fb.input_ids.numpy())
        fb = _to(fb, device)
        waited = time.perf_counter() - t0
        nxt = request(step + 1) if step + 1 < lc.max_steps else None  # the target works while the head trains
        depth = fs.unroll if step >= unroll_from else 1
        chains, t_roll = None, time.perf_counter()
        if depth > 1 and fs.on_policy:  # the head's own chains, scored by the target where the batch came from
            gen = torch.Generator().manual_seed(batch_seed(cfg.seed + 1, step, rank))  # resume draws the same
            chains = sample_chains(core, fb, depth, cfg.rollout.temperature, gen)
            if chains.valid.any():
                scorer = actors[(step * world + rank) % len(actors)]
                chains = chains.scored(ray.get(scorer.score_branches.remote(step, rank, world, chains.requests())))
        rollout_s = time.perf_counter() - t_roll
        cache = DynamicCache() if depth > 1 else None
        per_pos, stats, logits, f_hat = head_loss(model, core, fb, cfg, baseline_state, cache)
        deep = unrolled_steps(core, fb, f_hat, cache, depth, cfg, baseline_state, chains)
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
                "step_s", "positions", "deep_tvd", "deep_greedy", "deep_n", "rollout_s"]
        local = [float(all_pos.detach().sum()), stats["feature_loss"] * n, stats["logit_loss"] * n, acc["tvd"],
                 acc["greedy"], stats["tail_mass"] * n, float(fb.sampled.sum()), n, waited,
                 time.perf_counter() - t0, float(all_pos.shape[0]), sum(a["tvd"] for a in deep_acc),
                 sum(a["greedy"] for a in deep_acc), float(sum(a["n"] for a in deep_acc)), rollout_s]
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
        if chains is not None:  # on the head's own tokens: the share of the step spent drawing and scoring them
            metrics["rollout_frac"] = tot["rollout_s"] / max(tot["step_s"], 1e-9)
        is_ckpt = step % lc.checkpoint_every == 0 or step == lc.max_steps
        digests["batch_digest"] = seen.take(world)
        saved = None
        if rank == 0:
            if is_ckpt:
                saved = digests["state_digest"] = state_digest(core, opt)
            if is_ckpt and hb is not None:
                metrics.update(evaluate_heldout(core, hb, cfg, device))
            if heldout_start is not None:
                metrics["heldout_acceptance_start"] = heldout_start
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(("heldout/" if k.startswith("heldout_") else "train/") + k, v, step)
            jlog.write(json.dumps({**metrics, "session": config["session"], **digests}) + "\n")
            jlog.flush()
            digests = {}
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
            _save_checkpoint(core, opt, sched, baseline_state, step, rank, world, config, metrics, writer, saved)
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

    if cfg.draft.kind not in FEATURE_KINDS:
        raise ValueError(f"run_fspad trains draft.kind=fspad or eagle3 heads; this job has draft.kind={cfg.draft.kind}")
    if cfg.target.top_k_logprobs < 1:
        raise ValueError(f"draft.kind={cfg.draft.kind} distils on the target's top-k: target.top_k_logprobs must be "
                         f"≥ 1 (got {cfg.target.top_k_logprobs}; full-vocabulary features batches would not fit)")
    t_start = time.time()
    lc = cfg.learner
    rdir = run_dir(cfg)
    final, done_path = rdir / FINAL_DIR, rdir / DONE_FILE
    storage, log_path, tb_dir = rdir / "ray_results", rdir / "fspad_log.jsonl", rdir / "tensorboard" / "fspad"
    target_path = resolve_target(cfg.target.model)
    load_tokenizer(target_path)  # a target without a usable tokenizer fails here, not in a worker
    draft_vocab = job_draft_vocab(cfg, rdir)
    aux_layers = job_aux_layers(cfg, target_path)  # EAGLE-3's target layers; None for the FSPAD head
    if cfg.draft.kind == "eagle3" and cfg.draft.eagle3.init_from:  # the checkpoint's vocabulary (its d2t) is kept
        draft_vocab = None

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
            from transformers import AutoConfig

            width = AutoConfig.from_pretrained(target_path).hidden_size * (len(aux_layers) if aux_layers else 1)
            stored, size = use_store(cfg, train_rows, width)
            _say(f"feature store ({cfg.draft.fspad.feature_store}): ≈ {size / 2**30:.2f} GiB for {len(train_rows)} "
                 f"rows → {'stored' if stored else 'streamed: a target pass per batch'}")
            store = build_store(cfg, target_path, train_rows, rdir, say=_say) if stored else None
            held_key = fingerprint(target_path, cfg.target.top_k_logprobs, cfg.seed, held_rows, store_dtype(cfg),
                                   aux_layers)
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
                actors = create_stored_feature_actor(cfg, store, rows_ref, name_prefix=f"draftalign-{cfg.name}",
                                                     target_path=target_path)
            tb_dir.mkdir(parents=True, exist_ok=True)
            config = {"cfg": cfg.model_dump(mode="json"), "target_path": target_path, "draft_vocab": draft_vocab,
                      "aux_layers": aux_layers,
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
        ckpt, metrics = result_checkpoint(result, storage / EXPERIMENT), result.metrics
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
