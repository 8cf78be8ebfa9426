"""Ray Serve application: an OpenAI-compatible HTTP API over speculative decoding replicas.

    HTTP ──► OpenAIIngress (FastAPI; validates, tokenizes, applies the chat template)
                 │ DeploymentHandle: generate (batched) / generate_stream (round by round)
                 ▼
             SpecDecodeReplica ×num_replicas (target + draft in __init__; one engine thread)

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as SSE),
`GET /v1/models`, `GET /health`, `GET /debug/stats` (one replica's running totals). Responses
have the OpenAI shapes plus a `spec_decoding` object: acceptance_rate, tokens_per_target_pass
(block efficiency τ), proposed, accepted, rounds, gamma, and batch_size (requests in the engine
call that served this one). Bad requests get OpenAI error JSON with a 4xx status naming the field.

Engines (`serve.engine`):
* `native` — `serve.specdec.SpecDecoder`, lossless at every temperature. Concurrent requests are
  collected by `@serve.batch`; requests with equal sampling parameters share one engine call,
  others run as separate sub-batches; seeded requests run alone so a seed reproduces its output.
  Streams advance one speculative round per engine-thread task, interleaved with batches.
* `vllm` — vLLM's own speculative decoding (`speculative_config={"method": "draft_model"}`).
  On CPU it is exact at temperature 0 but NOT lossless at temperature > 0 (see STACK-NOTES):
  the replica logs a warning at start and on the first such request. Its per-request
  `spec_decoding` numbers are the engine call's counter deltas split by completion tokens, and
  streaming sends the finished text in chunks.
With no draft (`draft_path=None`) the replica decodes with the target alone: the baseline.

Entry points: `build_app(cfg, target_path, draft_path)`, `run_serve(cfg, draft)` (the
`draftalign serve` verb), and `app_builder({"job": ..., "draft": ...})` for `serve run` /
`serve deploy` on a cluster (cluster/serve_config.yaml).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from draftalign.config import JobConfig
from serve.metrics import SpecDecodeMetrics
from serve.sampling import SamplingParams

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 before any parsing
_TEMPERATURE_EPS = 1e-5  # below this a request is greedy (as in vLLM)


# ====================================================================== settings
@dataclass(frozen=True)
class ReplicaSettings:
    """What a replica needs besides the model paths (built from the job's ServeConfig)."""

    engine: Literal["native", "vllm"] = "native"
    gamma: int = 3
    dtype: str = "auto"
    max_model_len: int = 1024
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    torch_threads: int = 1
    kv_cache_gib: float = 1.0
    use_gpu: bool = False


@dataclass(frozen=True)
class IngressSettings:
    model_name: str
    target_path: str
    draft_path: str | None
    engine: str
    gamma: int
    max_tokens_cap: int
    context: int  # prompt + completion (+ γ reserved while speculating) must fit in here


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams


def context_window(target_path: str, draft_path: str | None, max_model_len: int) -> int:
    """Longest sequence the replica decodes: max_model_len capped by both models' positions."""
    from transformers import AutoConfig

    limit = max_model_len
    for path in (target_path, draft_path):
        if path is not None:
            limit = min(limit, getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", limit))
    return limit


# ====================================================================== engines
class _NativeEngine:
    """`SpecDecoder` on torch models (or the target alone when there is no draft)."""

    def __init__(self, target_path: str, draft_path: str | None, s: ReplicaSettings, context: int):
        import torch

        from draftalign.models import load_causal_lm, load_draft, load_tokenizer, pick_dtype
        from serve.specdec import SpecDecoder

        torch.set_num_threads(s.torch_threads)
        device = "cuda" if s.use_gpu and torch.cuda.is_available() else "cpu"
        dtype = pick_dtype(s.dtype, device)
        self.tokenizer = load_tokenizer(target_path)
        target = load_causal_lm(target_path, dtype, device)
        draft = (load_draft(draft_path, self.tokenizer, dtype, device, target.config.vocab_size)
                 if draft_path else None)
        self.decoder = SpecDecoder(target, draft, self.tokenizer, gamma=s.gamma)
        self.decoder.max_len = min(self.decoder.max_len, context)
        self.eos_ids = self.decoder.eos_ids
        self.streams_rounds = True

    def generate(self, prompts: list[list[int]], params: SamplingParams):
        return self.decoder.generate(prompts, params)

    def stream(self, prompt: list[int], params: SamplingParams):
        return self.decoder.generate_stream(prompt, params)


class _VLLMEngine:
    """vLLM with its own draft-model speculative decoding (or the target alone)."""

    def __init__(self, target_path: str, draft_path: str | None, s: ReplicaSettings, context: int):
        from draftalign.models import load_tokenizer
        from draftalign.runtime import configure_vllm_env

        configure_vllm_env(s.kv_cache_gib, threads=s.torch_threads)
        import vllm

        self._vllm = vllm
        spec = ({"method": "draft_model", "model": draft_path, "num_speculative_tokens": s.gamma}
                if draft_path else None)
        dtype = {"auto": "auto", "bfloat16": "bfloat16", "float32": "float32"}[s.dtype]
        self.llm = vllm.LLM(target_path, speculative_config=spec, dtype=dtype, max_model_len=context,
                            enforce_eager=not s.use_gpu, disable_log_stats=False, seed=0)
        self.tokenizer = load_tokenizer(target_path)
        self.eos_ids = {self.tokenizer.eos_token_id}
        self.streams_rounds = False

    def _counters(self) -> dict[str, float]:
        names = {"vllm:spec_decode_num_drafts": "rounds", "vllm:spec_decode_num_draft_tokens": "proposed",
                 "vllm:spec_decode_num_accepted_tokens": "accepted"}
        out = dict.fromkeys(names.values(), 0.0)
        for m in self.llm.get_metrics():
            if m.name in names:
                out[names[m.name]] += float(getattr(m, "value", 0) or 0)
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams):
        from vllm.inputs import TokensPrompt

        from serve.specdec import Generation

        sp = self._vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                       max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                       seed=params.seed)
        before = self._counters()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        after = self._counters()
        gens = [Generation(list(o.outputs[0].token_ids), text=o.outputs[0].text,
                           finish_reason="stop" if o.outputs[0].finish_reason == "stop" else "length")
                for o in outs]
        # vLLM counts per engine, not per request: split the call's deltas by completion tokens.
        total = sum(len(g.token_ids) for g in gens) or 1
        for key in ("rounds", "proposed", "accepted"):
            delta = int(round(after[key] - before[key]))
            shares = _split_int(delta, [len(g.token_ids) / total for g in gens])
            for g, v in zip(gens, shares, strict=True):
                setattr(g, key, v)
        return gens

    def stream(self, prompt: list[int], params: SamplingParams):
        (g,) = self.generate([prompt], params)
        yield g.token_ids, g


def _split_int(total: int, weights: list[float]) -> list[int]:
    """Split a non-negative integer by weights (largest remainder): the parts sum to total."""
    raw = [total * w for w in weights]
    parts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts


class _TextStream:
    """Turn a growing generation into text deltas that concatenate to the final text.

    Text is only sent once it cannot change: a trailing incomplete UTF-8 character (U+FFFD)
    and the last len(longest stop string) − 1 characters are held back until the next round.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop: tuple[str, ...]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = ""

    def update(self, token_ids: list[int]) -> str:
        ids = [t for t in token_ids if t not in self.eos_ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text = text.rstrip("\ufffd")
        text = text[: max(0, len(text) - self.hold)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, final_text: str) -> str:
        if not final_text.startswith(self.sent):
            logger.warning("streamed text %r is not a prefix of the final text %r", self.sent, final_text)
            return ""
        delta, self.sent = final_text[len(self.sent):], final_text
        return delta


def _stats(g, gamma: int, batch_size: int, prompt_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(g.token_ids), "rounds": g.rounds,
            "proposed": g.proposed, "accepted": g.accepted, "gamma": gamma, "batch_size": batch_size}


# ====================================================================== replica
@serve.deployment(max_ongoing_requests=32)
class SpecDecodeReplica:
    """Target + draft on one replica. All engine work runs on one thread, in arrival order."""

    def __init__(self, target_path: str, draft_path: str | None, settings: ReplicaSettings, context: int):
        self.settings = settings
        self.gamma = settings.gamma if draft_path else 0
        self.speculative = draft_path is not None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        engine_cls = _VLLMEngine if settings.engine == "vllm" else _NativeEngine
        # Built on the engine thread: vLLM's CPU backend binds its OpenMP threads to the caller.
        self.engine = self._executor.submit(engine_cls, target_path, draft_path, settings, context).result()
        self.metrics = SpecDecodeMetrics(settings.engine, self.speculative)
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._warned_lossy = False
        self._lossy = settings.engine == "vllm" and self.speculative and not settings.use_gpu
        if self._lossy:
            logger.warning("engine=vllm on CPU: vLLM's draft-model speculative decoding is exact at "
                           "temperature 0 but does NOT sample from the target distribution at "
                           "temperature > 0; use engine=native for lossless sampling")
        logger.info("SpecDecodeReplica ready: engine=%s target=%s draft=%s gamma=%d context=%d",
                    settings.engine, target_path, draft_path, self.gamma, context)

    def _warn_lossy(self, params: SamplingParams) -> None:
        if self._lossy and not params.greedy and not self._warned_lossy:
            self._warned_lossy = True
            logger.warning("a temperature=%g request on engine=vllm (CPU): the samples are not lossless",
                           params.temperature)

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
            self._warn_lossy(params)
            prompts = [requests[i].prompt_ids for i in idx]
            gens = await loop.run_in_executor(self._executor, self._run_group, prompts, params)
            for i, g in zip(idx, gens, strict=True):
                st = _stats(g, self.gamma, len(idx), len(requests[i].prompt_ids))
                self.metrics.record_request(st["prompt_tokens"], st["completion_tokens"], g.proposed,
                                            g.accepted, g.rounds)
                out[i] = {"text": g.text or "", "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                          **st}
        return out

    async def generate_stream(self, request: EngineRequest) -> AsyncIterator[dict]:
        """Yield {"delta": str} per round, then one final event with the finished result."""
        params = request.params
        self._warn_lossy(params)
        loop = asyncio.get_running_loop()
        rounds: Iterator = self.engine.stream(request.prompt_ids, params)
        text = _TextStream(self.engine.tokenizer, self.engine.eos_ids, params.stop)
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
        st = _stats(g, self.gamma, 1, len(request.prompt_ids))
        self.metrics.record_request(st["prompt_tokens"], st["completion_tokens"], g.proposed, g.accepted,
                                    g.rounds, stream=True)
        yield {"finish_reason": g.finish_reason, "text": final, **st}

    def stats(self) -> dict:
        return self.metrics.snapshot()

    def ping(self) -> bool:
        return True


# ====================================================================== OpenAI protocol
class APIError(Exception):
    """An OpenAI-style error: JSON {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Request(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; unknown OpenAI fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(None, description="≥ 1 and ≤ serve.max_tokens_cap")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off (vLLM extension)")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    echo: bool = Field(False, description="not supported: must be false")
    logprobs: None = Field(None, description="not supported")
    suffix: None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = Field(None, description="not supported: must be false")
    tools: None = Field(None, description="not supported")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecDecodingStats(BaseModel):
    acceptance_rate: float
    tokens_per_target_pass: float  # block efficiency τ
    proposed: int
    accepted: int
    rounds: int
    gamma: int  # 0 = target-only
    batch_size: int  # requests in the engine call that served this one (the largest, over prompts)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    spec_decoding: SpecDecodingStats


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    spec_decoding: SpecDecodingStats


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "draftalign"
    root: str
    draft: str | None
    engine: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _aggregate(results: list[dict]) -> tuple[Usage, SpecDecodingStats]:
    total = {k: sum(r[k] for r in results) for k in ("prompt_tokens", "completion_tokens", "rounds",
                                                      "proposed", "accepted")}
    usage = Usage(prompt_tokens=total["prompt_tokens"], completion_tokens=total["completion_tokens"],
                  total_tokens=total["prompt_tokens"] + total["completion_tokens"])
    spec = SpecDecodingStats(
        acceptance_rate=total["accepted"] / total["proposed"] if total["proposed"] else 0.0,
        tokens_per_target_pass=total["completion_tokens"] / total["rounds"] if total["rounds"] else 0.0,
        proposed=total["proposed"], accepted=total["accepted"], rounds=total["rounds"],
        gamma=results[0]["gamma"], batch_size=max(r["batch_size"] for r in results))
    return usage, spec


# ---------------------------------------------------------------------- HTTP plumbing
class BodyLimitMiddleware:
    """ASGI middleware: 413 for bodies over `max_bytes` (declared or streamed), before parsing."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", None, "request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_big.response()(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the client's disconnect

        return await self.app(scope, replay, send)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_of(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages.0.content' (drop union-member tags)."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p.isidentifier() and not p[0].isupper() and p not in _TYPE_NAMES:
            parts.append(p)
        else:
            break
    return ".".join(parts) or None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), None,
                        "invalid_json").response()
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "request body is empty: send a JSON object", None, "invalid_json").response()
    param = _param_of(tuple(first.get("loc", ())))
    # Unions report one error per member; say which field, and what each member wanted.
    same = [e["msg"] for e in errors if _param_of(tuple(e.get("loc", ()))) == param]
    msg = "; or ".join(dict.fromkeys(same)) if same else first["msg"]
    return APIError(400, f"invalid {param or 'request body'}: {msg}", param, "invalid_value").response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown route, wrong method, a body it cannot decode) in OpenAI shape."""
    code = "invalid_json" if exc.status_code == 400 else None
    return APIError(exc.status_code, str(exc.detail), None, code).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}", None, None, "server_error").response()


api = FastAPI(title="draftalign speculative decoding", version="1")
api.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
api.add_exception_handler(RequestValidationError, _validation_error)
api.add_exception_handler(APIError, _api_error)
api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(Exception, _internal_error)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


# ====================================================================== ingress
@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    """Validates and tokenizes requests; fans prompts out to the replicas; shapes OpenAI replies."""

    def __init__(self, engine: DeploymentHandle, settings: IngressSettings):
        from transformers import AutoConfig

        from draftalign.models import load_tokenizer

        self.engine, self.s = engine, settings
        self.tokenizer = load_tokenizer(settings.target_path)
        self.vocab_size = AutoConfig.from_pretrained(settings.target_path).vocab_size
        self.created = int(time.time())

    # ------------------------------------------------------------------ checks
    def _check_model(self, model: str) -> None:
        if model != self.s.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.s.model_name!r}", "model", "model_not_found")

    def _params(self, body: _Sampling, max_tokens: int | None, prompt_len: int, field: str) -> SamplingParams:
        room = self.s.context - self.s.gamma - prompt_len  # γ: the last round scores γ + 1 positions
        if max_tokens is None:
            max_tokens = min(16 if field == "prompt" else self.s.max_tokens_cap, room)
            name = "max_tokens"
        else:
            name = ("max_completion_tokens" if body.max_tokens is None and field == "messages"
                    else "max_tokens")
            if max_tokens < 1:
                raise APIError(400, f"{name} must be at least 1, got {max_tokens}", name, "invalid_value")
            if max_tokens > self.s.max_tokens_cap:
                raise APIError(400, f"{name}={max_tokens} exceeds this server's cap of "
                                    f"{self.s.max_tokens_cap}", name, "invalid_value")
        if max_tokens < 1 or max_tokens > room:
            raise APIError(400, f"this model's context is {self.s.context} tokens"
                                + (f" ({self.s.gamma} reserved for speculation)" if self.s.gamma else "")
                                + f"; the {field} holds {prompt_len} tokens and {name}={max(max_tokens, 1)} "
                                  f"does not fit: shorten the {field} or lower {name}",
                           field, "context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        for i, s in enumerate(stop):
            if not s:
                param = f"stop.{i}" if isinstance(body.stop, list) else "stop"
                raise APIError(400, "stop strings must not be empty", param, "invalid_value")
        temperature = 0.0 if body.temperature < _TEMPERATURE_EPS else body.temperature
        return SamplingParams(temperature=temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                              max_new_tokens=max_tokens, stop=stop, seed=body.seed)

    @staticmethod
    def _check_unsupported(body: _Sampling) -> None:
        for name in ("echo", "logprobs"):
            if getattr(body, name, None) is True:  # strict bool: 0 and 1 never get here as True
                raise APIError(400, f"{name}=true is not supported by this server", name, "unsupported")

    def _completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        if isinstance(p[0], int):
            p = [p]
        out = []
        for i, item in enumerate(p):
            param = "prompt" if len(p) == 1 else f"prompt.{i}"
            if isinstance(item, str):
                if not item.strip():
                    raise APIError(400, "prompt must not be empty", param, "invalid_value")
                ids = self.tokenizer(item, add_special_tokens=False).input_ids
            else:
                ids = item
                bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise APIError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                                   param, "invalid_value")
            out.append(ids)
        return out

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        from draftalign.data import chat_prompt_ids

        messages = []
        for i, m in enumerate(body.messages):
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            if m.role != "assistant" and not content.strip():
                raise APIError(400, f"messages[{i}].content must not be empty", f"messages.{i}.content",
                               "invalid_value")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except Exception as e:  # a template that rejects the role order raises its own error type
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages",
                           "invalid_value") from None

    # ------------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self) -> dict:
        try:
            await asyncio.wait_for(self.engine.ping.remote(), timeout=10)
        except Exception as e:
            raise APIError(503, f"engine replica unavailable: {type(e).__name__}", None,
                           "unavailable", "server_error") from None
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.s.model_name, created=self.created, root=self.s.target_path,
                                         draft=self.s.draft_path, engine=self.s.engine)])

    @api.get("/debug/stats")
    async def debug_stats(self) -> dict:
        """Running totals of the replica this request lands on (one of num_replicas)."""
        return await self.engine.stats.remote()

    @api.post("/v1/completions", response_model=None)
    async def completions(self, body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        self._check_model(body.model)
        self._check_unsupported(body)
        prompts = self._completion_prompts(body)
        params = [self._params(body, body.max_tokens, len(p), "prompt") for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            if len(prompts) > 1:
                raise APIError(400, "stream=true takes a single prompt", "prompt", "invalid_value")
            return self._stream(rid, "text_completion", EngineRequest(prompts[0], params[0]), body)
        results = await self._generate(prompts, params)
        usage, spec = _aggregate(results)
        choices = [CompletionChoice(index=i, text=r["text"], finish_reason=r["finish_reason"])
                   for i, r in enumerate(results)]
        return CompletionResponse(id=rid, created=int(time.time()), model=self.s.model_name, usage=usage,
                                  spec_decoding=spec, choices=choices)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest
                               ) -> ChatCompletionResponse | StreamingResponse:
        self._check_model(body.model)
        self._check_unsupported(body)
        prompt = self._chat_prompt(body)
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        params = self._params(body, max_tokens, len(prompt), "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return self._stream(rid, "chat.completion.chunk", EngineRequest(prompt, params), body)
        (r,) = await self._generate([prompt], [params])
        usage, spec = _aggregate([r])
        return ChatCompletionResponse(id=rid, created=int(time.time()), model=self.s.model_name, usage=usage,
                                      spec_decoding=spec, choices=[ChatChoice(
                                          index=0, message=AssistantMessage(content=r["text"]),
                                          finish_reason=r["finish_reason"])])

    # ------------------------------------------------------------------ helpers
    async def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
        # Every prompt is its own replica request, so @serve.batch can group them with others'.
        return list(await asyncio.gather(*(self.engine.generate.remote(EngineRequest(p, sp))
                                           for p, sp in zip(prompts, params, strict=True))))

    def _stream(self, rid: str, kind: str, request: EngineRequest, body: _Sampling) -> StreamingResponse:
        created, model = int(time.time()), self.s.model_name
        chat = kind == "chat.completion.chunk"
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(choice: dict | None, **extra) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": model,
                    "choices": [choice] if choice is not None else [], **extra}

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield _sse(chunk(choice(None, None, role=True)))
                gen = self.engine.options(stream=True).generate_stream.remote(request)
                async for ev in gen:
                    if "delta" in ev:
                        yield _sse(chunk(choice(ev["delta"], None)))
                        continue
                    usage, spec = _aggregate([ev])
                    yield _sse(chunk(choice(None, ev["finish_reason"]), spec_decoding=spec.model_dump()))
                    if include_usage:
                        yield _sse(chunk(None, usage=usage.model_dump(), spec_decoding=spec.model_dump()))
            except Exception as e:  # headers are sent: report in-band, then end the stream
                logger.exception("stream %s failed", rid)
                yield _sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                      "type": "server_error", "param": None, "code": None}})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ====================================================================== building and running
def _check_draft(target_path: str, draft_path: str) -> None:
    """Fail before deploying when the draft is missing or its tokenizer differs from the target's."""
    from transformers import AutoConfig, AutoTokenizer

    from draftalign.models import ModelError, check_tokenizers_match, load_tokenizer

    p = Path(draft_path).expanduser()
    if not (p / "config.json").is_file():
        raise ModelError(f"draft {draft_path} is not an HF-format checkpoint (no config.json)")
    try:
        draft_tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise ModelError(f"draft {draft_path}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    check_tokenizers_match(load_tokenizer(target_path), draft_tok,
                           AutoConfig.from_pretrained(target_path).vocab_size,
                           AutoConfig.from_pretrained(str(p)).vocab_size)


def build_app(cfg: JobConfig, target_path: str, draft_path: str | None, *, torch_threads: int | None = None):
    """The Serve application: OpenAIIngress → SpecDecodeReplica ×serve.num_replicas.

    draft_path None serves the target alone (the baseline endpoint). torch_threads defaults to
    ceil(serve.cpus_per_replica), capped by this machine's cores.
    """
    sc = cfg.serve
    if draft_path is not None:
        _check_draft(target_path, draft_path)
    context = context_window(target_path, draft_path, cfg.target.max_model_len)
    threads = torch_threads or max(1, min(os.cpu_count() or 1, math.ceil(sc.cpus_per_replica)))
    settings = ReplicaSettings(engine=sc.engine, gamma=sc.gamma, dtype=cfg.target.dtype,
                               max_model_len=cfg.target.max_model_len, max_batch_size=sc.max_batch_size,
                               batch_wait_timeout_s=sc.batch_wait_timeout_s, torch_threads=threads,
                               kv_cache_gib=cfg.target.kv_cache_gib, use_gpu=sc.gpus_per_replica > 0)
    replica = SpecDecodeReplica.options(
        num_replicas=sc.num_replicas,
        # Room for a full batch in flight plus the next one queuing, and a few streams.
        max_ongoing_requests=max(4 * sc.max_batch_size, 16),
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
    ).bind(target_path, draft_path, settings, context)
    ingress = IngressSettings(model_name=sc.model_name, target_path=target_path, draft_path=draft_path,
                              engine=sc.engine, gamma=sc.gamma if draft_path else 0,
                              max_tokens_cap=sc.max_tokens_cap, context=context)
    return OpenAIIngress.bind(replica, ingress)


def default_draft(cfg: JobConfig) -> str:
    """The newest distilled draft of the job, else its newest pretrained one."""
    from draftalign.models import DRAFT_DIRS, ModelError, newest_trained_draft

    found = newest_trained_draft(cfg.run_path)
    if found is None:
        raise ModelError(f"no trained draft under {cfg.run_path.resolve()}/{{{','.join(DRAFT_DIRS)}}}: run "
                         f"`draftalign distill` (or `draftalign pretrain`) for this job first, pass --draft PATH, "
                         f"or --draft none to serve the target alone")
    return str(found)


def resolve_paths(cfg: JobConfig, draft: str | None) -> tuple[str, str | None]:
    """(target path, draft path or None). draft: a path, "none" (target only) or None (default)."""
    from draftalign.models import resolve_target

    target = resolve_target(cfg.target.model)
    if draft is not None and draft.lower() == "none":
        return target, None
    return target, str(Path(draft).expanduser().resolve()) if draft else default_draft(cfg)


def run_serve(cfg: JobConfig, draft: str | None = None, blocking: bool = True) -> str:
    """Start Ray and Serve, deploy the app and print its URL; block until Ctrl-C when `blocking`.

    Returns the base URL (…/v1) when not blocking; the caller then owns `serve.shutdown()`.
    """
    import ray

    from draftalign.runtime import init_ray

    target, draft_path = resolve_paths(cfg, draft)
    app = build_app(cfg, target, draft_path)  # checks the draft before Ray starts
    init_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name="draftalign", route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    mode = f"draft {draft_path}, gamma {cfg.serve.gamma}" if draft_path else "target only"
    print(f"serving {cfg.serve.model_name} ({cfg.serve.engine}: target {target}, {mode}) at {url}",
          flush=True)
    if not blocking:
        return url

    def _interrupt(signum, frame):  # `kill PID` and job managers: shut down like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()
    return url


def app_builder(args: dict[str, str]):
    """Application builder for `serve run serve.app:app_builder job=JOB.yaml [draft=PATH|none]`.

    Host and port come from the Serve config's http_options, not from the job.
    """
    from draftalign.config import load_config

    cfg = load_config(args.get("job"))
    target, draft_path = resolve_paths(cfg, args.get("draft"))
    return build_app(cfg, target, draft_path)
