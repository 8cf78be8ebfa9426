"""Stage 3: RL-style distillation of the draft against the vLLM-hosted target (TVD++ and friends).

    RolloutActor ×N ──► TargetActor ×M (score) ──► Queue(maxsize) ──► learner ranks ×W (Ray Train, DDP)
          ▲                                                                │ every sync_every steps
          └──────────────────────── WeightStore (versioned weights) ◄──────┘ (rank 0 publishes)

Who pulls. Every learner rank pulls its own RolloutBatches from the shared queue (no rank-0
scatter): ranks never wait on each other to get data, and a batch is one unit of work. Ranks then
meet in DDP's gradient all-reduce. Because ranks hold different token counts, the loss is the sum
of per-position losses divided by the *global* masked-token count (one all-reduce before the
forward) times the world size, so DDP's gradient averaging yields exactly the full-batch mean.

Staleness. The policy version is a pure function of the step (it increases by one every
`learner.sync_every` steps on every rank), so ranks agree on it without talking. A pulled batch
holding on-policy rows whose `policy_version` is older than version − `rollout.max_policy_lag` is
dropped (and counted) and the rank pulls again; all-replay batches are never stale (replayed target
responses do not depend on the draft).

Loss. Per position t of a response: draft logits from the hidden state at t − 1 (the LM head runs
only on response positions), target = the batch's top-k (or full) distribution at t. With
`distill.form = sampled` and TVD++ the on-policy positions use the sampled policy-gradient form
(the tokens were drawn from the draft), while replayed target responses use the exact form: the
sampled estimator needs x ~ q, and replayed tokens come from p. The other losses are exact
expectations over the k + 1 buckets everywhere. Both groups share one normalisation (global count);
TVD++ baseline statistics (batch / EMA scopes) are taken per group. Tokens sampled by a policy up to
max_policy_lag versions old are used without importance weights (a small bias at lag > 0);
`policy_drift` (mean |log q_now − log q_behaviour| of the sampled tokens, at temperature 1) shows
how far the learner has moved from the sampling policy.

Held-out estimate. A few distillation-set prompts (chosen by a hash of prompt_id, the same on
every run and resume) are withheld from the rollout actors; their target responses are scored once
by the target at start-up. Rank 0 evaluates the draft teacher-forced on them at step 0, at every
checkpoint and at the end: `heldout_tvd` (bucketed, a lower bound of the true TVD when k < V),
`heldout_acceptance` = 1 − heldout_tvd (the expected acceptance of a sampled draft token) and
`heldout_greedy_acceptance` (draft argmax == target argmax).

Checkpoints follow learner/pretrain.py: `<run_dir>/ray_results/distill/checkpoint_step_<step>_<session>/`
holding the HF-format draft, `trainer_state.pt` (optimizer, scheduler, step, policy version,
counters, TVD++ EMA baseline, RNG) and `manifest.json`; rank 0 writes, every rank reports.

Failures. Rollout actors and target engines are restarted by Ray (actors/rollout.py,
actors/target.py). A dead learner worker: Ray Train (`FailureConfig(max_failures=
learner.max_failures)`) restarts the whole worker group, whose workers load Ray Train's latest
reported checkpoint (`checkpoint_to_restore`, verified against its manifest): the step goes back
to that checkpoint and never below it, and the restarted learner publishes at the store's version
+ 1 (weight versions only increase). distill_log.jsonl then holds the steps since that checkpoint
twice (`learner_attempt` tells them apart; TensorBoard drops the stale ones through purge_step).
`learner_restarts`, `rollout_restarts` and `target_restarts` count the recoveries.

Scaling. Target engines, rollout actors and learner workers are sized independently (CPUs, GPUs
and custom Ray resources each: `target.resources`, `rollout.resources`, `learner.resources`).
`rollout_tokens_per_s/actor_<i>` (per logged step) and `rollout_tokens_per_s_per_actor`
(distill_done.json) give each actor's throughput, `target_tokens_per_s/engine_<i>` the tokens each
target engine scored for the rollouts (engines batch concurrent actors' calls: actors/target.py), and
distill_done.json adds each engine's scoring speed and busy share, each actor's time split and the
stage's `bottleneck` (`bottleneck`), named in its closing line; `scaling` records what each role
asked for and what the learner workers were granted.

Target-assisted rollouts (`rollout.on_policy_mode: target_assisted`, actors/assisted.py) train on
rows labelled by the draft's proposals (`RolloutBatch.sampled_ids`): the sampled TVD++ form rewards
each drafted token by 1{p(x) > q(x)}; the exact losses (FKL, …) read only the states.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from actors.rollout import (
    RolloutBatch,
    TargetPool,
    WeightStore,
    build_batch,
    cached_score,
    create_rollout_actors,
    score_rows,
)
from draftalign.config import JobConfig, requested_resources
from draftalign.distset import set_sampling
from draftalign.io import write_json_atomic
from draftalign.models import (
    build_draft,
    load_causal_lm,
    load_draft,
    load_tokenizer,
    local_path,
    resolve_target,
    save_pretrained_atomic,
)
from draftalign.runtime import init_ray, run_dir
from draftalign.storage import ensure_local
from draftalign.vocab import job_draft_vocab
from learner.draft_head import DraftHead
from learner.heldout import split_heldout
from learner.losses import BaselineState, TargetDist, compute_loss, masked_mean, temper, tvd
from learner.trainer import (
    STATE_FILE,
    adamw,
    all_reduce,
    autocast_dtype,
    check_restored,
    checkpoint_to_restore,
    export_draft,
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

log = logging.getLogger(__name__)

EXPERIMENT = "distill"
QUEUE_POLL_S = 2.0  # learner's queue.get timeout, between checks of the rollout error flag
STALL_S = 600.0  # no fresh batch for this long = the rollout side is stuck: fail loudly
PRINT_EVERY = 10


_say = partial(say_as, "distill")


# ------------------------------------------------------------------------------------ data

def load_rows(rdir: Path) -> list[dict]:
    """Rows of the distillation set (`draftalign.distset.load_distill_set`) as dicts with prompt_id,
    prompt_token_ids, response_token_ids and, when the set recorded them, the target's top-k
    at each answer position: target_ids int64 (R, k), target_logprobs float32 (R, k) (else None)."""
    from draftalign.distset import load_distill_set

    data = load_distill_set(rdir)
    cols = ("prompt_id", "prompt_token_ids", "response_token_ids", "target_topk_ids", "target_topk_logprobs")
    rows = []
    for r in data.select_columns(list(cols)).to_list():
        resp = [int(t) for t in r["response_token_ids"]]
        ids, lps = r["target_topk_ids"], r["target_topk_logprobs"]
        if ids is not None and lps is not None and resp and len(ids) == len(lps) and len(ids) % len(resp) == 0:
            ids = np.asarray(ids, dtype=np.int64).reshape(len(resp), -1)
            lps = np.asarray(lps, dtype=np.float32).reshape(len(resp), -1)
        else:
            ids = lps = None
        rows.append({"prompt_id": str(r["prompt_id"]), "prompt_token_ids": [int(t) for t in r["prompt_token_ids"]],
                     "response_token_ids": resp, "target_ids": ids, "target_logprobs": lps})
    return rows


def filter_rows(rows: list[dict], max_model_len: int, max_new_tokens: int) -> list[dict]:
    """Drop rows the target cannot score: empty, or too long (an on-policy continuation of up to
    max_new_tokens must fit as well as the replayed response)."""
    keep = []
    for r in rows:
        p, resp = r["prompt_token_ids"], r["response_token_ids"]
        if p and resp and len(p) + max(len(resp), max_new_tokens) < max_model_len:
            keep.append(r)
    return keep


def load_split(rdir: Path, max_model_len: int, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the distillation set: split over every prompt of the set
    (`learner.heldout`, the split stage 1 leaves out), then each side filtered by `filter_rows`."""
    train, held = split_heldout(load_rows(rdir))
    return filter_rows(train, max_model_len, max_new_tokens), filter_rows(held, max_model_len, max_new_tokens)


def heldout_batch(rows: list[dict], pool: TargetPool, k: int, pad_id: int) -> RolloutBatch | None:
    """The held-out rows (target responses) with their target scores, as one RolloutBatch."""
    if not rows:
        return None
    prompts = [r["prompt_token_ids"] for r in rows]
    responses = [r["response_token_ids"] for r in rows]
    scores, _ = score_rows(pool, prompts, responses, [cached_score(r, k) for r in rows], k)
    return build_batch(prompts, responses, scores, pad_id=pad_id, prompt_ids=[r["prompt_id"] for r in rows])


# ----------------------------------------------------------------------------------- model

class ResponseLogits(torch.nn.Module):
    """Wraps a causal LM so the LM head runs only where there is a loss, on the draft's vocabulary.

    forward(input_ids (B,T), attention_mask (B,T), loss_mask (B,T)) -> logits (N, n) for the N
    response positions t (row-major), each computed from the hidden state at t − 1, over the n rows
    of `head` (learner.draft_head; the full vocabulary without a subset). DDP wraps this module, so
    its forward (and the gradient hooks) go through DDP.
    """

    def __init__(self, lm, head: DraftHead | None = None):
        super().__init__()
        self.lm = lm
        self.head = head or DraftHead(None, lm.config.vocab_size)

    def forward(self, input_ids, attention_mask, loss_mask):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = hidden[:, :-1][loss_mask[:, 1:]]  # (N, H)
        return self.head.logits(self.lm, h)  # (N, n)


def batch_tensors(batch: RolloutBatch, device) -> dict:
    """Torch views of a RolloutBatch restricted to response positions (N of them); "tokens" are the sampled
    tokens (the draft's proposals on target-assisted rows, else the sequence's own tokens)."""
    t = lambda a, dtype=None: torch.tensor(np.asarray(a), dtype=dtype, device=device)
    m = batch.loss_mask
    out = {"input_ids": t(batch.input_ids, torch.long), "attention_mask": t(batch.attention_mask, torch.long),
           "loss_mask": t(m, torch.bool),
           "tokens": t((batch.input_ids if batch.sampled_ids is None else batch.sampled_ids)[m], torch.long),
           "target_logprobs": t(batch.target_logprobs[m], torch.float32),
           "target_ids": None if batch.target_ids is None else t(batch.target_ids[m], torch.long),
           "on_policy": t(np.broadcast_to(batch.on_policy[:, None], m.shape)[m], torch.bool),
           "draft_logprobs": t(batch.draft_logprobs[m], torch.float32)}
    return out


def distill_loss(logits: torch.Tensor, bt: dict, dc, baseline_state: BaselineState | None,
                 head: DraftHead | None = None):
    """Per-position loss (N,) and count-weighted stats (see the module docstring for the form rule).
    logits (N, n) over the draft head's vocabulary; targets are restricted to it (`DraftHead.restrict`)
    and both sides tempered by distill.temperature."""
    n = logits.shape[0]
    on = bt["on_policy"]
    if dc.loss == "tvd_pp" and dc.form == "sampled":
        groups = [(on, "sampled"), (~on, "exact")]
    else:
        groups = [(torch.ones_like(on), "exact")]
    per_pos = logits.new_zeros(n, dtype=torch.float32)
    stats: dict[str, float] = {}
    temperature = getattr(dc, "temperature", 1.0)
    for sel, form in groups:
        cnt = int(sel.sum())
        if cnt == 0:
            continue
        ids = bt["target_ids"]
        target = TargetDist(bt["target_logprobs"][sel], None if ids is None else ids[sel])
        # FKL is infinite on a bucket the draft cannot cover: that mass joins the tail (a constant there)
        outside = "tail" if dc.loss == "fkl" or (dc.loss == "jsd" and dc.jsd_beta == 0) else "bucket"
        sub_logits, target = (head.restrict(logits[sel], target, outside) if head is not None
                              else (logits[sel], target))
        tokens = bt["tokens"][sel] if head is None else head.labels(bt["tokens"][sel])
        tokens = torch.where(tokens < 0, sub_logits.shape[-1] - 1, tokens)  # outside the subset: the extra column
        loss, st = compute_loss(dc.loss, sub_logits / temperature, temper(target, temperature),
                                sampled_tokens=tokens, form=form, beta=dc.jsd_beta, baseline=dc.baseline,
                                std_normalize=dc.std_normalize, baseline_state=baseline_state)
        per_pos = per_pos.index_put((sel.nonzero().squeeze(-1),), loss.float())
        for key, v in st.items():
            stats[key] = stats.get(key, 0.0) + v * cnt / n
    return per_pos, stats


@torch.no_grad()
def evaluate_heldout(core: ResponseLogits, hb: RolloutBatch, device, amp, rows_per_chunk: int = 8) -> dict:
    """Teacher-forced per-token acceptance of the draft on the held-out target responses — the α of
    serve.acceptance, position by position: 1 − TVD(p, q) for sampled decoding, 1{argmax q = argmax p}
    for greedy, q restricted to the draft's vocabulary as the engine decodes it."""
    was_training = core.training
    core.eval()
    tot = {"tvd": 0.0, "greedy": 0.0, "n": 0}
    for i in range(0, hb.input_ids.shape[0], rows_per_chunk):
        sl = slice(i, i + rows_per_chunk)
        part = RolloutBatch(hb.input_ids[sl], hb.attention_mask[sl], hb.loss_mask[sl], hb.target_logprobs[sl],
                            None if hb.target_ids is None else hb.target_ids[sl], hb.draft_logprobs[sl],
                            hb.on_policy[sl], hb.policy_version, hb.actor_id, int(hb.loss_mask[sl].sum()))
        bt = batch_tensors(part, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = core(bt["input_ids"], bt["attention_mask"], bt["loss_mask"])  # (N, n)
        target = TargetDist(bt["target_logprobs"], bt["target_ids"])
        sub_logits, sub_target = core.head.restrict(logits.float(), target)
        tot["tvd"] += float(tvd(sub_logits, sub_target).sum())
        top = bt["target_logprobs"].argmax(-1)  # (N,)
        p_arg = top if bt["target_ids"] is None else bt["target_ids"].gather(-1, top[:, None]).squeeze(-1)
        tot["greedy"] += float((core.head.full_ids(logits.argmax(-1)) == p_arg).sum())
        tot["n"] += logits.shape[0]
    core.train(was_training)
    n = max(1, tot["n"])
    return {"heldout_tvd": tot["tvd"] / n, "heldout_acceptance": 1.0 - tot["tvd"] / n,
            "heldout_greedy_acceptance": tot["greedy"] / n, "heldout_positions": tot["n"]}


def publish_weights(store, lm, version: int) -> None:
    """Rank 0 → WeightStore: fp32 CPU ndarrays keyed like the draft's state dict (see actors/rollout.py)."""
    import ray

    weights = {k: v.detach().float().cpu().numpy() for k, v in lm.state_dict().items()}
    ray.get(store.publish.remote(version, weights))


# ----------------------------------------------------------------------------- worker loop

def _pull_fresh(queue, store, version: int, max_lag: int, counters: dict):
    """Next non-stale batch: (batch, policy lag, seconds waited). Stale ones are counted and dropped."""
    import ray
    from ray.util.queue import Empty

    t0 = time.perf_counter()
    last_fresh = time.monotonic()
    while True:
        try:
            batch = queue.get(block=True, timeout=QUEUE_POLL_S)
        except Empty:
            err = ray.get(store.stats.remote())["error"]
            if err:
                raise RuntimeError(f"rollout side failed: {err}") from None
            if time.monotonic() - last_fresh > STALL_S:
                raise TimeoutError(f"no rollout batch for {STALL_S:.0f} s") from None
            continue
        lag = version - batch.policy_version
        counters["rollout_batches_seen"] += 1
        if batch.on_policy.any() and lag > max_lag:
            counters["dropped_batches"] += 1
            continue
        return batch, lag, time.perf_counter() - t0


@dataclass
class Learner:
    """One learner rank: where it runs, its model and optimizer, and the state a checkpoint saves. The online
    learner (learner/online.py) is one such rank outside Ray Train (world 1, `model` is `core`)."""

    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    model: torch.nn.Module  # ResponseLogits, DDP-wrapped by Ray Train
    core: ResponseLogits  # the unwrapped module (weights, held-out evaluation, saving)
    tokenizer: object
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    baseline_state: BaselineState
    counters: dict
    step: int = 0
    version: int = 0  # policy version: +1 every learner.sync_every steps
    heldout_start: dict | None = None
    restored_from: Path | None = None  # the checkpoint loaded, None on a fresh start
    restored_digest: str | None = None  # state_digest of what was restored, equal to the checkpoint's


@dataclass
class _Rank0Log:
    """Rank 0's outputs and what its per-step system metrics are measured against."""

    writer: object  # TensorBoard SummaryWriter
    jlog: object  # distill_log.jsonl, opened for append
    attempt: int  # how many times the learner started before in this run
    hb: RolloutBatch | None  # held-out batch
    prev_store: dict  # WeightStore stats at the previous step
    prev_t: float  # ... and when they were read


def _restore(config: dict, cfg: JobConfig, rank: int, world: int, device, amp) -> Learner:
    """The draft, optimizer, LR schedule, counters, TVD++ baseline and RNG of this rank: from the
    checkpoint `checkpoint_to_restore` picks (Ray Train's latest after a restart inside this run,
    else the driver's resume_from), else from `init_dir` with fresh state and seed cfg.seed + rank."""
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lc = cfg.learner
    with checkpoint_to_restore(config["resume_from"], say=_say) as ckpt_dir:  # None: fresh start
        src = str(ckpt_dir or ensure_local(config["init_dir"]))
        tokenizer = AutoTokenizer.from_pretrained(src)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False) if ckpt_dir else None
    lm.train()
    head = DraftHead(config.get("draft_vocab"), lm.config.vocab_size)
    model = ray.train.torch.prepare_model(ResponseLogits(lm, head))
    core = model.module if hasattr(model, "module") else model
    opt = adamw(param_groups(core, lc.weight_decay), lr=lc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        lr_factor, warmup=lc.warmup_steps, max_steps=lc.max_steps, min_ratio=lc.min_lr_ratio))
    counters = {"dropped_batches": 0, "rollout_batches_seen": 0, "consumed_batches": 0, "trained_tokens": 0,
                "global_tokens": 0, "on_policy_rows": 0, "rows": 0, "wait_s": 0.0, "wall_s": 0.0}
    learner = Learner(rank, world, device, amp, model, core, tokenizer, opt, sched,
                       BaselineState(decay=cfg.distill.ema_decay), counters, restored_from=ckpt_dir)
    if state is None:
        torch.manual_seed(cfg.seed + rank)
        return learner
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    learner.restored_digest = check_restored(core, opt, state, ckpt_dir)
    learner.step, learner.version = state["step"], state["policy_version"]
    counters.update(state["counters"])
    learner.baseline_state = BaselineState(**state["baseline_state"])
    learner.heldout_start = state.get("heldout_start")
    rngs = state["rng"]
    set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    return learner


def _skip_lost_versions(learner: Learner, store) -> None:
    """Restarted inside a run (a learner worker died): the store holds weights of the lost steps.
    Continue above them so versions keep increasing (the store's rule, actors/rollout.py). Every
    rank reads before the collective and rank 0 publishes after it, so all ranks agree."""
    import ray
    import torch.distributed as dist

    seen = torch.tensor(float(ray.get(store.version.remote())), dtype=torch.float64, device=learner.device)
    if learner.world > 1:
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if int(seen) >= learner.version:
        _say(f"rank {learner.rank}: restarted at step {learner.step}; weight version {learner.version} -> "
             f"{int(seen) + 1}")
        learner.version = int(seen) + 1


def _open_rank0(config: dict, cfg: JobConfig, learner: Learner, store) -> _Rank0Log:
    """Rank 0 at start-up: open TensorBoard (dropping steps after the restored one) and the JSONL log,
    publish the first weights, register the start with the store, and evaluate the held-out set at
    the starting step unless the checkpoint already holds that estimate."""
    import ray
    from torch.utils.tensorboard import SummaryWriter

    dc, step, version = cfg.distill, learner.step, learner.version
    hb = ray.get(config["heldout_ref"][0]) if config["heldout_ref"] else None
    stage_logs_in(config)
    writer = SummaryWriter(config["tb_dir"], purge_step=step + 1 if step else None)
    jlog = open(config["log_path"], "a")  # closed at the end of train_loop_per_worker
    publish_weights(store, learner.core.lm, version)  # rollout actors wait for this first version
    attempt = ray.get(store.learner_started.remote({
        "num_workers": learner.world, "pid": os.getpid(), "granted_resources": {
            k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()},
        "start_step": step, "policy_version": version,
        "restored_from": str(learner.restored_from) if learner.restored_from else None}))
    if attempt:
        _say(f"learner restart {attempt}: continuing from step {step} ({learner.restored_from})")
    _say(f"rank 0/{learner.world}: {'resuming at step ' + str(step) if step else 'starting'}; loss {dc.loss} "
         f"({dc.form}), policy version {version}, autocast {learner.amp}, held-out "
         f"{0 if hb is None else hb.n_tokens} positions")
    if hb is not None and learner.heldout_start is None:
        learner.heldout_start = evaluate_heldout(learner.core, hb, learner.device, learner.amp)
        for k, v in learner.heldout_start.items():
            writer.add_scalar(f"heldout/{k}", v, step)
        _say(f"step {step}: held-out acceptance {learner.heldout_start['heldout_acceptance']:.4f}")
    prev_store = ray.get(store.stats.remote())
    return _Rank0Log(writer, jlog, attempt, hb, prev_store, time.perf_counter())


def _finished(learner: Learner, max_steps: int, token_budget: int | None, time_budget_s: float | None = None) -> bool:
    """learner.max_steps reached, or the token budget (all ranks' tokens: every rank agrees) or the time budget
    (the learner's step time since the stage began, averaged over ranks: every rank agrees) spent."""
    return (learner.step >= max_steps or bool(token_budget and learner.counters["global_tokens"] >= token_budget)
            or bool(time_budget_s and learner.counters.get("stage_s", 0.0) >= time_budget_s))


@torch.no_grad()
def _policy_drift(logits: torch.Tensor, bt: dict, head: DraftHead, temperature: float) -> float:
    """How far the learner moved from the policy that sampled: mean |log q_now − log q_behaviour| of
    the on-policy tokens (sampled at T = 1 only, else 0)."""
    on = bt["on_policy"]  # (N,)
    if not on.any() or temperature != 1.0:
        return 0.0
    pos = head.labels(bt["tokens"][on]).clamp_min(0)  # (N_on,) sampled tokens lie in the subset
    now_lp = torch.log_softmax(logits.detach()[on].float(), -1).gather(-1, pos[:, None]).squeeze(-1)  # (N_on,)
    return float((now_lp - bt["draft_logprobs"][on]).abs().mean())


def train_step(learner: Learner, batch: RolloutBatch, cfg: JobConfig) -> tuple[dict[str, float], float, float]:
    """One optimizer step on this rank's batch: count the global tokens (one all-reduce), forward,
    loss normalised by that count × world (DDP's averaging then gives the full-batch mean), backward,
    clip, optimizer and scheduler step; learner.step advances. Returns (this rank's token-weighted
    sums: loss, tvd, tail_mass, reward_mean, reward_std, tokens, drift; lr used; grad norm).
    Shared with the online learner (learner/online.py), whose batches come from served rounds."""
    lc, dc = cfg.learner, cfg.distill
    device, amp, opt = learner.device, learner.amp, learner.opt
    bt = batch_tensors(batch, device)
    n_global = float(all_reduce(torch.tensor(float(batch.n_tokens), dtype=torch.float64, device=device)))
    learner.counters["global_tokens"] += int(n_global)  # identical on every rank: they stop together
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = learner.model(bt["input_ids"], bt["attention_mask"], bt["loss_mask"])  # (N, n)
    per_pos, stats = distill_loss(logits.float(), bt, dc, learner.baseline_state, learner.core.head)  # (N,)
    (masked_mean(per_pos, None, global_count=n_global) * learner.world).backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(learner.model.parameters(), lc.grad_clip))
    lr = opt.param_groups[0]["lr"]
    opt.step()
    learner.sched.step()
    opt.zero_grad(set_to_none=True)
    learner.step += 1
    n = float(batch.n_tokens)
    sums = {"loss": float(per_pos.detach().sum()), "tvd": stats.get("tvd", 0) * n,
            "tail_mass": stats.get("tail_mass", 0) * n, "reward_mean": stats.get("reward_mean", 0) * n,
            "reward_std": stats.get("reward_std", 0) * n, "tokens": n,
            "drift": _policy_drift(logits, bt, learner.core.head, cfg.rollout.temperature)}
    return sums, lr, grad_norm


def _count_batch(counters: dict, batch: RolloutBatch, waited: float, dt: float) -> None:
    """Fold one consumed batch into this rank's running counters (saved with every checkpoint)."""
    counters["consumed_batches"] += 1
    counters["trained_tokens"] += batch.n_tokens
    counters["rows"] += int(batch.on_policy.shape[0])
    counters["on_policy_rows"] += int(batch.on_policy.sum())
    counters["wait_s"] += waited
    counters["wall_s"] += dt


def _reduce_sums(sums: dict[str, float], device) -> dict[str, float]:
    """Each named quantity summed over the ranks, in one float64 all-reduce (keys stacked in sorted
    order, so every rank lays them out alike; every rank must pass the same keys)."""
    keys = sorted(sums)
    total = all_reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device))  # (K,)
    return dict(zip(keys, total.tolist()))


def _step_metrics(sums: dict[str, float], learner: Learner, lr: float, grad_norm: float, dt: float,
                  waited: float, loss_name: str) -> dict:
    """The step's metrics from the all-ranks sums: token-weighted means per token, per-rank values
    (lag, drift, on-policy share) averaged over ranks, counters summed; throughput over this rank's
    step time `dt`, of which `waited` went to the queue."""
    tokens, world = sums["tokens"], learner.world
    metrics = {"step": learner.step, "policy_version": learner.version, "loss": sums["loss"] / tokens,
               "tvd": sums["tvd"] / tokens, "acceptance": 1.0 - sums["tvd"] / tokens,
               "tail_mass": sums["tail_mass"] / tokens, "policy_lag": sums["lag"] / world,
               "policy_drift": sums["drift"] / world, "dropped_batches": int(sums["dropped_batches"]),
               "consumed_batches": int(sums["consumed_batches"]),
               "learner_idle_frac": sums["wait_s"] / max(sums["step_s"], 1e-9),
               "learner_tokens_per_s": tokens / max(dt, 1e-9),
               "learner_compute_tokens_per_s": tokens / max(dt - waited, 1e-9),
               "on_policy_frac": sums["on_policy_frac"] / world, "lr": lr, "grad_norm": grad_norm,
               "trained_tokens": learner.counters["global_tokens"]}
    if loss_name == "tvd_pp":
        metrics["reward_mean"], metrics["reward_std"] = sums["reward_mean"] / tokens, sums["reward_std"] / tokens
    return metrics


def _rank0_metrics(r0: _Rank0Log, learner: Learner, queue, store, is_ckpt: bool) -> dict:
    """Rank 0's extra metrics: rollout throughput since the previous step (all actors and each one:
    scaling shows up here), queue depth, restart counts, the run's idle share and, at checkpoints,
    the held-out estimate."""
    import ray

    heldout = {}
    if is_ckpt and r0.hb is not None:
        heldout = evaluate_heldout(learner.core, r0.hb, learner.device, learner.amp)
        if learner.heldout_start is not None:
            heldout["heldout_acceptance_start"] = learner.heldout_start["heldout_acceptance"]
    st = ray.get(store.stats.remote())
    now = time.perf_counter()
    elapsed = max(now - r0.prev_t, 1e-9)
    out = {"rollout_tokens_per_s": (st["rollout_tokens"] - r0.prev_store["rollout_tokens"]) / elapsed}
    for i, tokens in st["actor_tokens"].items():
        out[f"rollout_tokens_per_s/actor_{i}"] = (tokens - r0.prev_store["actor_tokens"].get(i, 0)) / elapsed
    for e, tokens in st["engine_tokens"].items():  # tokens the target engines scored for the rollouts
        out[f"target_tokens_per_s/engine_{e}"] = (tokens - r0.prev_store["engine_tokens"].get(e, 0)) / elapsed
    out["queue_depth"] = queue.qsize()
    out["rollout_restarts"] = st["restarts"]
    out["learner_restarts"] = st["learner_restarts"]
    out["learner_idle_frac_total"] = learner.counters["wait_s"] / max(learner.counters["wall_s"], 1e-9)
    r0.prev_store, r0.prev_t = st, now
    return {**out, **heldout}


def _log_step(r0: _Rank0Log, metrics: dict, is_ckpt: bool, digests: dict) -> None:
    """Rank 0: every metric to TensorBoard (under heldout/, system/ or train/), one distill_log.jsonl
    line (with the state digests of `digests`), and a console line every PRINT_EVERY steps and at checkpoints."""
    step = metrics["step"]
    for k, v in metrics.items():
        if k == "step":
            continue
        group = ("heldout/" if k.startswith("heldout_") else
                 "system/" if k in _SYSTEM_METRICS or k.startswith(("rollout_tokens_per_s/", "target_tokens_per_s/"))
                 else "train/")
        r0.writer.add_scalar(group + k, v, step)  # tag leaf = metric name (report.py keys on it)
    # learner_attempt > 0: steps after a restart repeat those since the restored checkpoint
    r0.jlog.write(json.dumps({**metrics, "learner_attempt": r0.attempt, **digests}) + "\n")
    r0.jlog.flush()
    if step % PRINT_EVERY == 0 or is_ckpt:
        heldout = metrics.get("heldout_acceptance")  # present at checkpoints with a held-out set
        _say(f"step {step}: loss {metrics['loss']:.4f} acceptance {metrics['acceptance']:.4f} "
             f"lag {metrics['policy_lag']:.1f} dropped {metrics['dropped_batches']} idle "
             f"{metrics['learner_idle_frac']:.2f} {metrics['learner_tokens_per_s']:,.0f} tok/s"
             + (f" held-out acceptance {heldout:.4f}" if heldout is not None else ""))


def _save_checkpoint(learner: Learner, r0: _Rank0Log | None, config: dict, metrics: dict,
                     digest: str | None) -> None:
    """Every rank: gather the ranks' RNG states; rank 0 writes the draft, tokenizer, trainer_state.pt
    and, last, the manifest to a temporary dir; every rank reports `metrics` with it to Ray Train."""
    import ray.train
    import torch.distributed as dist

    rngs = [None] * learner.world
    if learner.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    attempt = r0.attempt if r0 is not None else 0
    step = learner.step
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if learner.rank == 0:
            r0.writer.flush()
            d = Path(tmp)
            learner.core.lm.save_pretrained(d)
            learner.tokenizer.save_pretrained(d)
            torch.save({"optimizer": learner.opt.state_dict(), "scheduler": learner.sched.state_dict(),
                        "step": step, "policy_version": learner.version, "counters": learner.counters,
                        "baseline_state": asdict(learner.baseline_state), "heldout_start": learner.heldout_start,
                        "rng": rngs, "config": config["cfg"], "metrics": metrics,
                        "state_digest": digest}, d / STATE_FILE)
            write_manifest(d, step)  # last: its presence + matching files = a complete checkpoint
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        # rank 0's name is the one used; after a restart it differs from the name of any
        # checkpoint the dead attempt wrote but Ray Train never registered
        name = f"checkpoint_step_{step:08d}_{config['session']}" + (f"r{attempt}" if attempt else "")
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if learner.rank == 0:
            publish_logs(config)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: pull RolloutBatches, step the draft, publish weights, checkpoint."""

    cfg, rank, world, device = worker_setup(config)
    lc = cfg.learner
    queue, store = config["queue"], config["store"]
    budget, time_budget = config.get("token_budget"), config.get("time_budget_s")

    learner = _restore(config, cfg, rank, world, device, autocast_dtype(device, lc.autocast))
    _skip_lost_versions(learner, store)
    r0 = _open_rank0(config, cfg, learner, store) if rank == 0 else None
    done = _finished(learner, lc.max_steps, budget, time_budget)
    while not done:
        t0 = time.perf_counter()
        batch, lag, waited = _pull_fresh(queue, store, learner.version, cfg.rollout.max_policy_lag,
                                         learner.counters)
        sums, lr, grad_norm = train_step(learner, batch, cfg)
        if learner.step % lc.sync_every == 0:  # the version is a function of the step: ranks agree
            learner.version += 1
            if rank == 0:
                publish_weights(store, learner.core.lm, learner.version)
        dt = time.perf_counter() - t0
        _count_batch(learner.counters, batch, waited, dt)
        # one all-reduce for every logged quantity: sums over ranks, divided by name below
        sums = _reduce_sums({**sums, "lag": lag, "dropped_batches": learner.counters["dropped_batches"],
                             "consumed_batches": learner.counters["consumed_batches"], "wait_s": waited,
                             "step_s": dt, "on_policy_frac": float(batch.on_policy.mean())}, device)
        learner.counters["stage_s"] = learner.counters.get("stage_s", 0.0) + sums["step_s"] / world
        done = _finished(learner, lc.max_steps, budget, time_budget)
        is_ckpt = learner.step % lc.checkpoint_every == 0 or done
        metrics = _step_metrics(sums, learner, lr, grad_norm, dt, waited, cfg.distill.loss)
        digests = {"restored_digest": learner.restored_digest} if learner.restored_digest else {}
        learner.restored_digest = None  # logged once, on the first step after the restore
        if rank == 0:
            if is_ckpt:
                digests["state_digest"] = state_digest(learner.core, learner.opt)
            metrics.update(_rank0_metrics(r0, learner, queue, store, is_ckpt))
            _log_step(r0, metrics, is_ckpt, digests)
        if is_ckpt:
            _save_checkpoint(learner, r0, config, metrics, digests.get("state_digest"))
    if rank == 0:
        r0.writer.close()
        r0.jlog.close()


_SYSTEM_METRICS = {"dropped_batches", "consumed_batches", "learner_idle_frac", "learner_idle_frac_total",
                   "learner_tokens_per_s", "learner_compute_tokens_per_s", "rollout_tokens_per_s",
                   "queue_depth", "rollout_restarts", "learner_restarts", "policy_version", "lr", "grad_norm",
                   "trained_tokens"}


# ---------------------------------------------------------------------------------- driver

class _RolloutSupervisor(threading.Thread):
    """Driver-side watch over the RolloutActors' `run` loops.

    Ray restarts a killed actor and resubmits its `run` (max_restarts / max_task_retries); this
    thread only sees a loop end for good: an actor out of restarts, or an exception in the loop.
    It then records the error in the WeightStore, where the learner's queue wait finds it and fails
    the run instead of waiting forever.
    """

    def __init__(self, actors: list, store):
        super().__init__(daemon=True, name="rollout-supervisor")
        import ray

        self.actors, self.store = actors, store
        self.refs = {a.run.remote(): i for i, a in enumerate(actors)}
        self.stopping = threading.Event()
        self.lost: list[str] = []
        self._ray = ray

    def run(self) -> None:
        ray = self._ray
        while self.refs and not self.stopping.is_set():
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=1.0)
            for ref in ready:
                i = self.refs.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - any end of a loop is reported the same way
                    if self.stopping.is_set():
                        return
                    msg = f"rollout actor {i}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    self.lost.append(msg)
                    _say(f"WARNING: {msg}")
                    if not isinstance(e, ray.exceptions.RayActorError) or not self.refs:
                        self.store.set_error.remote(msg)

    def stop(self) -> None:
        """Ask every loop to finish, wait briefly, then end the actors (no restart)."""
        ray = self._ray
        self.stopping.set()
        for a in self.actors:
            try:
                a.stop.remote()
            except Exception:  # noqa: BLE001
                pass
        if self.refs:
            ray.wait(list(self.refs), num_returns=len(self.refs), timeout=10.0)
        for a in self.actors:
            ray.kill(a, no_restart=True)


def actor_restarts(handles: list) -> int:
    """How many times Ray restarted these actors (the GCS actor table's count), summed."""
    from ray._private.state import actors as actor_table  # no dashboard needed, unlike ray.util.state

    total = 0
    for h in handles:
        total += int(actor_table(actor_id=h._actor_id.hex()).get("NumRestarts", 0))
    return total


def _engine_stats(engines: list) -> dict:
    """Each target engine's `score_stats` ({} for an engine that does not answer within 30 s)."""
    import ray

    out = {}
    for i, e in enumerate(engines):
        try:
            out[f"engine_{i}"] = ray.get(e.score_stats.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a dead engine has no stats; the run's result stands
            out[f"engine_{i}"] = {}
    return out


def bottleneck(learner_idle_frac: float, actor_times: dict) -> tuple[str, dict]:
    """The stage's bottleneck: "learner" when the learner almost never waits for a batch (idle < 10%: the actors
    keep it fed, and block on the full queue), else whichever of the actors' own work ("rollout": drafting,
    replay and batch building) and their wait on the target ("target") took longer, summed over actors.
    Returns (name, the shares it was judged on)."""
    draft = sum(t.get("draft_s", 0.0) for t in actor_times.values())
    target = sum(t.get("target_s", 0.0) for t in actor_times.values())
    put = sum(t.get("put_wait_s", 0.0) for t in actor_times.values())
    total = max(draft + target + put, 1e-9)
    shares = {"learner_idle_frac": round(learner_idle_frac, 3), "actor_draft_share": round(draft / total, 3),
              "actor_target_share": round(target / total, 3), "actor_queue_share": round(put / total, 3)}
    if learner_idle_frac < 0.1:
        return "learner", shares
    return ("target" if target > draft else "rollout"), shares


def _starting_draft(cfg: JobConfig, rdir: Path, tok, target_path: str) -> tuple[Path, str]:
    """(HF dir the learner and actors load, what it is): the pretrained draft of this run, else
    draft.model, else a fresh draft.arch draft (saved under the run dir)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(target_path).vocab_size
    pre = rdir / "draft_pretrained"
    if (pre / "config.json").is_file():
        load_draft(str(pre), tok, target_vocab=vocab)  # checks the tokenizer against the target's
        return pre, "pretrained"
    if cfg.draft.model:
        model = local_path(cfg.draft.model)
        load_draft(str(model), tok, target_vocab=vocab)
        return model, "draft.model"
    _say(f"WARNING: no {pre} and no draft.model: distilling a FRESH draft.arch draft "
         "(run `draftalign pretrain` first for a useful drafter)")
    target = load_causal_lm(target_path) if cfg.draft.init != "random" else None
    draft = build_draft(cfg.draft.arch, tok, target=target, init=cfg.draft.init,
                        copy_layers=cfg.draft.copy_layers, seed=cfg.seed)
    return save_pretrained_atomic(draft, tok, rdir / "distill_init"), "fresh"


def run_distill(cfg: JobConfig, resume: bool = False, *, token_budget: int | None = None,
                time_budget_s: float | None = None) -> Path:
    """Distill the draft against the target; return `<run_dir>/draft_distilled/` (HF format).

    resume=True continues from the newest good checkpoint under `ray_results/distill/` (or
    returns at once when `distill_done.json` already covers `learner.max_steps`); resume=False
    starts over and moves an earlier run's checkpoints to `ray_results/distill.prev`.
    time_budget_s: also stop once the learner's steps (queue waits included) have taken this many seconds,
    so benchmark arms get equal time whatever their rollouts cost (bench/opd.py).
    token_budget: also stop once the learner has trained on this many response tokens (all ranks
    together; the LR schedule still spans learner.max_steps), so ablation arms see equal data.
    Writes `<run_dir>/distill_done.json` (final metrics, held-out acceptance, counters).
    """
    t_start = time.time()
    lc = cfg.learner
    rdir = run_dir(cfg)
    final, done_path = rdir / "draft_distilled", rdir / "distill_done.json"
    storage, log_path = rdir / "ray_results", rdir / "distill_log.jsonl"
    tb_dir = rdir / "tensorboard" / "distill"
    exp = storage / EXPERIMENT
    target_path = resolve_target(cfg.target.model)
    tok = load_tokenizer(target_path)
    init_dir, source = _starting_draft(cfg, rdir, tok, target_path)
    draft_vocab = job_draft_vocab(cfg, rdir)  # the learner, the rollout actors and the export share it

    skipped: list = []
    start, start_step, resume_from = prepare_resume(
        resume, exp=exp, done_path=done_path, final=final, max_steps=lc.max_steps,
        tb_dir=tb_dir, log_path=log_path, skipped=skipped, fallback=source, say=_say)
    if start == "done":
        return final

    train_rows, held_rows = load_split(rdir, cfg.target.max_model_len, cfg.rollout.max_new_tokens)
    if not train_rows:
        raise ValueError(f"the distillation set under {rdir / 'distill_set'} has no row that fits "
                         f"target.max_model_len={cfg.target.max_model_len} with rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens}")
    _say(f"draft: {source} ({init_dir}); {len(train_rows)} train rows, {len(held_rows)} held-out rows")

    state = None
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
    if state is not None and (state["step"] >= lc.max_steps
                              or (token_budget and state["counters"]["global_tokens"] >= token_budget)
                              or (time_budget_s and state["counters"].get("stage_s", 0.0) >= time_budget_s)):
        _say(f"checkpoint step {start_step} already covers the run: exporting it")
        ckpt, metrics, rollout_stats, lost, system = resume_from, state["metrics"], {}, [], {}
    else:
        result, rollout_stats, lost, system = _train(cfg, init_dir, resume_from, train_rows, held_rows,
                                                     target_path, tok, token_budget, storage, tb_dir, log_path,
                                                     time_budget_s,
                                                     draft_vocab, start_step)
        if result.checkpoint is not None:
            ckpt, metrics = result_checkpoint(result, exp), result.metrics
        else:  # nothing left to train (e.g. the token budget was already spent)
            ckpt, metrics = resume_from, state["metrics"]
    verify_checkpoint(ckpt)
    export_draft(ckpt, tok, final, draft_vocab)
    done = {"steps": metrics["step"], "policy_version": metrics["policy_version"], "loss": metrics["loss"],
            "train_acceptance": metrics["acceptance"], "tail_mass": metrics["tail_mass"],
            "heldout_acceptance": metrics.get("heldout_acceptance"),
            "heldout_acceptance_start": metrics.get("heldout_acceptance_start"),
            "heldout_tvd": metrics.get("heldout_tvd"),
            "heldout_greedy_acceptance": metrics.get("heldout_greedy_acceptance"),
            "heldout_positions": metrics.get("heldout_positions"),
            "dropped_batches": metrics["dropped_batches"], "consumed_batches": metrics["consumed_batches"],
            "trained_tokens": metrics["trained_tokens"], "rollout_tokens": rollout_stats.get("rollout_tokens"),
            "rollout_batches": rollout_stats.get("rollout_batches"),
            "rollout_restarts": rollout_stats.get("restarts"),
            "rollout_actor_starts": rollout_stats.get("actor_starts"), "rollout_losses": lost,
            "rollout_tokens_per_s_per_actor": {f"actor_{i}": round(a["tokens_per_s"], 2)
                                               for i, a in rollout_stats.get("per_actor", {}).items()},
            "rollout_tokens_per_actor": {f"actor_{i}": a["tokens"]
                                         for i, a in rollout_stats.get("per_actor", {}).items()},
            "target_tokens_per_s_per_engine": {e: round(v.get("tokens_per_s", 0.0), 1)
                                               for e, v in system.get("target_engines", {}).items()},
            "target_busy_frac_per_engine": {e: round(v.get("busy_frac", 0.0), 3)
                                            for e, v in system.get("target_engines", {}).items()},
            "target_tokens_scored_for_rollouts": {f"engine_{e}": n
                                                  for e, n in rollout_stats.get("engine_tokens", {}).items()},
            "rollout_time_split": {f"actor_{i}": {k: round(v, 2) for k, v in t.items()}
                                   for i, t in rollout_stats.get("actor_times", {}).items()},
            "learner_restarts": rollout_stats.get("learner_restarts"),
            "target_restarts": system.get("target_restarts"), "skipped_checkpoints": skipped,
            "scaling": system.get("scaling"),
            "loss_name": cfg.distill.loss, "form": cfg.distill.form, "baseline": cfg.distill.baseline,
            "wall_time_s": round(time.time() - t_start, 1), "resumed_from_step": start_step,
            "started_from": source, "init_dir": str(init_dir), "checkpoint": str(ckpt), "draft": str(final)}
    if rollout_stats:
        done["bottleneck"], done["bottleneck_shares"] = bottleneck(
            metrics.get("learner_idle_frac_total", 0.0), rollout_stats.get("actor_times", {}))
    write_json_atomic(done_path, done)
    ha = done["heldout_acceptance"]
    rates = ", ".join(f"{a} {v:,.0f}" for a, v in done["rollout_tokens_per_s_per_actor"].items())
    target = ", ".join(f"{e} {v:,.0f}" for e, v in done["target_tokens_per_s_per_engine"].items())
    _say(f"done: step {done['steps']}, loss {done['loss']:.4f}, held-out acceptance "
         f"{'n/a' if ha is None else f'{ha:.4f}'}, dropped {done['dropped_batches']}, restarts "
         f"{done['rollout_restarts']}, {done['wall_time_s']}s; rollout tok/s [{rates}], target scoring tok/s "
         f"[{target or 'no engine'}], bottleneck {done.get('bottleneck', 'n/a')} -> {final}")
    return final


def _train(cfg: JobConfig, init_dir: Path, resume_from: Path | None, train_rows: list[dict],
           held_rows: list[dict], target_path: str, tok, token_budget: int | None, storage: Path,
           tb_dir: Path, log_path: Path, time_budget_s: float | None, draft_vocab: list[int] | None,
           start_step: int = 0):
    """Start engines, rollout actors, queue and store; run the TorchTrainer (from `start_step`, for the
    quiet console's progress line); always clean up.
    Returns (ray.train.Result, final store stats, messages about rollout loops that ended, system
    facts: target restarts and the resources every role asked for and got)."""
    import ray
    from ray.util.queue import Queue

    from actors.target import create_target_actors, shutdown_target_actors

    lc = cfg.learner
    init_ray(cfg)
    have = ray.cluster_resources()
    for key, need in requested_resources(cfg).items():
        if need > have.get(key, 0.0) + 1e-9:
            raise ValueError(f"distill needs {need:g} {key} (target engines + rollout actors + learner "
                             f"workers) but the Ray cluster has {have.get(key, 0.0):g}")
    per_worker = worker_resources(lc.cpus_per_worker, lc.use_gpu, lc.resources)
    engines, supervisor, queue, store = [], None, None, None
    try:
        k = cfg.target.top_k_logprobs
        if cfg.rollout.on_policy_fraction > 0 or any(cached_score(r, k) is None for r in train_rows + held_rows):
            # one thread per rollout actor (+ the driver / a stats call): their score calls are batched
            engines = create_target_actors(cfg, target_path, name_prefix=f"draftalign-{cfg.name}",
                                           max_concurrency=cfg.rollout.num_actors + 2)
        else:
            _say("no target engine started: rollouts replay the set, whose rows carry the target's top-k")
        engine_info = ray.get([e.info.remote() for e in engines])
        hb = heldout_batch(held_rows, TargetPool(engines), cfg.target.top_k_logprobs, tok.pad_token_id)
        queue = Queue(maxsize=cfg.rollout.queue_size, actor_options={"num_cpus": 0})
        store = WeightStore.options(name=f"draftalign-{cfg.name}-weight-store").remote()
        # Held here until the run ends: Ray re-runs a restarted actor's constructor with the same
        # arguments, so the object must outlive every restart (ray-project/ray#53727).
        rows_ref = ray.put(train_rows)
        create, mode = create_rollout_actors, {}
        if cfg.rollout.on_policy_mode == "target_assisted":
            from actors.assisted import create_assisted_actors as create

            mode = {"stored_greedy": set_sampling(run_dir(cfg)).get("temperature") == 0}  # greedy rounds: no engine
        actors = create(cfg, str(init_dir), rows_ref, engines, queue, store, draft_vocab=draft_vocab,
                        name_prefix=f"draftalign-{cfg.name}", **mode)
        supervisor = _RolloutSupervisor(actors, store)
        supervisor.start()
        tb_dir.mkdir(parents=True, exist_ok=True)
        config = {"cfg": cfg.model_dump(mode="json"), "init_dir": str(init_dir),
                  "resume_from": str(resume_from) if resume_from else None,
                  "queue": queue, "store": store, "heldout_ref": [ray.put(hb)] if hb is not None else [],
                  "tb_dir": str(tb_dir), "log_path": str(log_path), "session": uuid.uuid4().hex[:8],
                  "token_budget": token_budget, "time_budget_s": time_budget_s, "draft_vocab": draft_vocab}
        # a dead learner worker: Ray Train restarts the group from the latest checkpoint
        result = fit_stage(train_loop_per_worker, config, name=EXPERIMENT, storage=storage,
                           num_workers=lc.num_workers, use_gpu=lc.use_gpu, resources_per_worker=per_worker,
                           max_failures=lc.max_failures, log_path=log_path, total=lc.max_steps,
                           start_step=start_step, fields={"loss": "loss", "acceptance": "acceptance",
                                                          "heldout_acceptance": "heldout"})
        stats = ray.get(store.stats.remote())
        system = {"target_restarts": actor_restarts(engines),
                  "target_engines": _engine_stats(engines),
                  "scaling": {"learner": {"num_workers": lc.num_workers, "resources_per_worker": per_worker,
                                          "max_failures": lc.max_failures, **stats["learner_info"]},
                              "rollout": {"num_actors": cfg.rollout.num_actors,
                                          "cpus_per_actor": cfg.rollout.cpus_per_actor,
                                          "gpus_per_actor": cfg.rollout.gpus_per_actor,
                                          "resources": dict(cfg.rollout.resources)},
                              "target": {"num_engines": len(engines),
                                         "resources": [i["resources"] for i in engine_info]}}}
        return result, stats, list(supervisor.lost), system
    finally:
        if supervisor is not None:
            supervisor.stop()
        if store is not None:
            ray.kill(store, no_restart=True)
        if queue is not None:
            queue.shutdown(force=True)
        if engines:
            shutdown_target_actors(engines)
