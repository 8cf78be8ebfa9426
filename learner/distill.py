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
(distill_done.json) give each actor's throughput; distill_done.json's `scaling` records what each
role asked for and what the learner workers were granted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
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
from draftalign.io import write_json_atomic
from draftalign.models import (
    build_draft,
    load_causal_lm,
    load_draft,
    load_tokenizer,
    resolve_target,
    save_pretrained_atomic,
)
from draftalign.runtime import init_ray, run_dir
from draftalign.vocab import job_draft_vocab
from learner.draft_head import DraftHead
from learner.losses import BaselineState, TargetDist, compute_loss, masked_mean, temper, tvd
from learner.pretrain import (
    STATE_FILE,
    _all_reduce,
    _autocast_dtype,
    _export,
    _param_groups,
    _rng_state,
    _set_rng_state,
    adamw,
    checkpoint_to_restore,
    lr_factor,
    prepare_resume,
    say_as,
    verify_checkpoint,
    worker_resources,
    write_manifest,
)

log = logging.getLogger(__name__)

EXPERIMENT = "distill"
HELDOUT_MAX_PROMPTS = 16  # held-out prompts (teacher-forced acceptance estimate)
HELDOUT_FRACTION = 0.1  # ... but never more than this share of the distillation set
QUEUE_POLL_S = 2.0  # learner's queue.get timeout, between checks of the rollout error flag
STALL_S = 600.0  # no fresh batch for this long = the rollout side is stuck: fail loudly
PRINT_EVERY = 10


_say = partial(say_as, "distill")


# ------------------------------------------------------------------------------------ data

def load_rows(rdir: Path) -> list[dict]:
    """Rows of the distillation set (`actors.generate.load_distill_set`) as dicts with prompt_id,
    prompt_token_ids, response_token_ids and, when the set recorded them, the target's top-k
    at each answer position: target_ids int64 (R, k), target_logprobs float32 (R, k) (else None)."""
    from actors.generate import load_distill_set

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


def split_heldout(rows: list[dict], max_prompts: int = HELDOUT_MAX_PROMPTS,
                  fraction: float = HELDOUT_FRACTION) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), split by prompt_id (all responses of a prompt go together);
    the held-out prompts are the ones with the smallest md5 of their id: stable across runs."""
    ids = sorted({r["prompt_id"] for r in rows}, key=lambda s: hashlib.md5(s.encode()).hexdigest())
    n = min(max_prompts, int(len(ids) * fraction))
    held = set(ids[:n])
    return [r for r in rows if r["prompt_id"] not in held], [r for r in rows if r["prompt_id"] in held]


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
    """Torch views of a RolloutBatch restricted to response positions (N of them)."""
    t = lambda a, dtype=None: torch.tensor(np.asarray(a), dtype=dtype, device=device)
    m = batch.loss_mask
    out = {"input_ids": t(batch.input_ids, torch.long), "attention_mask": t(batch.attention_mask, torch.long),
           "loss_mask": t(m, torch.bool), "tokens": t(batch.input_ids[m], torch.long),
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: pull RolloutBatches, step the draft, publish weights, checkpoint."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = JobConfig.model_validate(config["cfg"])
    lc, dc, rc = cfg.learner, cfg.distill, cfg.rollout
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, math.ceil(lc.cpus_per_worker - 1e-9)))
    device = ray.train.torch.get_device()
    amp = _autocast_dtype(device, lc.autocast)
    queue, store = config["queue"], config["store"]

    # Ray Train's latest checkpoint after a restart inside this run, else the driver's resume_from
    with checkpoint_to_restore(config["resume_from"], say=_say) as ckpt_dir:  # None: fresh start
        src = str(ckpt_dir or config["init_dir"])
        tokenizer = AutoTokenizer.from_pretrained(src)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False) if ckpt_dir else None
    lm.train()
    head = DraftHead(config.get("draft_vocab"), lm.config.vocab_size)
    model = ray.train.torch.prepare_model(ResponseLogits(lm, head))
    core = model.module if hasattr(model, "module") else model
    opt = adamw(_param_groups(core, lc.weight_decay), lr=lc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        lr_factor, warmup=lc.warmup_steps, max_steps=lc.max_steps, min_ratio=lc.min_lr_ratio))
    baseline_state = BaselineState(decay=dc.ema_decay)
    counters = {"dropped_batches": 0, "rollout_batches_seen": 0, "consumed_batches": 0, "trained_tokens": 0,
                "global_tokens": 0,
                "on_policy_rows": 0, "rows": 0, "wait_s": 0.0, "wall_s": 0.0}
    step, version = 0, 0
    heldout_start = None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, version = state["step"], state["policy_version"]
        counters.update(state["counters"])
        baseline_state = BaselineState(**state["baseline_state"])
        heldout_start = state.get("heldout_start")
        rngs = state["rng"]
        _set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rank)
    # Restarted inside a run (a learner worker died): the store holds weights of the lost steps.
    # Continue above them so versions keep increasing (the store's rule, actors/rollout.py). Every
    # rank reads before the collective and rank 0 publishes after it, so all ranks agree.
    seen = torch.tensor(float(ray.get(store.version.remote())), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if int(seen) >= version:
        _say(f"rank {rank}: restarted at step {step}; weight version {version} -> {int(seen) + 1}")
        version = int(seen) + 1
    hb = ray.get(config["heldout_ref"][0]) if config["heldout_ref"] and rank == 0 else None

    writer = jlog = None
    attempt = 0  # rank 0: how many times the learner started before in this run
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["tb_dir"], purge_step=step + 1 if step else None)
        jlog = open(config["log_path"], "a")
        publish_weights(store, core.lm, version)  # rollout actors wait for this first version
        attempt = ray.get(store.learner_started.remote({
            "num_workers": world, "pid": os.getpid(), "granted_resources": {
                k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()},
            "start_step": step, "policy_version": version, "restored_from": str(ckpt_dir) if ckpt_dir else None}))
        if attempt:
            _say(f"learner restart {attempt}: continuing from step {step} ({ckpt_dir})")
        _say(f"rank 0/{world}: {'resuming at step ' + str(step) if step else 'starting'}; loss {dc.loss} "
             f"({dc.form}), policy version {version}, autocast {amp}, held-out "
             f"{0 if hb is None else hb.n_tokens} positions")
        if hb is not None and heldout_start is None:
            heldout_start = evaluate_heldout(core, hb, device, amp)
            for k, v in heldout_start.items():
                writer.add_scalar(f"heldout/{k}", v, step)
            _say(f"step {step}: held-out acceptance {heldout_start['heldout_acceptance']:.4f}")

    prev_store = ray.get(store.stats.remote()) if rank == 0 else None
    prev_t = time.perf_counter()
    budget = config.get("token_budget")
    done = step >= lc.max_steps or bool(budget and counters["global_tokens"] >= budget)
    while not done:
        t0 = time.perf_counter()
        batch, lag, waited = _pull_fresh(queue, store, version, rc.max_policy_lag, counters)
        bt = batch_tensors(batch, device)
        n_global = float(_all_reduce(torch.tensor(float(batch.n_tokens), dtype=torch.float64, device=device)))
        counters["global_tokens"] += int(n_global)  # identical on every rank: they stop together
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(bt["input_ids"], bt["attention_mask"], bt["loss_mask"])  # (N, V)
        per_pos, stats = distill_loss(logits.float(), bt, dc, baseline_state, head)
        (masked_mean(per_pos, None, global_count=n_global) * world).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        with torch.no_grad():  # how far the learner moved from the policy that sampled (T = 1 only)
            on = bt["on_policy"]
            drift = 0.0
            if on.any() and rc.temperature == 1.0:
                pos = head.labels(bt["tokens"][on]).clamp_min(0)  # sampled tokens lie in the subset
                now_lp = torch.log_softmax(logits.detach()[on].float(), -1).gather(-1, pos[:, None]).squeeze(-1)
                drift = float((now_lp - bt["draft_logprobs"][on]).abs().mean())
        if step % lc.sync_every == 0:
            version += 1
            if rank == 0:
                publish_weights(store, core.lm, version)
        dt = time.perf_counter() - t0
        counters["consumed_batches"] += 1
        counters["trained_tokens"] += batch.n_tokens
        counters["rows"] += int(batch.on_policy.shape[0])
        counters["on_policy_rows"] += int(batch.on_policy.sum())
        counters["wait_s"] += waited
        counters["wall_s"] += dt

        n = float(batch.n_tokens)
        vec = torch.tensor([float(per_pos.detach().sum()), stats.get("tvd", 0) * n,
                            stats.get("tail_mass", 0) * n, stats.get("reward_mean", 0) * n,
                            stats.get("reward_std", 0) * n, n, lag, drift,
                            counters["dropped_batches"], counters["consumed_batches"], waited, dt,
                            float(batch.on_policy.mean())], dtype=torch.float64, device=device)
        vec = _all_reduce(vec)
        done = step >= lc.max_steps or bool(budget and counters["global_tokens"] >= budget)
        is_ckpt = step % lc.checkpoint_every == 0 or done
        heldout = {}
        if is_ckpt and rank == 0 and hb is not None:
            heldout = evaluate_heldout(core, hb, device, amp)
            if heldout_start is not None:
                heldout["heldout_acceptance_start"] = heldout_start["heldout_acceptance"]
        metrics = {"step": step, "policy_version": version, "loss": float(vec[0] / vec[5]),
                   "tvd": float(vec[1] / vec[5]), "acceptance": 1.0 - float(vec[1] / vec[5]),
                   "tail_mass": float(vec[2] / vec[5]), "policy_lag": float(vec[6] / world),
                   "policy_drift": float(vec[7] / world), "dropped_batches": int(vec[8]),
                   "consumed_batches": int(vec[9]), "learner_idle_frac": float(vec[10] / max(vec[11], 1e-9)),
                   "learner_tokens_per_s": float(vec[5]) / max(dt, 1e-9),
                   "learner_compute_tokens_per_s": float(vec[5]) / max(dt - waited, 1e-9),
                   "on_policy_frac": float(vec[12] / world), "lr": lr, "grad_norm": grad_norm,
                   "trained_tokens": counters["global_tokens"]}
        if dc.loss == "tvd_pp":
            metrics["reward_mean"], metrics["reward_std"] = float(vec[3] / vec[5]), float(vec[4] / vec[5])
        if rank == 0:
            st = ray.get(store.stats.remote())
            now = time.perf_counter()
            new_tokens = st["rollout_tokens"] - prev_store["rollout_tokens"]
            metrics["rollout_tokens_per_s"] = new_tokens / max(now - prev_t, 1e-9)
            for i, tokens in st["actor_tokens"].items():  # per actor: scaling shows up here
                metrics[f"rollout_tokens_per_s/actor_{i}"] = (
                    (tokens - prev_store["actor_tokens"].get(i, 0)) / max(now - prev_t, 1e-9))
            metrics["queue_depth"] = queue.qsize()
            metrics["rollout_restarts"] = st["restarts"]
            metrics["learner_restarts"] = st["learner_restarts"]
            metrics["learner_idle_frac_total"] = counters["wait_s"] / max(counters["wall_s"], 1e-9)
            prev_store, prev_t = st, now
            metrics.update(heldout)
            for k, v in metrics.items():
                if k == "step":
                    continue
                group = ("heldout/" if k.startswith("heldout_") else
                         "system/" if k in _SYSTEM_METRICS or k.startswith("rollout_tokens_per_s/")
                         else "train/")
                writer.add_scalar(group + k, v, step)  # tag leaf = metric name (report.py keys on it)
            # learner_attempt > 0: steps after a restart repeat those since the restored checkpoint
            jlog.write(json.dumps({**metrics, "learner_attempt": attempt}) + "\n")
            jlog.flush()
            if step % PRINT_EVERY == 0 or is_ckpt:
                _say(f"step {step}: loss {metrics['loss']:.4f} acceptance {metrics['acceptance']:.4f} "
                     f"lag {metrics['policy_lag']:.1f} dropped {metrics['dropped_batches']} idle "
                     f"{metrics['learner_idle_frac']:.2f} {metrics['learner_tokens_per_s']:,.0f} tok/s"
                     + (f" held-out acceptance {heldout['heldout_acceptance']:.4f}" if heldout and is_ckpt
                        else ""))
        if not is_ckpt:
            continue
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                writer.flush()
                d = Path(tmp)
                core.lm.save_pretrained(d)
                tokenizer.save_pretrained(d)
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                            "policy_version": version, "counters": counters,
                            "baseline_state": asdict(baseline_state), "heldout_start": heldout_start,
                            "rng": rngs, "config": config["cfg"], "metrics": metrics}, d / STATE_FILE)
                write_manifest(d, step)  # last: its presence + matching files = a complete checkpoint
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # rank 0's name is the one used; after a restart it differs from the name of any
            # checkpoint the dead attempt wrote but Ray Train never registered
            name = f"checkpoint_step_{step:08d}_{config['session']}" + (f"r{attempt}" if attempt else "")
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    if rank == 0:
        writer.close()
        jlog.close()


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
        load_draft(cfg.draft.model, tok, target_vocab=vocab)
        return Path(cfg.draft.model).expanduser().resolve(), "draft.model"
    _say(f"WARNING: no {pre} and no draft.model: distilling a FRESH draft.arch draft "
         "(run `draftalign pretrain` first for a useful drafter)")
    target = load_causal_lm(target_path) if cfg.draft.init != "random" else None
    draft = build_draft(cfg.draft.arch, tok, target=target, init=cfg.draft.init,
                        copy_layers=cfg.draft.copy_layers, seed=cfg.seed)
    return save_pretrained_atomic(draft, tok, rdir / "distill_init"), "fresh"


def run_distill(cfg: JobConfig, resume: bool = False, *, token_budget: int | None = None) -> Path:
    """Distill the draft against the target; return `<run_dir>/draft_distilled/` (HF format).

    resume=True continues from the newest good checkpoint under `ray_results/distill/` (or
    returns at once when `distill_done.json` already covers `learner.max_steps`); resume=False
    starts over and moves an earlier run's checkpoints to `ray_results/distill.prev`.
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

    skipped: list = []
    start, start_step, resume_from = prepare_resume(
        resume, exp=exp, done_path=done_path, final=final, max_steps=lc.max_steps,
        tb_dir=tb_dir, log_path=log_path, skipped=skipped, fallback=source, say=_say)
    if start == "done":
        return final

    rows = filter_rows(load_rows(rdir), cfg.target.max_model_len, cfg.rollout.max_new_tokens)
    train_rows, held_rows = split_heldout(rows)
    if not train_rows:
        raise ValueError(f"the distillation set under {rdir / 'distill_set'} has no row that fits "
                         f"target.max_model_len={cfg.target.max_model_len} with rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens}")
    _say(f"draft: {source} ({init_dir}); {len(train_rows)} train rows, {len(held_rows)} held-out rows")

    state = None
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
    if state is not None and (state["step"] >= lc.max_steps
                              or (token_budget and state["counters"]["global_tokens"] >= token_budget)):
        _say(f"checkpoint step {start_step} already covers the run: exporting it")
        ckpt, metrics, rollout_stats, lost, system = resume_from, state["metrics"], {}, [], {}
    else:
        result, rollout_stats, lost, system = _train(cfg, init_dir, resume_from, train_rows, held_rows,
                                                     target_path, tok, token_budget, storage, tb_dir, log_path)
        if result.checkpoint is not None:
            ckpt, metrics = Path(result.checkpoint.path), result.metrics
        else:  # nothing left to train (e.g. the token budget was already spent)
            ckpt, metrics = resume_from, state["metrics"]
    verify_checkpoint(ckpt)
    _export(ckpt, tok, final, job_draft_vocab(cfg, rdir))
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
            "learner_restarts": rollout_stats.get("learner_restarts"),
            "target_restarts": system.get("target_restarts"), "skipped_checkpoints": skipped,
            "scaling": system.get("scaling"),
            "loss_name": cfg.distill.loss, "form": cfg.distill.form, "baseline": cfg.distill.baseline,
            "wall_time_s": round(time.time() - t_start, 1), "resumed_from_step": start_step,
            "started_from": source, "init_dir": str(init_dir), "checkpoint": str(ckpt), "draft": str(final)}
    write_json_atomic(done_path, done)
    ha = done["heldout_acceptance"]
    _say(f"done: step {done['steps']}, loss {done['loss']:.4f}, held-out acceptance "
         f"{'n/a' if ha is None else f'{ha:.4f}'}, dropped {done['dropped_batches']}, restarts "
         f"{done['rollout_restarts']}, {done['wall_time_s']}s -> {final}")
    return final


def _train(cfg: JobConfig, init_dir: Path, resume_from: Path | None, train_rows: list[dict],
           held_rows: list[dict], target_path: str, tok, token_budget: int | None, storage: Path,
           tb_dir: Path, log_path: Path):
    """Start engines, rollout actors, queue and store; run the TorchTrainer; always clean up.
    Returns (ray.train.Result, final store stats, messages about rollout loops that ended, system
    facts: target restarts and the resources every role asked for and got)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
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
            engines = create_target_actors(cfg, target_path, name_prefix=f"draftalign-{cfg.name}")
        else:
            _say("no target engine started: rollouts replay the set, whose rows carry the target's top-k")
        engine_info = ray.get([e.info.remote() for e in engines])
        hb = heldout_batch(held_rows, TargetPool(engines), cfg.target.top_k_logprobs, tok.pad_token_id)
        queue = Queue(maxsize=cfg.rollout.queue_size, actor_options={"num_cpus": 0})
        store = WeightStore.options(name=f"draftalign-{cfg.name}-weight-store").remote()
        # Held here until the run ends: Ray re-runs a restarted actor's constructor with the same
        # arguments, so the object must outlive every restart (ray-project/ray#53727).
        rows_ref = ray.put(train_rows)
        actors = create_rollout_actors(cfg, str(init_dir), rows_ref, engines, queue, store,
                                       draft_vocab=job_draft_vocab(cfg, storage.parent),
                                       name_prefix=f"draftalign-{cfg.name}")
        supervisor = _RolloutSupervisor(actors, store)
        supervisor.start()
        tb_dir.mkdir(parents=True, exist_ok=True)
        config = {"cfg": cfg.model_dump(mode="json"), "init_dir": str(init_dir),
                  "resume_from": str(resume_from) if resume_from else None,
                  "queue": queue, "store": store, "heldout_ref": [ray.put(hb)] if hb is not None else [],
                  "tb_dir": str(tb_dir), "log_path": str(log_path), "session": uuid.uuid4().hex[:8],
                  "token_budget": token_budget, "draft_vocab": job_draft_vocab(cfg, storage.parent)}
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu,
                                         resources_per_worker=per_worker),
            # a dead learner worker: Ray Train restarts the group from the latest checkpoint
            run_config=RunConfig(storage_path=str(storage.resolve()), name=EXPERIMENT,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=lc.max_failures)))
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"distillation failed: {result.error}") from result.error
        stats = ray.get(store.stats.remote())
        system = {"target_restarts": actor_restarts(engines),
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
