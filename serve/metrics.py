"""Speculative decoding statistics of one serving replica: Ray Serve metrics plus a local snapshot.

The same numbers go two ways. `ray.serve.metrics` Counters/Histograms (tagged with deployment,
replica and application by Serve) reach Prometheus through Ray's metrics agent; `snapshot()`
returns this replica's running totals for the `/debug/stats` route and tests, where scraping
Prometheus would be overkill. Rates follow `serve.acceptance`: acceptance rate = per-token α =
accepted / (accepted + rejected rounds), the α of E[τ]; draft acceptance rate = accepted / proposed
(vLLM's `spec_decode` counters); tokens per target pass = block efficiency τ. An engine that does not
count rejected rounds (vLLM) reports `rejected` and the per-token α as None, never a made-up 0.
"""

from __future__ import annotations

import threading

from serve.acceptance import draft_acceptance, per_token_acceptance

# Histogram boundaries must be positive (Ray rejects 0).
_RATE_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
_TAU_BUCKETS = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 9.0]
_BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class SpecDecodeMetrics:
    """Counters and histograms for one replica. Safe to call from the engine thread."""

    def __init__(self, engine: str, speculative: bool, counts_rejections: bool = True):
        self.counts_rejections = counts_rejections
        self._tags = {"engine": engine, "mode": "speculative" if speculative else "target_only"}
        self._lock = threading.Lock()
        self._totals = {"requests": 0, "streams": 0, "batches": 0, "max_batch_size_seen": 0,
                        "max_engine_batch_seen": 0, "prompt_tokens": 0, "completion_tokens": 0,
                        "proposed": 0, "accepted": 0, "rejected": 0, "rounds": 0}
        try:
            from ray.serve.metrics import Counter, Histogram
        except ImportError:  # outside Ray (unit use of the engine): keep the local snapshot only
            self._ray = None
            return
        keys = tuple(self._tags)
        self._ray = {
            "requests": Counter("draftalign_requests", "finished generation requests", keys),
            "prompt_tokens": Counter("draftalign_prompt_tokens", "prompt tokens processed", keys),
            "completion_tokens": Counter("draftalign_completion_tokens", "tokens generated", keys),
            "proposed": Counter("draftalign_spec_proposed_tokens", "draft tokens proposed", keys),
            "accepted": Counter("draftalign_spec_accepted_tokens", "draft tokens accepted by the target",
                                keys),
            "rejected": Counter("draftalign_spec_rejected_rounds",
                                "speculative rounds that ended in a rejection (not counted by engine=vllm)", keys),
            "rounds": Counter("draftalign_target_passes", "target forward passes (speculative rounds)", keys),
            "acceptance_rate": Histogram("draftalign_spec_acceptance_rate",
                                         "per-request per-token acceptance: accepted / (accepted + rejected)",
                                         _RATE_BUCKETS, keys),
            "draft_acceptance_rate": Histogram("draftalign_spec_draft_acceptance_rate",
                                               "per-request accepted / proposed", _RATE_BUCKETS, keys),
            "tokens_per_target_pass": Histogram("draftalign_spec_tokens_per_target_pass",
                                                "per-request block efficiency (tau)", _TAU_BUCKETS, keys),
            "batch_size": Histogram("draftalign_batch_size", "requests per @serve.batch call",
                                    _BATCH_BUCKETS, keys),
            "engine_batch_size": Histogram("draftalign_engine_batch_size",
                                           "prompts per engine call (one sampling-params group)",
                                           _BATCH_BUCKETS, keys),
            "engine_latency_s": Histogram("draftalign_engine_latency_s", "seconds per engine call",
                                          _LATENCY_BUCKETS, keys),
        }

    def _inc(self, name: str, value: float) -> None:
        if self._ray is not None and value:
            self._ray[name].inc(value, tags=self._tags)

    def _observe(self, name: str, value: float) -> None:
        if self._ray is not None:
            self._ray[name].observe(value, tags=self._tags)

    def record_batch(self, batch_size: int) -> None:
        """One `@serve.batch` call holding `batch_size` requests."""
        with self._lock:
            self._totals["batches"] += 1
            self._totals["max_batch_size_seen"] = max(self._totals["max_batch_size_seen"], batch_size)
        self._observe("batch_size", batch_size)

    def record_engine_call(self, prompts: int, seconds: float) -> None:
        with self._lock:
            self._totals["max_engine_batch_seen"] = max(self._totals["max_engine_batch_seen"], prompts)
        self._observe("engine_batch_size", prompts)
        self._observe("engine_latency_s", seconds)

    def record_request(self, prompt_tokens: int, completion_tokens: int, *, proposed: int, accepted: int,
                       rejected: int | None, rounds: int, stream: bool = False) -> None:
        """One finished request (streamed or not) and its speculative statistics (rejected None: not counted)."""
        with self._lock:
            t = self._totals
            t["requests"] += 1
            t["streams"] += stream
            t["prompt_tokens"] += prompt_tokens
            t["completion_tokens"] += completion_tokens
            t["proposed"] += proposed
            t["accepted"] += accepted
            t["rejected"] += rejected or 0
            t["rounds"] += rounds
        self._inc("requests", 1)
        self._inc("prompt_tokens", prompt_tokens)
        self._inc("completion_tokens", completion_tokens)
        self._inc("proposed", proposed)
        self._inc("accepted", accepted)
        if rejected is not None:
            self._inc("rejected", rejected)
        self._inc("rounds", rounds)
        if rejected is not None and accepted + rejected:
            self._observe("acceptance_rate", per_token_acceptance(accepted, rejected))
        if proposed:
            self._observe("draft_acceptance_rate", draft_acceptance(accepted, proposed))
        if rounds:
            self._observe("tokens_per_target_pass", completion_tokens / rounds)

    def snapshot(self) -> dict:
        """Running totals of this replica, with the derived rates."""
        with self._lock:
            t = dict(self._totals)
        if not self.counts_rejections:
            t["rejected"] = None
        t["acceptance_rate"] = (per_token_acceptance(t["accepted"], t["rejected"])
                                if t["rejected"] is not None else None)
        t["draft_acceptance_rate"] = draft_acceptance(t["accepted"], t["proposed"])
        t["tokens_per_target_pass"] = t["completion_tokens"] / t["rounds"] if t["rounds"] else 0.0
        return {**self._tags, **t}
