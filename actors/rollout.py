"""Rollout actors: the draft samples (or the distillation set is replayed), the target scores,
and `RolloutBatch` records flow to the learner through a bounded queue.

Data flow (stage 3, see DESIGN.md):

    RolloutActor ×N ── score(seqs, starts, k) ──► TargetActor ×M (round-robin, retried)
         │ RolloutBatch
         ▼
    ray.util.queue.Queue(maxsize=rollout.queue_size)   ── put blocks when full (back-pressure)
         │
         ▼
    learner ranks (each rank pulls its own batches; see learner/distill.py)

Per sequence (prompt x, target answer y from the distillation set) the actor flips a coin: with
probability λ = rollout.on_policy_fraction the row is on-policy, sampled from its current draft copy
q at rollout.temperature (stopping at EOS), else it replays (x, y). On-policy rows, by
rollout.on_policy_mode:

- continuation: row (x, ŷ), ŷ ~ q(· | x), up to rollout.max_new_tokens.
- branch (`branch_contexts`): the states the draft meets when serving, prefixes of target answers.
  Per batch L ~ U{a..b} (rollout.branch_tokens, about γ..2γ); per row a cut
  j ~ U{0..min(|y| − 1, max_len − 1 − |x| − L)} (max_len = target.max_model_len, capped by the
  draft's positions), context c = x + y[:j] and row (c, ŷ), ŷ ~ q(· | c), L tokens. The row's
  "prompt" is c, so only the branch is scored and trained on; a row where no cut fits replays.

An on-policy row goes to a TargetActor, which returns the target's top-k (or full) next-token
distribution at every response position (the positions after the row's prompt); a replayed response
carries the distribution vLLM recorded while generating it (`cached_score`), so only rows without one
(older sets, full-vocabulary runs) are scored again.

Pipelining: `RolloutWorker.run` samples batch i+1 (and sends its rows to the target) while the
target scores batch i (`TargetPool.submit` returns at once, `collect` waits and retries as `score`
does), so draft and target work at the same time. A batch keeps the `policy_version` that sampled
it; holding one sampled batch in flight adds at most one batch to its lag when the queue is full.
Batch timing: sample_s, score_s (submit → scores in hand), score_wait_s (the part the actor waited),
overlap_s = score_s − score_wait_s (scoring hidden behind other work), total_s = sample_s + score_s.

Alignment: position t of a batch row holds token `input_ids[t]`, and `target_*[t]` is the target's
distribution *predicting* that token (computed from tokens < t). `loss_mask[t]` is True exactly at
response positions (t ≥ prompt length, t < sequence length); position 0 is never a response
position, so the draft's prediction for position t is its output at t − 1.

Weight-sync protocol (the learner's rank 0 is the only sender; one `WeightStore` actor per run):

1. The learner publishes its weights as version v: `store.publish(v, {name: float32 ndarray})`.
   Versions start at the learner's initial version (0 for a fresh run, the checkpointed version on
   resume) and increase by one every `learner.sync_every` optimizer steps; the store rejects a
   version that does not increase. When Ray Train restarts the learner inside a run (a worker
   died), the learner goes back to its last checkpoint but continues at the store's version + 1,
   so versions keep increasing and a batch sampled with the lost steps' weights is at least one
   version old to the restarted learner (dropped or not by `rollout.max_policy_lag` as usual).
   The store `ray.put`s the dict itself, so it owns the object: published weights outlive the
   learner process that sent them. Only the newest version is kept.
2. A RolloutActor polls `store.latest(known_version)` between batches (before each batch), and
   blocks before its first batch until some version exists: it never produces data with weights
   the learner did not publish. On receipt it checks that the key set equals its own state dict,
   that every shape matches and that every array is floating point, then casts to its own dtype
   (fp32 on CPU, bf16 on GPU) and copies in place. A mismatch raises (the actor is then restarted
   and fails the same way: a config error, not a transient one).
3. Each batch records the version of the weights that sampled it (`policy_version`). The learner
   drops batches holding on-policy rows whose version is older than its own minus
   `rollout.max_policy_lag`, and counts them (replayed target responses do not depend on the
   policy, so an all-replay batch is never stale).

Fault tolerance: RolloutActors are created with `max_restarts` and `max_task_retries`, so a killed
actor is restarted by Ray and its `run` loop is resubmitted; the restarted actor registers again
with the store, which counts restarts. TargetActors are restartable too (actors/target.py): a call
in flight on a killed engine is retried once Ray has restarted it; an engine out of restarts makes
`score` fail over to the next engine. The learner's restarts are Ray Train's (learner/distill.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from draftalign.storage import ensure_local
from draftalign.weights import check_and_load_weights

log = logging.getLogger(__name__)

ROLLOUT_MAX_RESTARTS = 4  # a crash loop (e.g. a bad draft path) must end, not spin forever
SCORE_RETRY_S = 120.0  # give up scoring when no engine answers for this long
_ENGINE_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@dataclass
class RolloutBatch:
    """One unit of work for the learner; numpy arrays so Ray ships them zero-copy.

    B = rows, T = longest row (prompt + response), k = target.top_k_logprobs (or V for the full
    vocabulary, with `target_ids` None).
    """

    input_ids: np.ndarray  # (B, T) int64, right-padded with pad_id
    attention_mask: np.ndarray  # (B, T) bool
    loss_mask: np.ndarray  # (B, T) bool, True at response positions
    target_logprobs: np.ndarray  # (B, T, k) float32 top-k log-probs, or (B, T, V) full
    target_ids: np.ndarray | None  # (B, T, k) int64, None when target_logprobs is full
    draft_logprobs: np.ndarray  # (B, T) float32, behaviour log q(x_t) of sampled tokens; 0 on replayed rows
    on_policy: np.ndarray  # (B,) bool
    policy_version: int
    actor_id: int
    n_tokens: int  # response tokens = loss_mask.sum()
    prompt_ids: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)  # sample_s, score_s, total_s, created_at
    # (B, T) int64: the draft's sampled token at each position where it differs from input_ids (target-assisted
    # rows: at a rejection the sequence holds the target's token, the draft's proposal is the label); None = input_ids
    sampled_ids: np.ndarray | None = None

    def __post_init__(self):
        B, T = self.input_ids.shape
        assert self.loss_mask.shape == (B, T) and self.attention_mask.shape == (B, T)
        assert self.target_logprobs.shape[:2] == (B, T), self.target_logprobs.shape
        assert self.target_ids is None or self.target_ids.shape == self.target_logprobs.shape
        assert self.draft_logprobs.shape == (B, T) and self.on_policy.shape == (B,)
        assert self.sampled_ids is None or self.sampled_ids.shape == (B, T)
        assert not self.loss_mask[:, 0].any(), "position 0 has no prediction to train"

    @property
    def full_vocab(self) -> bool:
        return self.target_ids is None


def build_batch(prompts: list[list[int]], responses: list[list[int]], scores: list[dict], *,
                pad_id: int, on_policy: list[bool] | None = None,
                draft_logprobs: list[list[float]] | None = None, policy_version: int = 0,
                actor_id: int = -1, prompt_ids: list[str] | None = None,
                timing: dict | None = None, loss_masks: list | None = None,
                sampled: list | None = None) -> RolloutBatch:
    """Pad rows and place each row's target scores at its response positions.

    `scores[i]` is a TargetEngine.score result for prompts[i] + responses[i] with start =
    len(prompts[i]): {"ids": (R, k) or None, "logprobs": (R, k) or (R, V)}, R = len(responses[i]).
    `loss_masks[i]` (R,) bool, when given and not None, keeps the loss at those response positions only
    (a served request's positions no round scored: `actors.traffic.request_rows`); default all R.
    `sampled[i]` (R,), when given and not None: the draft's sampled token at each response position, where it
    differs from the response (`RolloutBatch.sampled_ids`; target-assisted rows, `actors.traffic.drafted_rows`).
    """
    B = len(prompts)
    assert B == len(responses) == len(scores) and B > 0
    lens = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    T = max(lens)
    full = scores[0]["ids"] is None
    # Engines may list different counts per row; keeping the first `width` columns everywhere is
    # exact bucketing still: a dropped entry's mass simply joins the tail bucket.
    width = min(np.asarray(s["logprobs"]).shape[1] for s in scores)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attn = np.zeros((B, T), dtype=bool)
    loss_mask = np.zeros((B, T), dtype=bool)
    t_lp = np.zeros((B, T, width), dtype=np.float32)
    t_ids = None if full else np.zeros((B, T, width), dtype=np.int64)
    d_lp = np.zeros((B, T), dtype=np.float32)
    labels = None if not sampled or all(x is None for x in sampled) else input_ids.copy()
    for i, (p, r, s) in enumerate(zip(prompts, responses, scores, strict=True)):
        assert len(p) > 0 and len(r) > 0, "rows need a non-empty prompt and response"
        P, L = len(p), lens[i]
        input_ids[i, :L] = p + r
        attn[i, :L] = True
        loss_mask[i, P:L] = True if loss_masks is None or loss_masks[i] is None else np.asarray(loss_masks[i], bool)
        lp = np.asarray(s["logprobs"], dtype=np.float32)
        assert lp.shape[0] == len(r), f"row {i}: {lp.shape[0]} scored positions for {len(r)} response tokens"
        t_lp[i, P:L] = lp[:, :width]
        if not full:
            t_ids[i, P:L] = np.asarray(s["ids"], dtype=np.int64)[:, :width]
        if draft_logprobs is not None and draft_logprobs[i] is not None:
            d_lp[i, P:L] = draft_logprobs[i]
        if labels is not None:
            labels[i, :L] = p + r
            if sampled[i] is not None:
                labels[i, P:L] = sampled[i]
    flags = np.asarray(on_policy if on_policy is not None else [False] * B, dtype=bool)
    return RolloutBatch(input_ids=input_ids, attention_mask=attn, loss_mask=loss_mask,
                        target_logprobs=t_lp, target_ids=t_ids, draft_logprobs=d_lp, on_policy=flags,
                        policy_version=policy_version, actor_id=actor_id, n_tokens=int(loss_mask.sum()),
                        prompt_ids=list(prompt_ids or []), timing=dict(timing or {}), sampled_ids=labels)


def cached_score(row: dict, k: int) -> dict | None:
    """A replayed row's target scores from the distillation set (recorded by vLLM while it
    generated the answer), in `TargetEngine.score`'s format; None when not cached for this k."""
    ids, lps = row.get("target_ids"), row.get("target_logprobs")
    if k == -1 or ids is None or lps is None or ids.shape[1] < k:
        return None
    return {"ids": ids[:, :k], "logprobs": lps[:, :k]}


def score_rows(pool: "TargetPool", prompts: list[list[int]], responses: list[list[int]],
               cached: list[dict | None], k: int) -> tuple[list[dict], int]:
    """Target scores for every row: cached ones as they are, the rest from the pool in one call.
    Returns (scores, number of rows scored by the pool)."""
    todo = [i for i, c in enumerate(cached) if c is None]
    scores = list(cached)
    if todo:
        fresh = pool.score([prompts[i] + responses[i] for i in todo], [len(prompts[i]) for i in todo], k)
        for i, sc in zip(todo, fresh, strict=True):
            scores[i] = sc
    return scores, len(todo)


@dataclass
class ScoreCall:
    """One `TargetEngine.score` request in flight (`TargetPool.submit` → `TargetPool.collect`)."""

    seqs: list[list[int]]
    starts: list[int]
    k: int
    deadline: float  # time.monotonic() after which collect gives up
    prefix_cache: bool = False  # TargetEngine.score's: read the engine's prefix cache
    ref: object = None  # the engine call's ObjectRef; None = (re)send at collect
    tries: int = 0  # engine failures so far
    engine: int = -1  # the engine the call was last sent to


class TargetPool:
    """Round-robin over TargetActor handles; a dead or restarting engine is skipped. Empty when no
    row needs scoring (replay-only rollouts of a set that carries the target's top-k).

    `submit` sends a request and returns at once; `collect` waits for it, re-sending it to the next
    engine on an engine error, pausing 1 s after every full pass of failures (Ray restarts engines)
    and giving up SCORE_RETRY_S after submit. `score` = collect(submit(…)).
    `scored_tokens[i]`: the tokens (whole sequences: the engine prefills them) engine i answered for this pool.
    A `prefix_cache` call always goes to the pool's home engine (`start`, the one holding its prefixes), and the
    home moves to the next engine only when that one fails.
    """

    def __init__(self, engines: list, start: int = 0):
        self.engines = list(engines)
        self._next = self._home = start % max(1, len(self.engines))
        self.failures = 0
        self.scored_tokens: dict[int, int] = defaultdict(int)

    def score(self, seqs: list[list[int]], starts: list[int], k: int, prefix_cache: bool = False) -> list[dict]:
        return self.collect(self.submit(seqs, starts, k, prefix_cache))

    def submit(self, seqs: list[list[int]], starts: list[int], k: int, prefix_cache: bool = False) -> ScoreCall:
        if not self.engines:
            raise RuntimeError("a row needs the target's scores but no TargetActor was started")
        call = ScoreCall(seqs, starts, k, deadline=time.monotonic() + SCORE_RETRY_S, prefix_cache=prefix_cache)
        try:
            call.ref = self._send(call)
        except _ENGINE_ERRORS as e:
            self._failed(call, e)  # collect sends it again
        return call

    def collect(self, call: ScoreCall, stop: threading.Event | None = None) -> list[dict] | None:
        """The call's scores; None as soon as `stop` is set (the request is then abandoned)."""
        while True:
            try:
                if call.ref is None:
                    call.ref = self._send(call)
                if stop is not None:
                    while not ray.wait([call.ref], timeout=1.0)[0]:
                        if stop.is_set():
                            return None
                out = ray.get(call.ref)
                self.scored_tokens[call.engine] += sum(len(s) for s in call.seqs)
                return out
            except _ENGINE_ERRORS as e:
                self._failed(call, e)
            if call.tries % len(self.engines) == 0:
                if time.monotonic() > call.deadline:
                    raise RuntimeError(f"no TargetActor answered for {SCORE_RETRY_S:.0f} s")
                time.sleep(1.0)  # every engine is down: give Ray time to restart one

    def _send(self, call: ScoreCall):
        if call.prefix_cache:  # stay with the engine that holds the prefix
            call.engine = self._home
            return self.engines[self._home].score.remote(call.seqs, call.starts, call.k, True)
        call.engine, engine = self._next, self.engines[self._next]
        self._next = (self._next + 1) % len(self.engines)
        return engine.score.remote(call.seqs, call.starts, call.k)

    def _failed(self, call: ScoreCall, e: Exception) -> None:
        self.failures += 1
        call.tries += 1
        call.ref = None
        if call.prefix_cache:  # move on from the failed engine
            self._home = (call.engine + 1) % len(self.engines)
        log.warning("target engine failed (%s); trying the next one", type(e).__name__)


@ray.remote(num_cpus=0)
class WeightStore:
    """Versioned draft weights from the learner, plus run bookkeeping: rollout actor (re)starts and
    tokens per actor, learner (re)starts, and what the learner reports about itself."""

    def __init__(self):
        self._version = -1
        self._ref = None
        self._incarnations: dict[int, int] = defaultdict(int)
        self._actor_tokens: dict[int, int] = defaultdict(int)
        self._actor_batches: dict[int, int] = defaultdict(int)
        self._actor_first: dict[int, float] = {}  # first registration (model load + wait count)
        self._actor_last: dict[int, float] = {}  # last report
        self._tokens = 0
        self._batches = 0
        self._learner_starts = 0
        self._learner_info: dict = {}
        self._error: str | None = None
        self._engine_tokens: dict[int, int] = defaultdict(int)  # tokens each target engine scored for rollouts
        self._actor_times: dict[int, dict] = defaultdict(lambda: defaultdict(float))  # draft_s, target_s, put_wait_s

    def publish(self, version: int, weights: dict) -> int:
        """Store `weights` ({name: ndarray}) as `version`; returns the version."""
        if version <= self._version:
            raise ValueError(f"weight version {version} does not increase (have {self._version})")
        self._ref = ray.put(weights)  # owned by this actor: outlives the sending learner
        self._version = version
        return version

    def version(self) -> int:
        return self._version

    def latest(self, known_version: int):
        """(version, [ref]) when newer than known_version, else None. The ref is wrapped in a
        list so Ray hands the caller the reference instead of resolving it here."""
        if self._version > known_version:
            return self._version, [self._ref]
        return None

    def register(self, actor_id: int) -> int:
        """Called from RolloutActor.__init__; returns how many times this actor started before."""
        n = self._incarnations[actor_id]
        self._incarnations[actor_id] += 1
        self._actor_first.setdefault(actor_id, time.time())
        return n

    def report(self, actor_id: int, n_tokens: int, scored: dict | None = None, times: dict | None = None) -> None:
        """A rollout actor queued a batch of n_tokens trained positions; `scored` {engine: tokens} the target
        tokens scored for it since the last report, `times` {draft_s, target_s, put_wait_s} its time split since."""
        self._tokens += n_tokens
        self._batches += 1
        self._actor_tokens[actor_id] += n_tokens
        self._actor_batches[actor_id] += 1
        self._actor_last[actor_id] = time.time()
        for e, n in (scored or {}).items():
            self._engine_tokens[int(e)] += int(n)
        for k, v in (times or {}).items():
            self._actor_times[actor_id][k] += float(v)

    def learner_started(self, info: dict) -> int:
        """Called by learner rank 0 at every (re)start of the worker group; returns the number of
        earlier starts in this run (> 0 = Ray Train restarted the learner after a failure)."""
        n = self._learner_starts
        self._learner_starts += 1
        self._learner_info = dict(info)
        return n

    def set_error(self, message: str) -> None:
        self._error = message

    def stats(self) -> dict:
        per_actor = {i: {"tokens": self._actor_tokens[i], "batches": self._actor_batches[i],
                         "starts": self._incarnations[i],
                         "tokens_per_s": self._actor_tokens[i] / max(
                             self._actor_last.get(i, 0.0) - self._actor_first.get(i, 0.0), 1e-9)
                         if i in self._actor_last else 0.0}
                     for i in sorted(self._incarnations)}
        return {"version": self._version, "rollout_tokens": self._tokens, "rollout_batches": self._batches,
                "actor_starts": sum(self._incarnations.values()),
                "restarts": sum(max(0, n - 1) for n in self._incarnations.values()),
                "actor_tokens": {i: self._actor_tokens[i] for i in sorted(self._incarnations)},
                "per_actor": per_actor, "engine_tokens": dict(self._engine_tokens),
                "actor_times": {i: dict(t) for i, t in self._actor_times.items()},
                "learner_starts": self._learner_starts,
                "learner_restarts": max(0, self._learner_starts - 1), "learner_info": self._learner_info,
                "error": self._error}


class _DraftVocab:
    """HF logits processor: −inf outside the draft's vocabulary (the engine's q is 0 there)."""

    def __init__(self, outside: torch.Tensor):
        self.outside = outside  # (V,) bool

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.outside.to(scores.device), float("-inf"))


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids, attention mask), each (B, max len) int64, left-padded with `pad_id`: every
    sequence's last token sits in the last column, where a batched decode appends."""
    P = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, P - len(x):] = torch.tensor(x)
        attn[i, P - len(x):] = 1
    return ids, attn


def sample_continuations(model, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                         eos_id: int, pad_id: int, generator_seed: int | None = None,
                         draft_vocab: list[int] | None = None):
    """Sample from the draft, batched with a KV cache (HF `generate`, left padding), on its vocabulary
    (`draft_vocab`, None = full) as the engine decodes it.

    Returns (responses, logprobs): each response ends at its first EOS (kept) or after
    max_new_tokens; logprobs[i][j] = log q(response[i][j]) under the sampling distribution
    (softmax(logits / temperature) on the vocabulary; the argmax's log-prob for temperature 0).
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, pad_id)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    outside = None
    if draft_vocab is not None:
        outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
        outside[torch.tensor(draft_vocab)] = False
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=eos_id,
                             logits_processor=LogitsProcessorList([_DraftVocab(outside)] if outside is not None
                                                                  else []))
    new = out.sequences[:, ids.shape[1]:].cpu()  # (B, S)
    logits = torch.stack(out.logits, 1).float().cpu()  # (B, S, V) raw
    if outside is not None:
        logits = logits.masked_fill(outside, float("-inf"))
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, S)
    responses, logprobs = [], []
    for i in range(len(prompts)):
        row = new[i].tolist()
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        responses.append(row[:n])
        logprobs.append(lp[i, :n].tolist())
    return responses, logprobs


def branch_contexts(prompts: list[list[int]], responses: list[list[int]], length: int, max_len: int,
                    rng: random.Random) -> list[list[int] | None]:
    """Where the draft branches off the target's answers: per row (prompt x, answer y) a cut
    j ~ U{0, …, j_max}, j_max = min(|y| − 1, max_len − 1 − |x| − L), and the context c = x + y[:j];
    None when j_max < 0 (no branch of L = `length` tokens fits).

    |c| + L < max_len leaves the target room to score c + branch (vLLM needs one position to
    generate); j < |y| keeps y's final token (EOS) out of c.
    """
    out: list[list[int] | None] = []
    for x, y in zip(prompts, responses, strict=True):
        j_max = min(len(y) - 1, max_len - 1 - len(x) - length)
        out.append(list(x) + list(y[:rng.randint(0, j_max)]) if j_max >= 0 else None)
    return out


@dataclass
class _Sampled:
    """A batch between sampling and its target scores (RolloutWorker.sample → submit → finish)."""

    picks: list[dict]
    prompts: list[list[int]]  # the row's context: x (replay, continuation) or x + y[:j] (branch)
    responses: list[list[int]]  # the positions the target scores and the learner trains on
    flags: list[bool]  # on-policy
    draft_lp: list[list[float] | None]
    cached: list[dict | None]  # replayed rows' recorded target scores
    version: int  # policy version of the weights that sampled the batch
    sample_s: float
    todo: list[int] = field(default_factory=list)  # rows sent to the target
    call: ScoreCall | None = None
    submitted_at: float = 0.0
    loss_masks: list | None = None  # per row, `build_batch`'s loss_masks (target-assisted rows)
    sampled: list | None = None  # per row, `build_batch`'s sampled labels (target-assisted rows)
    target_s: float = 0.0  # of sample_s, the time spent waiting on the target (target-assisted rounds)


class RolloutWorker:
    """The rollout logic without Ray's actor wrapper (directly testable). target_assisted rollouts:
    `actors.assisted.AssistedRolloutWorker`, a subclass."""

    MODES = ("continuation", "branch")

    def __init__(self, actor_id: int, draft_path: str, rows: list[dict], engines: list, queue, store, *,
                 on_policy_fraction: float, temperature: float, max_new_tokens: int, batch_size: int,
                 top_k: int, seed: int = 0, device: str = "cpu", draft_vocab: list[int] | None = None,
                 on_policy_mode: str = "continuation", branch_tokens: tuple[int, int] = (3, 6),
                 max_model_len: int | None = None):
        from draftalign.models import load_causal_lm, load_tokenizer

        if not rows:
            raise ValueError("RolloutActor needs a non-empty distillation set")
        if on_policy_mode not in self.MODES:
            raise ValueError(f"{type(self).__name__}: on_policy_mode must be one of {self.MODES}, "
                             f"got {on_policy_mode!r}")
        if not 1 <= branch_tokens[0] <= branch_tokens[1]:
            raise ValueError(f"branch_tokens must be (min, max) with 1 ≤ min ≤ max, got {branch_tokens}")
        self.actor_id, self.rows, self.queue, self.store = actor_id, rows, queue, store
        self.lam, self.temperature, self.max_new_tokens = on_policy_fraction, temperature, max_new_tokens
        self.mode, self.branch_tokens = on_policy_mode, (int(branch_tokens[0]), int(branch_tokens[1]))
        self.batch_size, self.top_k, self.draft_vocab = batch_size, top_k, draft_vocab
        self.incarnation = ray.get(store.register.remote(actor_id)) if store is not None else 0
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        draft_path = str(ensure_local(draft_path))  # a URI run's draft, on this actor's node
        self.model = load_causal_lm(draft_path, dtype, device)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.max_len = min(max_model_len or positions, positions)  # longest row the target and draft take
        tok = load_tokenizer(draft_path)
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.version = -1
        self.pool = TargetPool(engines, start=actor_id)
        # a restarted actor must not replay its predecessor's random stream
        self.seed = seed + 7919 * actor_id + 104729 * self.incarnation
        self.rng = random.Random(self.seed)
        torch.manual_seed(self.seed)  # the draft's sampling stream
        self._stop = threading.Event()
        self.counters = {"batches": 0, "tokens": 0, "put_wait_s": 0.0, "weight_loads": 0,
                         "scored_rows": 0, "cached_rows": 0, "sample_s": 0.0, "score_s": 0.0,
                         "score_wait_s": 0.0, "target_s": 0.0}
        self._reported = {"scored": {}, "draft_s": 0.0, "target_s": 0.0, "put_wait_s": 0.0}

    def sync_weights(self, wait: bool = False) -> bool:
        """Load the newest published weights; with wait, block until a first version exists."""
        while True:
            got = ray.get(self.store.latest.remote(self.version))
            if got is not None:
                version, (ref,) = got
                check_and_load_weights(self.model, ray.get(ref))
                self.version = version
                self.counters["weight_loads"] += 1
                return True
            if not wait or self._stop.is_set():
                return False
            time.sleep(0.2)

    def sample(self) -> _Sampled:
        """Pick rows, flip the on-policy coins and sample the on-policy rows from the draft (one
        batched `generate`): continuations of the prompt, or branches after target-answer prefixes."""
        t0 = time.perf_counter()
        picks = [self.rng.choice(self.rows) for _ in range(self.batch_size)]
        flags = [self.rng.random() < self.lam for _ in picks]
        prompts = [list(r["prompt_token_ids"]) for r in picks]
        responses: list[list[int]] = [list(r["response_token_ids"]) for r in picks]
        draft_lp: list[list[float] | None] = [None] * len(picks)
        on_idx = [i for i, f in enumerate(flags) if f]
        new_tokens = self.max_new_tokens
        if on_idx and self.mode == "branch":
            new_tokens = self.rng.randint(*self.branch_tokens)  # L, one per batch
            ctx = branch_contexts([prompts[i] for i in on_idx], [responses[i] for i in on_idx], new_tokens,
                                  self.max_len, self.rng)
            for i, c in zip(on_idx, ctx, strict=True):
                if c is None:
                    flags[i] = False  # no branch fits: the row replays
                else:
                    prompts[i] = c
            on_idx = [i for i in on_idx if flags[i]]
        if on_idx:
            gen, lps = sample_continuations(
                self.model, [prompts[i] for i in on_idx], temperature=self.temperature,
                max_new_tokens=new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                draft_vocab=self.draft_vocab)
            for i, g, lp in zip(on_idx, gen, lps, strict=True):
                responses[i], draft_lp[i] = g, lp
        cached = [None if f else cached_score(r, self.top_k) for r, f in zip(picks, flags, strict=True)]
        return _Sampled(picks, prompts, responses, flags, draft_lp, cached, self.version,
                        time.perf_counter() - t0)

    def submit(self, s: _Sampled) -> _Sampled:
        """Send the rows without recorded scores to the target; returns at once."""
        s.todo = [i for i, c in enumerate(s.cached) if c is None]
        if s.todo:
            s.call = self.pool.submit([s.prompts[i] + s.responses[i] for i in s.todo],
                                      [len(s.prompts[i]) for i in s.todo], self.top_k)
        s.submitted_at = time.perf_counter()
        return s

    def finish(self, s: _Sampled) -> RolloutBatch | None:
        """Wait for the target's scores of a submitted batch and build it; None if stop() came first."""
        t0 = time.perf_counter()
        scores = list(s.cached)
        if s.call is not None:
            fresh = self.pool.collect(s.call, self._stop)
            if fresh is None:
                return None
            for i, sc in zip(s.todo, fresh, strict=True):
                scores[i] = sc
        t1 = time.perf_counter()
        score_s, wait_s = t1 - s.submitted_at, t1 - t0
        for key, v in (("scored_rows", len(s.todo)), ("cached_rows", len(s.picks) - len(s.todo)),
                       ("sample_s", s.sample_s), ("score_s", score_s), ("score_wait_s", wait_s),
                       ("target_s", s.target_s + wait_s)):
            self.counters[key] += v
        return build_batch(s.prompts, s.responses, scores, pad_id=self.pad_id, on_policy=s.flags,
                           draft_logprobs=s.draft_lp, policy_version=s.version, actor_id=self.actor_id,
                           loss_masks=s.loss_masks, sampled=s.sampled,
                           prompt_ids=[str(r.get("prompt_id", "")) for r in s.picks],
                           timing={"sample_s": s.sample_s, "score_s": score_s, "score_wait_s": wait_s,
                                   "overlap_s": score_s - wait_s, "total_s": s.sample_s + score_s,
                                   "created_at": time.time()})

    def put(self, batch: RolloutBatch) -> bool:
        """Blocking put with a timeout loop, so stop() is honoured while the queue is full."""
        from ray.util.queue import Full

        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.queue.put(batch, block=True, timeout=1.0)
                return True
            except Full:
                continue
            finally:  # updated every second, so stats() shows back-pressure while it happens
                self.counters["put_wait_s"] += time.perf_counter() - t0
        return False

    def run(self, max_batches: int | None = None) -> dict:
        """Produce batches until stop() (or max_batches); returns the counters. Pipelined: each turn
        samples and submits batch i+1, then collects batch i (scored meanwhile) and queues it."""
        self.sync_weights(wait=True)
        pending: _Sampled | None = None
        while not self._stop.is_set():
            nxt = None
            if max_batches is None or self.counters["batches"] + (pending is not None) < max_batches:
                self.sync_weights()
                nxt = self.submit(self.sample())
            if pending is not None:
                batch = self.finish(pending)
                if batch is None or not self.put(batch):
                    break
                self.counters["batches"] += 1
                self.counters["tokens"] += batch.n_tokens
                self.store.report.remote(self.actor_id, batch.n_tokens, *self._since_report())
            if nxt is None:
                break
            pending = nxt
        return self.stats()

    def _since_report(self) -> tuple[dict, dict]:
        """({engine: target tokens scored}, {draft_s, target_s, put_wait_s}) since the last report: the store
        turns them into target tokens/s per engine and each actor's time split (the bottleneck)."""
        c, last = self.counters, self._reported
        scored = {e: n - last["scored"].get(e, 0) for e, n in self.pool.scored_tokens.items()}
        now = {"draft_s": c["sample_s"] - (c["target_s"] - c["score_wait_s"]), "target_s": c["target_s"],
               "put_wait_s": c["put_wait_s"]}
        times = {k: v - last[k] for k, v in now.items()}
        self._reported = {"scored": dict(self.pool.scored_tokens), **now}
        return scored, times

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        return dict(self.counters, actor_id=self.actor_id, incarnation=self.incarnation, version=self.version,
                    target_failures=self.pool.failures)


@ray.remote(max_concurrency=2)  # run() loops in one thread; stop() / stats() use the other
class RolloutActor(RolloutWorker):
    """Ray actor around RolloutWorker. Create with `create_rollout_actors`."""

    def ping(self) -> int:
        return self.incarnation


def create_rollout_actors(cfg, draft_path: str, rows_ref, engines: list, queue, store,
                          name_prefix: str | None = None, draft_vocab: list[int] | None = None,
                          actor_cls=None, **mode_kwargs) -> list:
    """`cfg.rollout.num_actors` RolloutActors, restartable, with resources from the job config
    (CPUs, GPUs and the custom Ray resources `rollout.resources`, e.g. to pin them to some nodes).

    rows_ref: an ObjectRef of the replay rows (a list of dicts with prompt_id, prompt_token_ids,
    response_token_ids); passing a ref keeps one copy in the object store for every actor. The caller keeps
    it alive for as long as the actors may restart.
    name_prefix: actors are named `<prefix>-rollout-<i>` (found with ray.get_actor), else anonymous.
    actor_cls, mode_kwargs: another actor class and its extra arguments (target_assisted:
    `actors.assisted.create_assisted_actors`).
    """
    r = cfg.rollout
    device = "cuda" if r.gpus_per_actor > 0 else "cpu"
    return [(actor_cls or RolloutActor).options(num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor,
                                 resources=dict(r.resources) or None,
                                 max_restarts=ROLLOUT_MAX_RESTARTS, max_task_retries=-1,
                                 name=f"{name_prefix}-rollout-{i}" if name_prefix else None).remote(
        i, draft_path, rows_ref, engines, queue, store, on_policy_fraction=r.on_policy_fraction,
        temperature=r.temperature, max_new_tokens=r.max_new_tokens, batch_size=r.batch_size,
        top_k=cfg.target.top_k_logprobs, seed=cfg.seed, device=device, draft_vocab=draft_vocab,
        on_policy_mode=r.on_policy_mode, branch_tokens=tuple(r.branch_tokens),
        max_model_len=cfg.target.max_model_len, **mode_kwargs)
        for i in range(r.num_actors)]
