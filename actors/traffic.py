"""Served traffic as training data: the record format of a speculative-decoding round, and the buffer actor that
carries records from the serving replicas to the online learner (serve/online.py captures, learner/online.py
trains; the format has its home here, below both).

Round record (one per live sequence per round, `round_records`): the context, the γ proposals x, the draft's
log q(x), the target's top-k at the γ + 1 scored positions, what the round committed and how many proposals were
accepted, the draft version and the temperature. Request record (`request_records`): a request's rounds chained
into one token sequence, with the scored positions, their top-k and the behaviour log q (0 past a rejection).
`request_rows` / `to_rollout_batch` turn request records into stage 3's `RolloutBatch` rows (`actors.rollout`).

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
    now = time.time()
    out = []
    for s in live:
        context = ids[s][mask[s]].astype(np.int32)
        out.append({"request": f"{view.call}.{s}", "context": context, "start": len(context), "draft_tokens": x[s],
                    "draft_logprobs": q_x[s], "target_ids": top_ids[s], "target_logprobs": top_lp[s],
                    "committed": np.asarray(view.committed[s] if view.committed else [], np.int32),
                    "num_accepted": view.num_accepted[s], "policy_version": view.draft_version,
                    "temperature": view.params.temperature, "time": now})
    return out


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
    pos, ids, lps, q, ver = [], [], [], [], []
    for r in rounds:
        c, kept = int(r["start"]), np.asarray(r["committed"], np.int32)
        m, kappa = len(kept), min(int(r["num_accepted"]), len(kept))
        assert np.array_equal(tokens[c: c + m], kept), f"request {r['request']}: its rounds do not chain"
        pos.append(c + np.arange(m))
        ids.append(np.asarray(r["target_ids"])[:m])
        lps.append(np.asarray(r["target_logprobs"])[:m])
        q.append(np.concatenate([np.asarray(r["draft_logprobs"], np.float32)[:kappa], np.zeros(m - kappa, np.float32)]))
        ver.append(np.full(m, int(r["policy_version"]), np.int32))
    positions = np.concatenate(pos).astype(np.int32)
    assert np.all(np.diff(positions) > 0), f"request {last['request']}: rounds out of order"
    return {"request": last["request"], "tokens": tokens, "positions": positions,
            "target_ids": np.concatenate(ids).astype(np.int32),
            "target_logprobs": np.concatenate(lps).astype(np.float32), "draft_logprobs": np.concatenate(q),
            "draft_versions": np.concatenate(ver), "policy_version": min(int(r["policy_version"]) for r in rounds),
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
