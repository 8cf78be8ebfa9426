"""Online distillation, serving side (issue #16): capture every round's scored proposals, hot-swap draft versions.

Capture. Every chain round already holds what Online Speculative Decoding (Liu et al., ICML 2024) distils
on: the draft's own proposals x_1 … x_γ (on-policy states) and the target's distribution at the γ + 1
verified positions. `SpecDecoder.observer` hands the round's tensors over (`serve.specdec.RoundView`,
references, no target pass added) and `round_records` turns each live sequence's round into a round record:

    request          str                 "call.row": the decoding call (`SpecDecoder.stream`) and its row
    context          (c,)       int32    prompt + tokens committed so far (the state the round drafted from)
    start            int                 c
    draft_tokens     (γ,)       int32    x_1 … x_γ
    draft_logprobs   (γ,)       float32  log q(x_i) under the request's sampling params (0 at greedy: q one-hot)
    target_ids       (γ + 1, k) int32    top-k of log p(· | context, x_<i), i = 1 … γ + 1
    target_logprobs  (γ + 1, k) float32  their log-probs, sorted descending
    committed        (m,)       int32    the tokens the round kept: x_1 … x_κ, then the recovered or bonus token
                                         (m = κ + 1, fewer when a stop ended the request)
    num_accepted     int                 κ;  policy_version  int: the draft that proposed
    temperature      float               the request's (0 = greedy)

`target_logprobs` are log_softmax of the RAW logits (temperature 1, no top-k/top-p), the same distribution
the distillation set and `TargetActor.score` record; the learner tempers it with distill.temperature. The
request's processed p (one-hot at greedy) would carry no distillation signal. k = serve.online.top_k_logprobs
(default target.top_k_logprobs).

One record per request (`request_records`): a training row re-reads its whole context, so a request's rounds
form ONE row — its served sequence with the target's top-k at every position a round scored on it. Round r
(context length c_r, m_r tokens kept) scored position c_r + i with its row i for i < m_r: the accepted
proposals, then the recovered or bonus token (same state as the first rejected proposal, so the same
exact-form loss). Its rows after a rejection condition on a token the sequence does not contain, and a
proposal there can never be accepted: they are not kept. The record:

    request          str
    tokens           (T,)       int32    the first round's context + every token committed since
    positions        (N,)       int32    the scored t: target row = log p(· | tokens[:t]), tokens[t] served there
    target_ids       (N, k)     int32    (rounds in order, each row as recorded)
    target_logprobs  (N, k)     float32
    draft_logprobs   (N,)       float32  log q(tokens[t]) at accepted proposals, 0 at recovered / bonus tokens
    draft_versions   (N,)       int32    the draft version of the round that scored t
    policy_version   int                 the oldest of them;  rounds, accepted  int;  temperature  float

Tokens of rounds the goodput policy ran without a draft (γ = 0: not observed) stay in the row unscored.
Grouping happens in the replica when the decoding call ends (`SpecDecoder.call_done`), not in the learner's
batch: one buffer record is then one training row (the learner keeps no per-request state and never splits a
request over steps), and a context crosses to the buffer once per request instead of once per round (round
records by the buffer would cost O(c · rounds) per request, request records O(T + N · k)), so the buffer stays
a plain bounded FIFO of whole rows. The price: a request reaches the learner when its call ends — a batch's
requests return together anyway, a stream at its last round — and the rounds of calls in flight wait in the
replica (only each request's latest context is kept). `RoundCapture.flush()` also closes requests in flight
(tests, shutdown); one that goes on continues in a new record, which re-reads its context.

Cost per round on the engine thread: the target's logits are computed once and shared with the sampler (no
extra pass); the observer adds log_softmax + top-k over (B_live, γ + 1, V), a gather of q at x, and numpy
copies of B_live contexts; at the call's end `request_records` concatenates each request's rows. Records are
pushed to the buffer in batches (`push_every`, or after `push_interval_s`) with a fire-and-forget actor call;
at most `MAX_INFLIGHT_PUSHES` pushes wait for the buffer, beyond that a batch is dropped and counted (serving
never waits for the buffer). Records not yet pushed, and the rounds of calls in flight, are lost with their
replica.

Buffer. `RoundBuffer`, one named Ray actor shared by the replicas (serve.online.buffer_name, detached so
a learner outlives replica restarts): a deque of serve.online.buffer_records records (one per request),
drop-oldest with a count, `get_batch(n)` takes the oldest n (FIFO), `stats()`. With serve.online.spill_dir
every `put` is also written as one JSONL shard (temp file + rename: a reader sees whole shards only); without
it request content stays in memory.

To the learner. `request_rows` gives `actors.rollout.build_batch`'s row lists: prompt = tokens[:t_1],
response = tokens[t_1 : t_N + 1] (t_1, t_N: the first and last scored positions), the top-k placed at the
positions, a loss mask over the response marking them, draft_logprobs = behaviour log q. `to_rollout_batch`
builds the stage 3 `RolloutBatch` from them: on_policy = True, policy_version = the oldest record's version.

Hot-swap. A version is a `{name: float ndarray}` dict keyed like the draft's state dict (the format of
`learner.distill.publish_weights` into `actors.rollout.WeightStore`). `OnlineDraft.install` runs on the
engine thread, so between two rounds: names, shapes and dtypes are checked before anything is copied
(`draftalign.weights.check_weights`; a mismatch raises and leaves the draft untouched), the weights are
copied in place and `SpecDecoder.refresh_draft` rebuilds the fused weights; generations in flight
re-prefill their draft cache at their next round (one draft prefill per sequence in flight). The goodput
policy's α̂ restarts from its prior, so a version replacing a draft the policy had switched off (γ = 0)
drafts, and is judged, at once. Output stays lossless: the draft only changes which tokens are
proposed, never which are emitted.

Rollback (`VersionTrial`). Installing v over u starts a trial; once v has served W = rollback_window
sequence-rounds it is judged against u, and rolled back when worse beyond noise. Rolling back reinstalls u (kept
as a weight copy during the trial) and v is never installed again; otherwise v is kept. No version is installed
while a trial runs. Two judges (serve.online.rollback_judge):

  paired (default)  both versions teacher-forced on the same served sequences: `ServedTraffic` keeps the last
                    2W sequence-rounds (u's last W and v's W) with the target's processed p at every position
                    they committed (top-K, one-hot at greedy); off the engine thread a copy of the draft loads u,
                    then v, and scores a_t = Σ_{j ∈ top-K(p_t)} min(p_t(j), q_t(j)) at each position
                    (`teacher_forced_acceptance`: 1{argmax q = argmax p} at greedy). With d_t = a_v(t) − a_u(t)
                    over the n positions, v is rolled back when
                        mean(d) < −rollback_margin − z · sd(d) / √n        (`paired_worse`, z = rollback_z).
                    Lossless decoding makes the served sequences draws from the target whichever draft proposed
                    them, so the judge compares drafts on one sample of traffic; the positions of one request are
                    correlated, which the SE over positions does not count.
  live              each version's own served acceptance α̂ = accepted / (accepted + rejected) over its window
                    (u: its last W sequence-rounds before the install):
                        α̂_v < α̂_u − rollback_margin − z · SE,   SE = √(ᾱ(1 − ᾱ)(1/n_u + 1/n_v))
                    (one-sided two-proportion z-test, n = draft tokens judged, ᾱ pooled). Its two windows hold
                    different requests: a window of one or two requests varies with what it drew (served α per
                    request ≈ 0.02 on code, 0.6 on chat) far beyond the binomial SE, so a version can be rolled
                    back for meeting harder traffic — 4 of 23 in a served run (bench/results/archive/
                    online_nogate_z.json), 8 of 23 with z = 0 (archive/online_nogate_r8.json).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
import torch

from actors.traffic import OnlineSettings, get_buffer, request_records, round_records
from draftalign.sampling import logits_to_probs
from draftalign.weights import check_and_load_weights, check_weights
from serve.acceptance import per_token_acceptance
from serve.goodput import AcceptanceEstimate

logger = logging.getLogger("ray.serve")

MAX_INFLIGHT_PUSHES = 8


# ====================================================================== records
class RoundCapture:
    """The engine-side observer's capture half: each decoding call's rounds held until the call ends, then one
    record per request (`request_records`), pushed to the buffer in batches."""

    def __init__(self, buffer, top_k: int, push_every: int, push_interval_s: float):
        self.buffer, self.top_k = buffer, top_k
        self.push_every, self.push_interval_s = push_every, push_interval_s
        self._open: dict[int, dict[str, list[dict]]] = {}  # call → request → its rounds so far
        self._pending: list[dict] = []
        self._oldest = 0.0
        self._inflight: list = []
        self._lock = threading.Lock()
        self.counts = {"rounds": 0, "records": 0, "pushes": 0, "dropped_in_replica": 0, "errors": 0}

    def observe(self, view) -> None:
        """`SpecDecoder.observer`: hold the round's records with their requests'."""
        recs = round_records(view, self.top_k)
        with self._lock:
            requests = self._open.setdefault(view.call, {})
            for r in recs:
                rounds = requests.setdefault(r["request"], [])
                if rounds:
                    rounds[-1]["context"] = None  # `request_records` reads the last round's context only
                rounds.append(r)
            self.counts["rounds"] += len(recs)

    def call_done(self, call: int) -> None:
        """`SpecDecoder.call_done`: the call's requests get no more rounds; one record each."""
        with self._lock:
            self._close(call)
            if len(self._pending) >= self.push_every:
                self._push()

    def flush(self, stale_only: bool = False) -> None:
        """Push the pending records (stale_only: once push_interval_s old); without stale_only, close the calls
        in flight first (their requests continue in new records)."""
        with self._lock:
            if not stale_only:
                for call in list(self._open):
                    self._close(call)
            if self._pending and (not stale_only or time.monotonic() - self._oldest >= self.push_interval_s):
                self._push()

    def wait(self, timeout: float = 30.0) -> None:
        """Block until every push sent so far reached the buffer (tests, shutdown)."""
        with self._lock:
            refs = list(self._inflight)
        ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def _close(self, call: int) -> None:
        rounds = [r for rs in self._open.pop(call, {}).values() for r in rs]
        recs = request_records(rounds) if rounds else []
        if recs and not self._pending:
            self._oldest = time.monotonic()
        self._pending.extend(recs)
        self.counts["records"] += len(recs)

    def _push(self) -> None:
        if self._inflight:
            _, self._inflight = ray.wait(self._inflight, num_returns=len(self._inflight), timeout=0)
        if len(self._inflight) >= MAX_INFLIGHT_PUSHES:
            self.counts["dropped_in_replica"] += len(self._pending)
        else:
            self._inflight.append(self.buffer.put.remote(self._pending))
            self.counts["pushes"] += 1
        self._pending = []


# ====================================================================== versions
@dataclass
class VersionTrial:
    """Acceptance per draft version over sequence-rounds, and the rollback rule (module docstring)."""

    window: int
    margin: float = 0.0
    z: float = 0.0

    def __post_init__(self):
        self.version = 0
        self.recent: deque = deque(maxlen=self.window)  # (accepted, rejected) of the current version
        self.previous: tuple[int, tuple[int, int], dict] | None = None  # (version, its window's counts, weights)

    @staticmethod
    def counts(outcomes) -> tuple[int, int]:
        return sum(a for a, _ in outcomes), sum(r for _, r in outcomes)

    @classmethod
    def alpha(cls, outcomes) -> float:
        return per_token_acceptance(*cls.counts(outcomes))

    @property
    def baseline_alpha(self) -> float:
        return per_token_acceptance(*self.previous[1]) if self.previous else 0.0

    def observe(self, version: int, outcomes: list[tuple[int, int]]) -> None:
        if version == self.version:
            self.recent.extend(outcomes)

    def start(self, version: int, previous_weights: dict) -> None:
        """v replaces u: u's counts over its recent window become the baseline (no baseline: no trial)."""
        self.previous = (self.version, self.counts(self.recent), previous_weights) if self.recent else None
        self.version = version
        self.recent.clear()

    @property
    def on_trial(self) -> bool:
        return self.previous is not None

    @property
    def complete(self) -> bool:
        """A trial runs and the new version has served its window."""
        return self.previous is not None and len(self.recent) >= self.window

    def verdict(self) -> str | None:
        """The live judge: "rollback", "keep", or None while the trial needs more sequence-rounds (or none runs)."""
        if not self.complete:
            return None
        return "rollback" if worse_beyond_noise(self.counts(self.recent), self.previous[1], self.margin,
                                                self.z) else "keep"


def worse_beyond_noise(new: tuple[int, int], old: tuple[int, int], margin: float, z: float) -> bool:
    """α̂_new < α̂_old − margin − z·√(ᾱ(1 − ᾱ)(1/n_new + 1/n_old)), counts given as (accepted, rejected)."""
    n_new, n_old = sum(new), sum(old)
    a_new, a_old = per_token_acceptance(*new), per_token_acceptance(*old)
    pooled = per_token_acceptance(new[0] + old[0], new[1] + old[1])
    se = (pooled * (1 - pooled) * (1 / max(n_new, 1) + 1 / max(n_old, 1))) ** 0.5
    return a_new < a_old - margin - z * se


# ====================================================================== the paired judge
JUDGE_TOP_K = 8  # entries of the target's processed p kept per served position


class ServedTraffic:
    """The last `capacity` sequence-rounds served, whatever the draft version, as the paired judge reads them:
    per sequence-round its request, the positions it committed (start … start + m − 1) and the target's processed
    distribution p there (the request's sampling params; its top-K entries, one-hot at greedy); per request its
    latest tokens (context + committed). Lossless decoding makes these sequences draws from the target whichever
    draft proposed, so they are fair ground for judging any two versions."""

    def __init__(self, capacity: int, top_k: int = JUDGE_TOP_K):
        self.rounds: deque = deque(maxlen=capacity)  # (request, start, p_ids (m, K), p_probs (m, K), params)
        self.tokens: dict[str, np.ndarray] = {}
        self.top_k = top_k

    def observe(self, view) -> None:
        live = [s for s, a in enumerate(view.live) if a and view.committed and view.committed[s]]
        if not live:
            return
        p = logits_to_probs(view.target_logits[live], view.params)  # (b, γ + 1, V)
        top_p, top_ids = p.topk(min(self.top_k, p.shape[-1]), -1)
        top_p, top_ids = top_p.cpu().numpy(), top_ids.cpu().numpy().astype(np.int32)
        ids, mask = view.ids.cpu().numpy(), view.mask.cpu().numpy().astype(bool)
        for j, s in enumerate(live):
            context, kept = ids[s][mask[s]].astype(np.int32), np.asarray(view.committed[s], np.int32)
            key, m = f"{view.call}.{s}", len(kept)
            self.tokens[key] = np.concatenate([context, kept])
            self.rounds.append((key, len(context), top_ids[j, :m], top_p[j, :m], view.params))
        if len(self.tokens) > 2 * self.rounds.maxlen:  # requests whose rounds all left the window
            keep = {r[0] for r in self.rounds}
            self.tokens = {k: v for k, v in self.tokens.items() if k in keep}

    def snapshot(self) -> list[tuple]:
        """Per request in the window: (tokens, positions (N,), p_ids (N, K), p_probs (N, K), params)."""
        by: dict[str, list] = {}
        for key, start, ids, probs, params in self.rounds:
            by.setdefault(key, []).append((start, ids, probs, params))
        out = []
        for key, rs in by.items():
            pos = np.concatenate([start + np.arange(len(ids)) for start, ids, _, _ in rs])
            out.append((self.tokens[key], pos, np.concatenate([r[1] for r in rs]),
                        np.concatenate([r[2] for r in rs]), rs[0][3]))
        return out


@torch.inference_mode()
def teacher_forced_acceptance(model, vocab_ids: torch.Tensor | None, tokens: np.ndarray, positions: np.ndarray,
                              p_ids: np.ndarray, p_probs: np.ndarray, params) -> np.ndarray:
    """a_t = Σ_{j ∈ top-K(p_t)} min(p_t(j), q_t(j)) at each served position t: the probability that the draft's
    token at t is accepted given the target's tokens before it (1 − TVD(p_t, q_t) when p_t's mass lies in its
    top-K; 1{argmax q_t = argmax p_t} at greedy). q_t = the draft's distribution given tokens[:t], on its
    vocabulary rows, after the request's sampling params — as the engine drafts."""
    dev = next(model.parameters()).device
    x = torch.as_tensor(tokens[: int(positions.max())], dtype=torch.long, device=dev)[None]
    h = model.get_decoder()(input_ids=x).last_hidden_state[0, torch.as_tensor(positions - 1, device=dev)]
    logits = model.get_output_embeddings()(h).float()  # (N, V): the head at the judged positions only
    if vocab_ids is not None:  # logits (N, V) → q on the draft's rows, 0 elsewhere
        vocab_ids = vocab_ids.to(dev)
        sub = logits_to_probs(logits[:, vocab_ids], params)
        q = sub.new_zeros(logits.shape).index_copy_(-1, vocab_ids, sub)
    else:
        q = logits_to_probs(logits, params)
    q_at = q.gather(-1, torch.as_tensor(p_ids, dtype=torch.long, device=dev)).cpu()  # (N, K)
    return torch.minimum(torch.as_tensor(p_probs), q_at).sum(-1).numpy()


def paired_worse(d: np.ndarray, margin: float, z: float) -> bool:
    """mean(d) < −margin − z·sd(d)/√n, d_t = a_new(t) − a_old(t) on the same n served positions (a one-sided
    paired z-test; the traffic both versions are judged on is the same, so only the drafts differ)."""
    n = len(d)
    if n == 0:
        return False
    se = float(np.std(d, ddof=1)) / n ** 0.5 if n > 1 else 0.0
    return float(np.mean(d)) < -margin - z * se


class OnlineDraft:
    """A replica's online state: the engine observer (capture + per-version acceptance), draft installs on the
    engine thread, rollback, and the thread that polls the weight store and pushes stale records."""

    def __init__(self, decoder, s: OnlineSettings, executor, replica_id: str = ""):
        self.decoder, self.s, self.executor = decoder, s, executor
        self.capture = (RoundCapture(get_buffer(s), s.top_k, s.push_every, s.push_interval_s)
                        if s.capture else None)
        self.trial = VersionTrial(s.rollback_window, s.rollback_margin, s.rollback_z)
        self.traffic = ServedTraffic(2 * s.rollback_window) if s.rollback_judge == "paired" else None
        self._judge_model = None  # a copy of the draft the paired judge loads both versions into
        self._candidate: dict | None = None  # the weights of the version on trial
        self.known = 0  # newest version seen in the store (installed, rejected or failed)
        self.rejected: set[int] = set()
        self.events: deque = deque(maxlen=256)  # install / keep / rollback / error, newest last
        self.rounds_per_version: dict[int, int] = {}
        self._lock = threading.Lock()
        decoder.observer = self.observe
        decoder.call_done = self.call_done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="online-draft", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ engine thread
    def observe(self, view) -> None:
        with self._lock:
            self.trial.observe(view.draft_version, view.outcomes)
            self.rounds_per_version[view.draft_version] = (self.rounds_per_version.get(view.draft_version, 0)
                                                           + len(view.outcomes))
            if self.traffic is not None:
                try:
                    self.traffic.observe(view)
                except Exception:  # as for capture: the round is served, the judge sees less traffic
                    logger.exception("online judge: recording a served round failed")
        if self.capture is not None:
            try:
                self.capture.observe(view)
            except Exception:  # a capture bug must not fail a request
                self.capture.counts["errors"] += 1
                logger.exception("online capture failed; the round is served, not recorded")

    def call_done(self, call: int) -> None:
        if self.capture is not None:
            try:
                self.capture.call_done(call)
            except Exception:  # as in observe: the request is served, its rounds not recorded
                self.capture.counts["errors"] += 1
                logger.exception("online capture failed to close decoding call %d", call)

    def _snapshot(self) -> dict:
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.decoder.draft.state_dict().items()}

    def _load(self, version: int, weights: dict) -> None:

        check_and_load_weights(self.decoder.draft, weights)  # checked whole first: a bad version changes nothing
        self.decoder.refresh_draft(version)
        if self.decoder.policy is not None:  # goodput γ: the old draft's α̂ says nothing of this one (γ = 0 would
            self.decoder.policy.estimate = AcceptanceEstimate()  # leave it unjudged but for probes): the prior

    def install(self, version: int, weights: dict) -> dict:
        """Install `version` (engine thread: between rounds) and start its trial against the current one."""
        check_weights(self.decoder.draft, weights)
        if self.trial.on_trial:
            raise ValueError(f"draft version {version}: version {self.trial.version} is still on trial")
        if version <= self.decoder.draft_version or version in self.rejected:
            raise ValueError(f"draft version {version}: versions must increase (serving "
                             f"{self.decoder.draft_version}) and not be a rolled-back one")
        previous = self._snapshot()
        if self.traffic is not None and self._judge_model is None:
            self._judge_model = copy.deepcopy(self.decoder.draft).float().eval()
        self._load(version, weights)
        with self._lock:
            self.trial.start(version, previous)
            self._candidate = weights
            self.known = max(self.known, version)
        event = {"event": "install", "version": version, "time": time.time()}
        self.events.append(event)
        logger.info("draft version %d installed", version)
        return event

    def _paired(self, old: dict, new: dict) -> dict:
        """The paired judge (module docstring), off the engine thread: both versions teacher-forced on the served
        traffic of the last 2W sequence-rounds; verdict "rollback" when the new one is worse beyond noise."""
        with self._lock:
            requests = self.traffic.snapshot()
        ids = self.decoder.draft_vocab_ids
        a = {}
        for name, weights in (("old", old), ("new", new)):
            check_and_load_weights(self._judge_model, weights)
            a[name] = np.concatenate([teacher_forced_acceptance(self._judge_model, ids, *r) for r in requests]
                                     ) if requests else np.zeros(0)
        d = a["new"] - a["old"]
        worse = paired_worse(d, self.s.rollback_margin, self.s.rollback_z)
        return {"verdict": "rollback" if worse else "keep", "alpha": float(a["new"].mean()) if len(d) else 0.0,
                "baseline_alpha": float(a["old"].mean()) if len(d) else 0.0, "positions": len(d),
                "requests": len(requests)}

    def _judge(self) -> None:
        """Poll thread: once the version on trial served its window, judge it and apply the verdict."""
        with self._lock:
            complete, prev, v = self.trial.complete, self.trial.previous, self.trial.version
            live = {"served_alpha": self.trial.alpha(self.trial.recent), "served_baseline_alpha":
                    self.trial.baseline_alpha, "live_verdict": self.trial.verdict()}
        if not complete:
            return
        if self.traffic is not None:
            result = {"judge": "paired", **self._paired(prev[2], self._candidate), **live}
        else:
            result = {"judge": "live", "verdict": live["live_verdict"], "alpha": live["served_alpha"],
                      "baseline_alpha": live["served_baseline_alpha"]}
        self.executor.submit(self._apply, v, prev, result).result()

    def _apply(self, v: int, prev: tuple, result: dict) -> None:
        """Engine thread: keep v, or reinstall the previous version u (between rounds)."""
        verdict = result.pop("verdict")
        alpha_new, base = result["alpha"], result["baseline_alpha"]
        if verdict == "rollback":
            u, _, weights = prev
            self._load(u, weights)
            with self._lock:
                self.rejected.add(v)
                self.trial.version, self.trial.previous = u, None
                self.trial.recent.clear()
            logger.warning("draft version %d rolled back to %d: α̂ %.3f < %.3f", v, u, alpha_new, base)
        else:
            with self._lock:
                self.trial.previous = None
        with self._lock:
            self._candidate = None
        self.events.append({"event": verdict, "version": v, "previous": prev[0], **result, "time": time.time()})

    # ------------------------------------------------------------------ poll thread
    def _loop(self) -> None:
        store = None
        while not self._stop.wait(min(self.s.poll_interval_s, self.s.push_interval_s)):
            try:
                if self.capture is not None:
                    self.capture.flush(stale_only=True)
                if self.trial.on_trial:
                    self._judge()
                    continue
                if self.s.weight_store is None:
                    continue
                if store is None:
                    try:
                        store = ray.get_actor(self.s.weight_store, namespace=self.s.namespace)
                    except ValueError:
                        continue  # the learner has not started yet
                got = ray.get(store.latest.remote(self.known))
                if got is None:
                    continue
                version, (ref,) = got
                self.known = version
                self.executor.submit(self.install, version, ray.get(ref)).result()
            except Exception as e:
                if isinstance(e, ray.exceptions.RayActorError):
                    store = None  # the store's owner restarted: look the name up again
                self.events.append({"event": "error", "error": f"{type(e).__name__}: {e}", "time": time.time()})
                logger.exception("online draft: poll or install failed")

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        with self._lock:
            out = {"draft_version": self.decoder.draft_version, "on_trial": self.trial.on_trial,
                   "rejected_versions": sorted(self.rejected), "events": list(self.events),
                   "rounds_per_version": dict(self.rounds_per_version)}
        if self.capture is not None:
            out["capture"] = dict(self.capture.counts)
        return out
