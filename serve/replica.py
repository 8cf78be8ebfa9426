"""The replica deployment: target + draft loaded once, concurrent requests batched with `@serve.batch`
and run on one engine thread, each answered with its text and speculative decoding statistics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve

from draftalign.sampling import SamplingParams
from draftalign.tree_shapes import tree_depth
from serve.detokenize import TextStream
from serve.engines import NativeEngine, ReplicaSettings, VLLMEngine
from serve.metrics import SpecDecodeMetrics

logger = logging.getLogger("ray.serve")


@dataclass
class EngineRequest:
    """One prompt and its sampling parameters: what the ingress sends a replica."""

    prompt_ids: list[int]
    params: SamplingParams


def _stats(g, gamma: int, batch_size: int, prompt_tokens: int, counts_rejections: bool) -> dict:
    """A finished request's counts; `rejected` is None when the engine does not count rejections."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(g.token_ids), "rounds": g.rounds,
            "proposed": g.proposed, "accepted": g.accepted,
            "rejected": g.rejected if counts_rejections else None, "gamma": gamma, "batch_size": batch_size}


@serve.deployment(max_ongoing_requests=32)
class SpecDecodeReplica:
    """Target + draft on one replica (the target alone when draft_path is None: the baseline).

    All engine work runs on one thread, in arrival order. Concurrent requests are collected by
    `@serve.batch`; requests with equal sampling parameters share one engine call, others run as
    separate sub-batches; seeded requests run alone so a seed reproduces its output. Streams advance
    one speculative round per engine-thread task, interleaved with batches.
    """

    def __init__(self, target_path: str, draft_path: str | None, settings: ReplicaSettings, context: int):
        self.settings = settings
        self.gamma = (tree_depth(settings.tree) if settings.tree else settings.gamma) if draft_path else 0
        self.speculative = draft_path is not None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        engine_cls = VLLMEngine if settings.engine == "vllm" else NativeEngine
        # Built on the engine thread: vLLM's CPU backend binds its OpenMP threads to the caller.
        self.engine = self._executor.submit(engine_cls, target_path, draft_path, settings, context).result()
        self.metrics = SpecDecodeMetrics(settings.engine, self.speculative, self.engine.counts_rejections)
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.online = None
        if settings.online is not None:
            from serve.online import OnlineDraft

            if not (isinstance(self.engine, NativeEngine) and self.speculative):
                raise ValueError("serve.online needs the native engine with a draft")
            if self.engine.features:
                raise ValueError("serve.online captures and hot-swaps Llama drafts, not a feature head")
            self.online = OnlineDraft(self.engine.decoder, settings.online, self._executor)
        if settings.lossy_sampling(self.speculative):
            logger.warning("engine=vllm on CPU: vLLM's draft-model speculative decoding is exact at temperature 0 "
                           "but does NOT sample from the target distribution at temperature > 0; the ingress "
                           "refuses such requests (use engine=native for lossless sampling)")
        logger.info("SpecDecodeReplica ready: engine=%s target=%s draft=%s gamma=%d context=%d",
                    settings.engine, target_path, draft_path, self.gamma, context)

    def _record(self, st: dict, stream: bool = False) -> None:
        self.metrics.record_request(st["prompt_tokens"], st["completion_tokens"], proposed=st["proposed"],
                                    accepted=st["accepted"], rejected=st["rejected"], rounds=st["rounds"],
                                    stream=stream)

    def _run_group(self, prompts: list[list[int]], params: SamplingParams) -> list:
        t0 = time.perf_counter()
        gens = self.engine.generate(prompts, params)
        self.metrics.record_engine_call(len(prompts), time.perf_counter() - t0)
        return gens

    async def generate(self, request: EngineRequest) -> dict:
        """One request → {text, token_ids, finish_reason, prompt_tokens, completion_tokens, ...}."""
        return await self._generate_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[EngineRequest]) -> list[dict]:
        self.metrics.record_batch(len(requests))
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            # A seed must reproduce its output: the shared generator makes it depend on batch-mates.
            key = r.params if r.params.seed is None else ("seeded", i)
            groups.setdefault(key, []).append(i)
        out: list[dict | None] = [None] * len(requests)
        loop = asyncio.get_running_loop()
        for idx in groups.values():
            params = requests[idx[0]].params
            prompts = [requests[i].prompt_ids for i in idx]
            gens = await loop.run_in_executor(self._executor, self._run_group, prompts, params)
            for i, g in zip(idx, gens, strict=True):
                st = _stats(g, self.gamma, len(idx), len(requests[i].prompt_ids), self.engine.counts_rejections)
                self._record(st)
                out[i] = {"text": g.text or "", "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                          **st}
        return out

    async def generate_stream(self, request: EngineRequest) -> AsyncIterator[dict]:
        """Yield {"delta": str} per round, then one final event with the finished result."""
        params = request.params
        loop = asyncio.get_running_loop()
        rounds: Iterator = self.engine.stream(request.prompt_ids, params)
        text = TextStream(self.engine.tokenizer, self.engine.eos_ids, params.stop)
        done = object()
        g = None
        try:
            while True:
                item = await loop.run_in_executor(self._executor, next, rounds, done)
                if item is done:
                    break
                _, g = item
                if g.text is None and self.engine.streams_rounds:
                    delta = text.update(g.token_ids)
                    if delta:
                        yield {"delta": delta}
        finally:
            if hasattr(rounds, "close"):  # a cancelled stream frees its KV caches now
                await loop.run_in_executor(self._executor, rounds.close)
        final = g.text or ""
        if self.engine.streams_rounds:
            delta = text.finish(final)
            if delta:
                yield {"delta": delta}
        else:
            for k in range(0, len(final), 16):
                yield {"delta": final[k:k + 16]}
        st = _stats(g, self.gamma, 1, len(request.prompt_ids), self.engine.counts_rejections)
        self._record(st, stream=True)
        yield {"finish_reason": g.finish_reason, "text": final, **st}

    def stats(self) -> dict:
        return self.metrics.snapshot()

    # ------------------------------------------------------------------ online (serve/online.py)
    def online_stats(self) -> dict | None:
        """Draft version, install / rollback events, capture counts; None when serve.online is off."""
        return None if self.online is None else self.online.stats()

    async def install_draft(self, version: int, weights: dict) -> dict:
        """Install draft `version` ({name: ndarray}) between two rounds, on trial against the current one."""
        if self.online is None:
            raise ValueError("serve.online is off on this replica")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.online.install, version,
                                                                weights)

    async def online_flush(self) -> None:
        """Push the records collected so far and wait until the buffer holds them."""
        if self.online is not None and self.online.capture is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.online.capture.flush)
            await asyncio.get_running_loop().run_in_executor(None, self.online.capture.wait)

    def ping(self) -> bool:
        return True
