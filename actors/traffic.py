"""Served traffic as training data: the record format of a speculative-decoding round, and the buffer actor that
carries records from the serving replicas to the online learner (serve/online.py captures, learner/online.py
trains; the format has its home here, below both).

Round record (one per live sequence per round, `round_record`; from a served round: `round_records`): the context,
the γ proposals x, the draft's log q(x), the target's top-k at the γ + 1 scored positions, what the round committed
and how many proposals were accepted, the draft version and the temperature. Stage 3's target-assisted rollouts
(actors/assisted.py) write the same record, plus `kind` ("round", or "redraft": the draft drafting again from a
rejection point, scored but not committed) and the accept test's `uniforms`. Request record (`request_records`): a
request's rounds chained into one token sequence, with the scored positions, their top-k, the behaviour log q (0
past a rejection) and the draft's proposal at each position (`drafted`, −1 at a bonus position).
`request_rows` / `to_rollout_batch` turn request records into stage 3's `RolloutBatch` rows (`actors.rollout`);
`drafted_rows` turns round records into rows trained at the drafted positions, labelled by the proposals.

`RoundBuffer` is one named, detached Ray actor shared by the replicas: a bounded FIFO (drop-oldest, counted),
optionally spilling every `put` as one JSONL shard written atomically.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from actors.rollout import build_batch
from draftalign.io import write_atomic


@dataclass(frozen=True)
class OnlineSettings:
    """What a replica needs of `serve.online` (built from the job's OnlineConfig)."""

    capture: bool
    top_k: int
    buffer_records: int
    spill_dir: str | None
    buffer_name: str
    namespace: str
    push_every: int
    push_interval_s: float
    weight_store: str | None
    poll_interval_s: float
    rollback_window: int
    rollback_judge: str
    rollback_margin: float
    rollback_z: float

    @classmethod
    def from_config(cls, cfg) -> OnlineSettings | None:
        """None when serve.online asks for nothing (no capture, no weight store)."""
        o = cfg.serve.online
        if not o.enabled and o.weight_store is None:
            return None
        return cls(capture=o.enabled, top_k=o.top_k_logprobs or cfg.target.top_k_logprobs,
                   buffer_records=o.buffer_records, spill_dir=o.spill_dir, buffer_name=o.buffer_name,
                   namespace=o.namespace, push_every=o.push_every, push_interval_s=o.push_interval_s,
                   weight_store=o.weight_store, poll_interval_s=o.poll_interval_s,
                   rollback_window=o.rollback_window, rollback_judge=o.rollback_judge,
                   rollback_margin=o.rollback_margin, rollback_z=o.rollback_z)


def round_record(request: str, context, draft_tokens, draft_logprobs, target_ids, target_logprobs, committed,
                 num_accepted: int, policy_version: int, temperature: float, **extra) -> dict:
    """One round record (module docstring): context (C,), draft_tokens (γ,), draft_logprobs (γ,) log q(x_i),
    target_ids / target_logprobs (γ + 1, k) the target's top-k at the γ + 1 verified positions, committed (m,) the
    tokens the round kept, num_accepted κ; `extra` holds kind / uniforms where the writer has them."""
    context = np.asarray(context, np.int32)
    return {"request": request, "context": context, "start": len(context),
            "draft_tokens": np.asarray(draft_tokens, np.int32),
            "draft_logprobs": np.asarray(draft_logprobs, np.float32),
            "target_ids": np.asarray(target_ids, np.int32), "target_logprobs": np.asarray(target_logprobs, np.float32),
            "committed": np.asarray(committed, np.int32), "num_accepted": int(num_accepted),
            "policy_version": int(policy_version), "temperature": float(temperature), "time": time.time(), **extra}


def round_records(view, top_k: int) -> list[dict]:
    """One round record per live sequence of a `RoundView` (module docstring: the format)."""
    live = [s for s, a in enumerate(view.live) if a]
    if not live:
        return []
    z = view.target_logits.float()  # (B, γ+1, V); a view when the target computes in fp32
    top_z, top_ids = z.topk(min(top_k, z.shape[-1]), -1)  # (B, γ+1, k)
    top_lp = (top_z - torch.logsumexp(z, -1, keepdim=True)).cpu().numpy()  # log_softmax at the top-k only
    top_ids = top_ids.cpu().numpy().astype(np.int32)
    x = view.draft_tokens  # (B, γ)
    q_x = view.draft_probs.gather(-1, x[..., None])[..., 0].clamp_min(1e-30).log().float().cpu().numpy()  # (B, γ)
    x = x.cpu().numpy().astype(np.int32)
    ids, mask = view.ids.cpu().numpy(), view.mask.cpu().numpy().astype(bool)
    return [round_record(f"{view.call}.{s}", ids[s][mask[s]], x[s], q_x[s], top_ids[s], top_lp[s],
                         view.committed[s] if view.committed else [], view.num_accepted[s], view.draft_version,
                         view.params.temperature) for s in live]


def request_records(rounds: list[dict]) -> list[dict]:
    """Round records of interleaved requests → one record per request, in order of first round (module
    docstring: "One record per request"). Per request, rounds in order; only the last one's context is read:

        tokens = context_last + committed_last,   round r → positions start_r + i, rows i, for i < m_r
    """
    by: dict[str, list[dict]] = {}
    for r in rounds:
        by.setdefault(r["request"], []).append(r)
    return [_request_record(rs) for rs in by.values()]


def _request_record(rounds: list[dict]) -> dict:
    last = rounds[-1]
    tokens = np.concatenate([np.asarray(last["context"], np.int32), np.asarray(last["committed"], np.int32)])
    pos, ids, lps, q, ver, drafted, drafted_q = [], [], [], [], [], [], []
    for r in rounds:
        c, kept = int(r["start"]), np.asarray(r["committed"], np.int32)
        m, kappa = len(kept), min(int(r["num_accepted"]), len(kept))
        assert np.array_equal(tokens[c: c + m], kept), f"request {r['request']}: its rounds do not chain"
        pos.append(c + np.arange(m))
        ids.append(np.asarray(r["target_ids"])[:m])
        lps.append(np.asarray(r["target_logprobs"])[:m])
        x, qx = np.asarray(r["draft_tokens"], np.int32), np.asarray(r["draft_logprobs"], np.float32)
        q.append(np.concatenate([qx[:kappa], np.zeros(m - kappa, np.float32)]))
        ver.append(np.full(m, int(r["policy_version"]), np.int32))
        g = min(m, len(x))  # positions i < γ were tested by proposal x_i (accepted, or the rejected one at i = κ)
        drafted.append(np.concatenate([x[:g], np.full(m - g, -1, np.int32)]))
        drafted_q.append(np.concatenate([qx[:g], np.zeros(m - g, np.float32)]))
    positions = np.concatenate(pos).astype(np.int32)
    assert np.all(np.diff(positions) > 0), f"request {last['request']}: rounds out of order"
    return {"request": last["request"], "tokens": tokens, "positions": positions,
            "target_ids": np.concatenate(ids).astype(np.int32),
            "target_logprobs": np.concatenate(lps).astype(np.float32), "draft_logprobs": np.concatenate(q),
            "draft_versions": np.concatenate(ver), "policy_version": min(int(r["policy_version"]) for r in rounds),
            "drafted": np.concatenate(drafted).astype(np.int32), "drafted_logprobs": np.concatenate(drafted_q),
            "rounds": len(rounds), "accepted": sum(min(int(r["num_accepted"]), len(r["committed"])) for r in rounds),
            "temperature": last["temperature"], "time": last["time"]}


def request_rows(records: list[dict]) -> dict[str, list]:
    """Request records → `actors.rollout.build_batch`'s row lists (module docstring: "To the learner"): prompts,
    responses, scores, draft_logprobs, loss_masks, one entry per record with a scored position; the online
    learner appends replayed rows to them. Response positions no round scored get zero rows, masked out."""
    out: dict[str, list] = {"prompts": [], "responses": [], "scores": [], "draft_logprobs": [], "loss_masks": []}
    for r in records:
        tokens, pos = np.asarray(r["tokens"]), np.asarray(r["positions"])
        if len(pos) == 0:
            continue
        t0, rel = int(pos[0]), pos - pos[0]
        R, k = int(rel[-1]) + 1, np.asarray(r["target_ids"]).shape[1]
        ids, lps = np.zeros((R, k), np.int32), np.zeros((R, k), np.float32)
        q, mask = np.zeros(R, np.float32), np.zeros(R, bool)
        ids[rel], lps[rel], q[rel], mask[rel] = r["target_ids"], r["target_logprobs"], r["draft_logprobs"], True
        out["prompts"].append(tokens[:t0].tolist())
        out["responses"].append(tokens[t0: t0 + R].tolist())
        out["scores"].append({"ids": ids, "logprobs": lps})
        out["draft_logprobs"].append(q.tolist())
        out["loss_masks"].append(mask)
    return out


def drafted_rows(records: list[dict]) -> dict[str, list]:
    """Round records of target-assisted rollouts → `build_batch` row lists trained where the draft proposed
    (prompts, responses, scores, draft_logprobs, loss_masks, sampled; requests: each row's sequence), with the
    proposal as the sampled token:

        kind "round"    a sequence's rounds chained (`request_records`): the row is the committed text (the target's),
                        the loss at each position i < min(m, γ) of each round — accepted proposals and the rejected
                        one, whose label x_κ differs from the committed (recovered) token; not at bonus positions
        kind "redraft"  one row: context + the re-drafted y_1 … y_γ, the loss at all γ (the error state and the
                        states the draft's own proposals create after it)
    """
    out: dict[str, list] = {"prompts": [], "responses": [], "scores": [], "draft_logprobs": [], "loss_masks": [],
                            "sampled": [], "requests": []}
    rounds = [r for r in records if r.get("kind", "round") == "round"]
    for r in request_records(rounds):
        tested = np.asarray(r["drafted"]) >= 0
        if not tested.any():
            continue
        rows = request_rows([{**r, "draft_logprobs": r["drafted_logprobs"]}])
        t0, rel = int(r["positions"][0]), np.asarray(r["positions"]) - int(r["positions"][0])
        mask = np.zeros(len(rows["responses"][0]), bool)
        mask[rel[tested]] = True
        sampled = np.asarray(rows["responses"][0], np.int64)
        sampled[rel[tested]] = np.asarray(r["drafted"])[tested]
        for key in ("prompts", "responses", "scores", "draft_logprobs"):
            out[key].append(rows[key][0])
        out["loss_masks"].append(mask)
        out["sampled"].append(sampled.tolist())
        out["requests"].append(r["request"])
        assert t0 == len(out["prompts"][-1])
    for r in records:
        if r.get("kind") != "redraft":
            continue
        g = len(r["draft_tokens"])
        out["prompts"].append(np.asarray(r["context"]).tolist())
        out["responses"].append(np.asarray(r["draft_tokens"]).tolist())
        out["scores"].append({"ids": np.asarray(r["target_ids"])[:g], "logprobs": np.asarray(r["target_logprobs"])[:g]})
        out["draft_logprobs"].append(np.asarray(r["draft_logprobs"], np.float32).tolist())
        out["loss_masks"].append(None)
        out["sampled"].append(None)
        out["requests"].append(r.get("parent", r["request"]))
    return out


def to_rollout_batch(records: list[dict], pad_id: int, actor_id: int = -1):
    """Buffer records → the stage 3 learner's `RolloutBatch` (module docstring: "To the learner")."""
    rows = request_rows(records)
    if not rows["prompts"]:
        raise ValueError("no records with a scored position to build a batch from")
    return build_batch(rows["prompts"], rows["responses"], rows["scores"], pad_id=pad_id,
                       on_policy=[True] * len(rows["prompts"]), draft_logprobs=rows["draft_logprobs"],
                       loss_masks=rows["loss_masks"], actor_id=actor_id,
                       policy_version=min(int(r["policy_version"]) for r in records))


def _jsonable(record: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in record.items()}


@ray.remote(num_cpus=0)
class RoundBuffer:
    """Bounded FIFO of round records shared by the replicas: drop-oldest (counted), optional JSONL spill."""

    def __init__(self, capacity: int, spill_dir: str | None = None):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be ≥ 1, got {capacity}")
        self._records: deque = deque()
        self.capacity = capacity
        self.spill = Path(spill_dir) if spill_dir else None
        self.counts = {"received": 0, "dropped": 0, "taken": 0, "shards": 0}
        self.versions: dict[int, int] = {}

    def put(self, records: list[dict]) -> int:
        """Append records (oldest first); returns how many older records were dropped to fit them."""
        self._records.extend(records)
        dropped = max(0, len(self._records) - self.capacity)
        for _ in range(dropped):
            self._records.popleft()
        self.counts["received"] += len(records)
        self.counts["dropped"] += dropped
        for r in records:
            v = int(r.get("policy_version", -1))
            self.versions[v] = self.versions.get(v, 0) + 1
        if self.spill is not None and records:
            lines = "".join(json.dumps(_jsonable(r)) + "\n" for r in records)
            name = f"rounds-{time.time_ns()}-{self.counts['shards']:06d}.jsonl"
            write_atomic(self.spill / name, lambda tmp: tmp.write_text(lines))
            self.counts["shards"] += 1
        return dropped

    def get_batch(self, n: int) -> list[dict]:
        """Take (remove) the oldest min(n, size) records."""
        if n < 1:
            raise ValueError(f"get_batch(n) needs n ≥ 1, got {n}")
        out = [self._records.popleft() for _ in range(min(n, len(self._records)))]
        self.counts["taken"] += len(out)
        return out

    def stats(self) -> dict:
        """size + dropped + taken == received."""
        return {"size": len(self._records), "capacity": self.capacity, **self.counts,
                "records_per_version": dict(self.versions)}


def get_buffer(s: OnlineSettings):
    """The job's named buffer actor, created by the first replica that asks."""
    return RoundBuffer.options(name=s.buffer_name, namespace=s.namespace, get_if_exists=True,
                               lifetime="detached").remote(s.buffer_records, s.spill_dir)
