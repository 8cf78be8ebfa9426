"""The online learner (issue #16, "Learn"): stage 3's training step on the rounds the endpoint serves.

    SpecDecodeReplica ×R ──RoundCapture──► RoundBuffer ──get_batch(n)──► OnlineLearner (Ray actor)
          ▲ install between rounds (serve/online.py)                      │ every steps_per_publish steps
          └──── poll ◄──── WeightStore (serve.online.weight_store) ◄──────┘ publish_weights(store, draft, v)

Batch. A step trains on n_s = serve.online.learner.records_per_step served records (one per request) and
n_r = round(n_s · f / (1 − f)) rows replayed from the distillation set (f = replay_fraction):

    served row    one request: its sequence (prompt + served tokens), the loss at the N positions its rounds
                  scored — accepted proposals and recovered / bonus tokens, with the target's raw top-k
                  recorded there (actors.traffic.request_rows): one forward pass for all of its rounds
    replayed row  a span of the target's answer y to a train-split prompt x: a cut j ~ U{0 … |y| − 1},
                  prompt = x + y[:j], response = y[j : j + L] with L = the step's mean N, target = the top-k
                  vLLM recorded while generating y (stage 2, `actors.rollout.cached_score`)

so f is the replayed share of the step's rows and, spans being as long as a served row's scored positions,
about its share of positions.
Both kinds go into one RolloutBatch (`actors.rollout.build_batch`) and one call of stage 3's
`learner.distill.train_step`: loss = Σ_t D(p_t ‖ q_t) / N over the N response positions, D = distill.loss
(TVD++ by default; FKL, RKL, TVD, JSD) in its exact form — an expectation over the k + 1 buckets of the
target's top-k and tail, on the served draft's vocabulary (`learner.draft_head`, its draft_vocab.json).
Served positions are the states the draft itself reached while serving (on-policy data, Liu et al. 2024),
exactly those the target scored on the served sequence; the exact form
needs no behaviour probabilities, so records proposed by older versions are used as they are.

Epochs. Each collected batch of records is stepped on serve.online.learner.epochs times (fresh replay spans
each time; the exact loss needs no importance weights), as PPO-style trainers reuse a rollout batch: traffic
is the scarce resource, and the learner's CPU is idle between batches. With serve.online.learner.served_pool = P
> 0 every such step also draws up to records_per_step earlier served records, uniformly from the last P the
learner trained on (an experience-replay pool of recent traffic, as off-policy RL keeps one): a request is then
reused across many steps mixed with others, instead of `epochs` times in a row beside the same few.

Gate. A version is published only if it beats the last published one (version 0: the disk draft) on data
neither trained on (`gate_verdict`, serve.online.learner.gate): every probe_every-th served record is held out
into a served probe (the newest probe_records), and probe_replay_rows spans of the distillation set's held-out
prompts form a fixed replay probe. With a(·) the teacher-forced acceptance (`learner.distill.evaluate_heldout`:
1{argmax q = argmax p} when the probe's requests were greedy, else 1 − TVD(p, q)) and b(·) the other of the two,
of the candidate c and the published draft u on the same positions (a paired comparison),

    publish c  iff  [a_served(c) > a_served(u)  or  a_served(c) = a_served(u) and b_served(c) ≥ b_served(u)]
              and  a_replay(c) ≥ a_replay(u) − max_forgetting,

else c is held back (counted) and training goes on from it. The gate judges before any replica serves the
version, on held-out records and the distillation set; the replica's rollback (serve/online.py) judges after, on
the traffic the version served, teacher-forced and paired in the same way.

Versions. Replicas serve the draft on disk as version 0. The learner starts from that checkpoint and
publishes v = max(store version, 0) + 1, + 2, … every steps_per_publish steps (fp32 ndarrays keyed like
the state dict: `learner.distill.publish_weights`); replicas install a version between rounds, judge it
against the previous one and may roll it back (serve/online.py `VersionTrial`). The learner keeps
training from its own weights either way.

Resources. One Ray actor with serve.online.learner.cpus / gpus / resources, placed and sized
independently of the replicas. Not built yet: several learner ranks (DDP), checkpoints of the online draft.
"""

from __future__ import annotations

import copy
import math
import random
import threading
import time
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import ray
import torch

from actors.rollout import WeightStore, build_batch, cached_score
from actors.traffic import OnlineSettings, get_buffer, request_rows, to_rollout_batch
from draftalign.config import ConfigError, JobConfig
from draftalign.storage import pull
from learner.distill import Learner, ResponseLogits, publish_weights, train_step
from learner.draft_head import DraftHead
from learner.losses import BaselineState
from learner.trainer import adamw, autocast_dtype, lr_factor, param_groups

HISTORY = 256  # per-step metrics kept for stats()


def learner_name(cfg: JobConfig) -> str:
    """The online learner actor's name (in serve.online.namespace)."""
    return f"draftalign-{cfg.name}-online-learner"


def replay_rows(cfg: JobConfig, k: int, heldout: bool = False) -> list[dict]:
    """Train-split rows of the job's distillation set that carry the target's top-k (≥ k) at every answer
    position — what the online learner replays; [] when serve.online.learner.replay_fraction is 0.
    Raises ConfigError naming the setting when replay is asked for and no row qualifies.
    heldout: the held-out split instead (the gate's replay probe; [] when there is none, never an error)."""
    from learner.distill import load_split

    f = cfg.serve.online.learner.replay_fraction
    if f == 0 and not heldout:
        return []
    src = pull(cfg.run_path / "distill_set")  # a URI run's, from storage
    rows = []
    if (src / "metadata.json").is_file():  # a finished set (actors.generate)
        train, held = load_split(cfg.run_path, cfg.target.max_model_len, 0)
        rows = [r for r in (held if heldout else train) if cached_score(r, k) is not None]
    if not rows and not heldout:
        raise ConfigError(f"serve.online.learner.replay_fraction={f} replays distillation-set rows with the "
                         f"target's top-{k} recorded (stage 2: `draftalign generate`), but {src} has none; "
                         f"generate the set or set serve.online.learner.replay_fraction=0")
    return rows


def replay_spans(rows: list[dict], n: int, length: int, k: int, rng: random.Random) -> dict[str, list]:
    """n replayed rows as `build_batch` row lists: per row a uniform cut j of the answer y and the span
    y[j : j + length] after the context x + y[:j], with the target's recorded top-k at those positions."""
    out: dict[str, list] = {"prompts": [], "responses": [], "scores": []}
    for _ in range(n):
        r = rng.choice(rows)
        x, y = list(r["prompt_token_ids"]), list(r["response_token_ids"])
        j = rng.randrange(len(y))
        s = cached_score(r, k)
        out["prompts"].append(x + y[:j])
        out["responses"].append(y[j: j + length])
        out["scores"].append({"ids": s["ids"][j: j + length], "logprobs": s["logprobs"][j: j + length]})
    return out


def mixed_batch(records: list[dict], replay: list[dict], replay_fraction: float, k: int, pad_id: int,
                rng: random.Random, version: int = 0):
    """One training batch: the served `records` (on-policy rows, one per request) + round(n_s · f / (1 − f))
    replayed spans (off-policy rows) as one RolloutBatch (module docstring)."""
    served = request_rows(records)
    n_s = len(served["prompts"])
    if n_s == 0:
        raise ValueError("no served records with a scored position to train on")
    n_r = round(n_s * replay_fraction / (1 - replay_fraction)) if replay else 0
    span = max(1, round(float(np.mean([m.sum() for m in served["loss_masks"]]))))
    rep = replay_spans(replay, n_r, span, k, rng)
    return build_batch(served["prompts"] + rep["prompts"], served["responses"] + rep["responses"],
                       served["scores"] + rep["scores"], pad_id=pad_id,
                       on_policy=[True] * n_s + [False] * n_r, loss_masks=served["loss_masks"] + [None] * n_r,
                       draft_logprobs=served["draft_logprobs"] + [None] * n_r, policy_version=version)


def gate_verdict(new: dict[str, tuple[float, float]], published: dict[str, tuple[float, float]],
                 max_forgetting: float) -> bool:
    """The gate (module docstring): {"served": (a, b), "replay": (a, b)} of the candidate vs the published draft
    (a: the acceptance of the probe's decoding mode, b: the other one, the tie-break); a probe missing from either
    dict is not judged."""
    ok = True
    if "served" in new and "served" in published:
        ok = tuple(new["served"]) >= tuple(published["served"])  # lexicographic: a, then b on a tie
    if "replay" in new and "replay" in published:
        ok = ok and new["replay"][0] >= published["replay"][0] - max_forgetting
    return ok


class OnlineLearnerWorker:
    """The online learner without Ray's actor wrapper: `run` pulls records, steps, publishes; `stop`, `stats`."""

    def __init__(self, cfg: dict, draft_path: str, replay: list[dict], heldout: list[dict] | None = None):
        from draftalign.models import load_causal_lm, load_tokenizer
        from draftalign.vocab import load_draft_vocab

        self.cfg = cfg = JobConfig.model_validate(cfg)
        self.lo, lc = cfg.serve.online.learner, cfg.learner
        self.settings = OnlineSettings.from_config(cfg)
        torch.set_num_threads(max(1, math.ceil(self.lo.cpus - 1e-9)))
        device = torch.device("cuda" if self.lo.gpus > 0 else "cpu")
        lm = load_causal_lm(draft_path, torch.float32, str(device))
        lm.train()
        tok = load_tokenizer(draft_path)
        head = DraftHead(load_draft_vocab(draft_path, lm.config.vocab_size), lm.config.vocab_size)
        core = ResponseLogits(lm, head)
        opt = adamw(param_groups(core, lc.weight_decay), lr=self.lo.lr)
        # constant after warm-up: min_ratio 1 makes lr_factor's cosine flat (an online run has no horizon)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=self.lo.warmup_steps,
                                                               max_steps=1, min_ratio=1.0))
        counters = {"dropped_batches": 0, "rollout_batches_seen": 0, "consumed_batches": 0, "trained_tokens": 0,
                    "global_tokens": 0, "on_policy_rows": 0, "rows": 0, "wait_s": 0.0, "wall_s": 0.0}
        self.learner = Learner(0, 1, device, autocast_dtype(device, lc.autocast), core, core, tok, opt, sched,
                               BaselineState(decay=cfg.distill.ema_decay), counters)
        self.k = self.settings.top_k
        self.replay, self.pad_id = replay, tok.pad_token_id
        if self.lo.replay_fraction > 0 and not replay:
            raise ValueError("serve.online.learner.replay_fraction > 0 needs replay rows (`replay_rows`)")
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.buffer = get_buffer(self.settings)
        self.store = WeightStore.options(name=self.settings.weight_store, namespace=self.settings.namespace,
                                         get_if_exists=True, lifetime="detached").remote()
        self._stop = threading.Event()
        self.counts = {"records": 0, "replayed_rows": 0, "served_tokens": 0, "wait_s": 0.0, "step_s": 0.0,
                       "probe_records": 0, "held_back": 0, "gate_s": 0.0}
        self.records_per_version: dict[int, int] = {}
        self.published: list[dict] = []
        self.history: deque = deque(maxlen=HISTORY)
        # the gate: the published draft (a copy of the disk draft = version 0 until the first publish) and probes
        self.reference = copy.deepcopy(core).eval() if self.lo.gate else None
        self.probe: deque = deque(maxlen=self.lo.probe_records)
        self.replay_probe = None
        if self.lo.gate and heldout and self.lo.probe_replay_rows:
            spans = replay_spans(heldout, self.lo.probe_replay_rows, 16, self.k, random.Random(cfg.seed + 1))
            self.replay_probe = build_batch(spans["prompts"], spans["responses"], spans["scores"], pad_id=self.pad_id,
                                            on_policy=[False] * len(spans["prompts"]))
        self._reference_replay: tuple | None = None  # a_replay(published): fixed probe, fixed weights — cached
        self._seen = 0
        self.gates: deque = deque(maxlen=HISTORY)
        self.pool: deque = deque(maxlen=self.lo.served_pool)  # served records already trained on, newest last

    def _collect(self) -> list[dict] | None:
        """records_per_step records from the buffer (oldest first), waiting for traffic; None once stopped."""
        got: list[dict] = []
        while len(got) < self.lo.records_per_step:
            if self._stop.is_set():
                return None
            more = ray.get(self.buffer.get_batch.remote(self.lo.records_per_step - len(got)))
            got += [r for r in more if self.admit(r)]
            if len(got) < self.lo.records_per_step:
                self._stop.wait(self.lo.poll_interval_s)
        return got

    def admit(self, record: dict) -> bool:
        """True: the record trains. False: it has no scored position, or it is every probe_every-th served
        record, held out into the gate's probe (the gate judges versions on it)."""
        if len(record["positions"]) == 0:
            return False
        self._seen += 1
        if self.reference is not None and self._seen % self.lo.probe_every == 0:
            self.probe.append(record)
            self.counts["probe_records"] += 1
            return False
        return True

    def train_on(self, records: list[dict]) -> None:
        """serve.online.learner.epochs steps on one collected batch (fewer once stopped / at max_steps), each
        with up to records_per_step earlier records drawn from the served pool (module docstring "Epochs")."""
        for epoch in range(self.lo.epochs):
            if self._finished():
                break
            earlier = self.rng.sample(list(self.pool), min(len(self.pool), self.lo.records_per_step))
            self.step(records, fresh=epoch == 0, earlier=earlier)
        self.pool.extend(records)

    def step(self, records: list[dict], fresh: bool = True, earlier: list[dict] = ()) -> dict:
        """One optimizer step on `records` (+ `earlier` served records) + replay; publishes a version every
        steps_per_publish steps. `fresh`: the records' first step (counted once in the record / token counters)."""
        t0 = time.perf_counter()
        lrn = self.learner
        batch = mixed_batch(list(records) + list(earlier), self.replay, self.lo.replay_fraction, self.k,
                            self.pad_id, self.rng, lrn.version)
        sums, lr, grad_norm = train_step(lrn, batch, self.cfg)
        if lrn.step % self.lo.steps_per_publish == 0 and self._gate():
            lrn.version += 1
            publish_weights(self.store, lrn.core.lm, lrn.version)
            self.published.append({"version": lrn.version, "step": lrn.step, "time": time.time()})
        served_tokens = sum(len(r["positions"]) for r in records)
        if fresh:
            for r in records:
                v = int(r["policy_version"])
                self.records_per_version[v] = self.records_per_version.get(v, 0) + 1
            self.counts["records"] += len(records)
            self.counts["served_tokens"] += served_tokens
        self.counts["replayed_rows"] += int((~batch.on_policy).sum())
        metrics = {"step": lrn.step, "policy_version": lrn.version, "loss": sums["loss"] / sums["tokens"],
                   "acceptance": 1.0 - sums["tvd"] / sums["tokens"], "tokens": int(sums["tokens"]),
                   "served_tokens": served_tokens, "earlier_records": len(earlier), "lr": lr, "grad_norm": grad_norm,
                   "step_s": time.perf_counter() - t0}
        self.counts["step_s"] += metrics["step_s"]
        self.history.append(metrics)
        return metrics

    def _acceptance(self, core, batch, greedy: bool) -> tuple[float, float]:
        """(a, b): the acceptance of the decoding mode (greedy or sampled) first, the other second."""
        from learner.distill import evaluate_heldout

        a = evaluate_heldout(core, batch, self.learner.device, self.learner.amp)
        pair = (a["heldout_greedy_acceptance"], a["heldout_acceptance"])
        return pair if greedy else pair[::-1]

    def _gate(self) -> bool:
        """True = publish the learner's weights now (module docstring "Gate"); they become the reference."""
        if self.reference is None:
            return True
        t0 = time.perf_counter()
        greedy = all(float(r["temperature"]) == 0 for r in self.probe)
        new, ref = {}, {}
        if self.probe:
            served = to_rollout_batch(list(self.probe), pad_id=self.pad_id)
            new["served"] = self._acceptance(self.learner.core, served, greedy)
            ref["served"] = self._acceptance(self.reference, served, greedy)
        if self.replay_probe is not None:
            new["replay"] = self._acceptance(self.learner.core, self.replay_probe, greedy)
            if self._reference_replay is None:
                self._reference_replay = self._acceptance(self.reference, self.replay_probe, greedy)
            ref["replay"] = self._reference_replay
        ok = gate_verdict(new, ref, self.lo.max_forgetting)
        if ok:
            self.reference.load_state_dict(self.learner.core.state_dict())
            self._reference_replay = new.get("replay")
        else:
            self.counts["held_back"] += 1
        self.counts["gate_s"] += time.perf_counter() - t0
        self.gates.append({"step": self.learner.step, "publish": ok, "candidate": new, "published": ref,
                           "probe_records": len(self.probe), "greedy": greedy})
        return ok

    def _finished(self) -> bool:
        """stop() was called or serve.online.learner.max_steps were taken."""
        return self._stop.is_set() or (self.lo.max_steps is not None and self.learner.step >= self.lo.max_steps)

    def run(self) -> dict:
        """Train until stop() or serve.online.learner.max_steps; returns stats()."""
        self.learner.version = max(0, ray.get(self.store.version.remote()))  # replicas serve the disk draft as 0
        while not self._finished():
            t0 = time.perf_counter()
            records = self._collect()
            if records is None:
                break
            self.counts["wait_s"] += time.perf_counter() - t0
            self.train_on(records)
        return self.stats()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        return {"step": self.learner.step, "policy_version": self.learner.version, **self.counts,
                "records_per_version": dict(self.records_per_version), "published": list(self.published),
                "gates": list(self.gates),
                "last": self.history[-1] if self.history else None, "history": list(self.history)}


@ray.remote(max_concurrency=2)  # run() in one thread; stop() / stats() in the other
class OnlineLearner(OnlineLearnerWorker):
    """Ray actor around OnlineLearnerWorker. Create with `start_online_learner`."""


def start_online_learner(cfg: JobConfig, draft_path: str | Path):
    """Create the named learner actor on its own resources and start its loop: (actor, ref of run())."""
    lo = cfg.serve.online.learner
    k = cfg.serve.online.top_k_logprobs or cfg.target.top_k_logprobs
    replay = replay_rows(cfg, k)  # read here: the driver sees the run dir, the actor's node may not
    heldout = replay_rows(cfg, k, heldout=True) if lo.gate and lo.probe_replay_rows else []
    o = cfg.serve.online  # the store exists before the learner starts: replicas and callers find it by name
    WeightStore.options(name=o.weight_store, namespace=o.namespace, get_if_exists=True, lifetime="detached").remote()
    actor = OnlineLearner.options(name=learner_name(cfg), namespace=cfg.serve.online.namespace,
                                  num_cpus=lo.cpus, num_gpus=lo.gpus, resources=dict(lo.resources) or None
                                  ).remote(cfg.model_dump(mode="json"), str(draft_path), replay, heldout)
    return actor, actor.run.remote()
