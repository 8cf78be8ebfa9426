"""The HTTP front of the Serve application (the OpenAI-compatible ingress) and the code that builds,
deploys and runs it: `build_app`, `run_serve` (the `draftalign serve` verb) and `app_builder` (`serve run`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from draftalign.config import JobConfig
from draftalign.sampling import SamplingParams
from draftalign.tree_shapes import tree_depth, tree_spec
from serve.acceptance import draft_acceptance, per_token_acceptance
from serve.engines import ReplicaSettings
from serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    SpecDecodingStats,
    Usage,
    add_error_handling,
)
from serve.replica import EngineRequest, SpecDecodeReplica

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1  # the Retry-After of a 503 (queues full, or a replica being restarted)
REPLICA_FAILED = (RayActorError, ActorUnavailableError)  # the replica died mid-request; Serve restarts it


def _unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, None, code, "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})

_TEMPERATURE_EPS = 1e-5  # below this a request is greedy (as in vLLM)


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs: the served model's name and paths, and the limits it validates against."""

    model_name: str
    target_path: str
    draft_path: str | None
    engine: str
    gamma: int
    max_tokens_cap: int
    context: int  # prompt + completion (+ γ reserved while speculating) must fit in here
    sampling_lossless: bool = True  # False: temperature > 0 is refused (vLLM's draft-model speculation on CPU)


def context_window(target_path: str, draft_path: str | None, max_model_len: int) -> int:
    """Longest sequence the replica decodes: max_model_len capped by both models' positions."""
    from transformers import AutoConfig

    from learner.fspad import is_fspad_head

    limit = max_model_len
    for path in (target_path, draft_path):
        if path is not None and not is_fspad_head(path):  # an FSPAD head: rotary at any position
            limit = min(limit, getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", limit))
    return limit


# ====================================================================== ingress
def _aggregate(results: list[dict]) -> tuple[Usage, SpecDecodingStats]:
    """Usage and speculative statistics of one response from its prompts' replica results (summed counts).

    `rejected` is None, and with it the per-token acceptance rate, when any result lacks it (engine=vllm).
    """
    total = {k: sum(r[k] for r in results) for k in ("prompt_tokens", "completion_tokens", "rounds",
                                                      "proposed", "accepted")}
    rejected = None if any(r["rejected"] is None for r in results) else sum(r["rejected"] for r in results)
    usage = Usage(prompt_tokens=total["prompt_tokens"], completion_tokens=total["completion_tokens"],
                  total_tokens=total["prompt_tokens"] + total["completion_tokens"])
    spec = SpecDecodingStats(
        acceptance_rate=None if rejected is None else per_token_acceptance(total["accepted"], rejected),
        draft_acceptance_rate=draft_acceptance(total["accepted"], total["proposed"]),
        tokens_per_target_pass=total["completion_tokens"] / total["rounds"] if total["rounds"] else 0.0,
        proposed=total["proposed"], accepted=total["accepted"], rejected=rejected, rounds=total["rounds"],
        gamma=results[0]["gamma"], batch_size=max(r["batch_size"] for r in results))
    return usage, spec


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


api = FastAPI(title="draftalign speculative decoding", version="1")
add_error_handling(api)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OpenAIIngress:
    """Validates and tokenizes requests; fans prompts out to the replicas; shapes OpenAI replies.

    Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as SSE),
    `GET /v1/models`, `GET /health`, `GET /debug/stats` (one replica's running totals). Responses
    have the OpenAI shapes plus a `spec_decoding` object (`serve.protocol.SpecDecodingStats`). Bad
    requests get OpenAI error JSON with a 4xx status naming the field.
    """

    def __init__(self, engine: DeploymentHandle, settings: IngressSettings):
        from transformers import AutoConfig

        from draftalign.models import load_target_tokenizer

        self.engine, self.s = engine, settings
        self.tokenizer = load_target_tokenizer(settings.target_path)
        self.vocab_size = AutoConfig.from_pretrained(settings.target_path).vocab_size
        self.created = int(time.time())

    # ------------------------------------------------------------------ checks
    def _check_model(self, model: str) -> None:
        if model != self.s.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.s.model_name!r}", "model", "model_not_found")

    def _params(self, body: SamplingFields, max_tokens: int | None, prompt_len: int, field: str) -> SamplingParams:
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
        if temperature > 0 and not self.s.sampling_lossless:
            raise APIError(400, "temperature > 0 is not served by this endpoint: vLLM's draft-model speculative "
                                "decoding on CPU does not sample from the target's distribution (measured: "
                                "bench/specdec.py); use temperature 0, or serve.engine=native for lossless sampling",
                           "temperature", "unsupported_value")
        return SamplingParams(temperature=temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                              max_new_tokens=max_tokens, stop=stop, seed=body.seed)

    @staticmethod
    def _check_unsupported(body: SamplingFields) -> None:
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
        try:
            return list(await asyncio.gather(*(self.engine.generate.remote(EngineRequest(p, sp))
                                               for p, sp in zip(prompts, params, strict=True))))
        except BackPressureError:  # every replica's queue is full (serve.max_queued_requests): answer at once
            raise _unavailable("the server is overloaded: every replica's queue is full; retry later",
                               "overloaded") from None
        except REPLICA_FAILED as e:
            logger.warning("a replica failed during a request: %s", type(e).__name__)
            raise _unavailable("the replica serving this request failed and is being restarted; retry",
                               "replica_failed") from None

    def _stream(self, rid: str, kind: str, request: EngineRequest, body: SamplingFields) -> StreamingResponse:
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
            except Exception as e:  # headers are sent: report in-band (no finish_reason), then end the stream
                failed = isinstance(e, REPLICA_FAILED)
                if failed:
                    logger.warning("stream %s: its replica failed (%s)", rid, type(e).__name__)
                else:
                    logger.exception("stream %s failed", rid)
                yield _sse({"error": {"message": "the replica serving this stream failed; retry" if failed
                                      else f"generation failed: {type(e).__name__}: {e}",
                                      "type": "server_error", "param": None,
                                      "code": "replica_failed" if failed else None}})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ====================================================================== building and running
def _check_draft(target_path: str, draft_path: str, engine: str = "native") -> None:
    """Fail before deploying when the draft is missing, its tokenizer differs from the target's, it is an FSPAD
    head made for a target of another shape, or (serve.engine=vllm) no vLLM format expresses it exactly."""
    from transformers import AutoConfig

    from draftalign.models import cache_dir, load_tokenizer
    from serve.drafts import check_engine_draft
    from serve.export import export_for_vllm, read_export

    exported = read_export(draft_path)
    if engine == "vllm" and exported is not None:
        return  # already exported (`draftalign export`): vLLM loads it as it is
    if exported is not None and exported["format"] != "hf":
        raise ValueError(f"draft {draft_path} is a {exported['format']} export for vLLM: serve.engine=native decodes "
                         f"its source, {exported['source']}")
    check_engine_draft(draft_path, load_tokenizer(target_path), AutoConfig.from_pretrained(target_path))
    if engine == "vllm":
        export_for_vllm(draft_path, target_path, cache_dir() / "vllm_exports")  # the replicas reuse it on this node


def build_app(cfg: JobConfig, target_path: str, draft_path: str | None, *, torch_threads: int | None = None):
    """The Serve application: OpenAIIngress → SpecDecodeReplica ×serve.num_replicas.

        HTTP ──► OpenAIIngress (FastAPI; validates, tokenizes, applies the chat template)
                     │ DeploymentHandle: generate (batched) / generate_stream (round by round)
                     ▼
                 SpecDecodeReplica ×num_replicas (target + draft in __init__; one engine thread)

    draft_path None serves the target alone (the baseline endpoint). torch_threads defaults to
    ceil(serve.cpus_per_replica), capped by this machine's cores.
    """
    sc = cfg.serve
    if draft_path is not None:
        _check_draft(target_path, draft_path, sc.engine)
    context = context_window(target_path, draft_path, cfg.target.max_model_len)
    threads = torch_threads or max(1, min(os.cpu_count() or 1, math.ceil(sc.cpus_per_replica)))
    from actors.traffic import OnlineSettings

    online = OnlineSettings.from_config(cfg)
    if online is not None and draft_path is None:
        raise ValueError("serve.online (capture, hot-swap) needs a draft: this app serves the target alone")
    from learner.fspad import is_fspad_head

    if draft_path is not None and is_fspad_head(draft_path) and online is not None:
        raise ValueError(f"draft {draft_path} is an FSPAD head: serve.online (capture and hot-swap) is for Llama "
                         f"drafts")
    settings = ReplicaSettings(engine=sc.engine, gamma=sc.gamma, gamma_policy=sc.gamma_policy,
                               tree=tree_spec(sc.tree) if sc.tree else None, dtype=cfg.target.dtype,
                               draft_step_dtype=cfg.draft.step_dtype,
                               max_model_len=cfg.target.max_model_len, max_batch_size=sc.max_batch_size,
                               batch_wait_timeout_s=sc.batch_wait_timeout_s, torch_threads=threads,
                               kv_cache_gib=cfg.target.kv_cache_gib, use_gpu=sc.gpus_per_replica > 0,
                               online=online)
    replica = SpecDecodeReplica.options(
        num_replicas=sc.num_replicas,
        # Room for a full batch in flight plus the next one queuing, and a few streams.
        max_ongoing_requests=max(4 * sc.max_batch_size, 16),
        max_queued_requests=sc.max_queued_requests,  # past it: BackPressureError → 503 with Retry-After
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
    ).bind(target_path, draft_path, settings, context)
    ingress = IngressSettings(model_name=sc.model_name, target_path=target_path, draft_path=draft_path,
                              engine=sc.engine,
                              gamma=(tree_depth(sc.tree) if sc.tree else sc.gamma) if draft_path else 0,
                              max_tokens_cap=sc.max_tokens_cap, context=context,
                              sampling_lossless=not settings.lossy_sampling(draft_path is not None))
    return OpenAIIngress.bind(replica, ingress)


def resolve_paths(cfg: JobConfig, draft: str | None) -> tuple[str, str | None]:
    """(target path, draft path or None). draft: a path, "none" (target only) or None (default)."""
    from draftalign.models import default_draft, resolve_target

    target = resolve_target(cfg.target.model)
    if draft is not None and draft.lower() == "none":
        return target, None
    return target, str(Path(draft).expanduser().resolve()) if draft else default_draft(cfg)


def run_serve(cfg: JobConfig, draft: str | None = None, blocking: bool = True) -> str:
    """Start Ray and Serve, deploy the app and print its URL; block until Ctrl-C when `blocking`.

    Returns the base URL (…/v1) when not blocking; the caller then owns `serve.shutdown()`.
    With serve.online.learner.enabled the online learner (learner/online.py) starts next to the endpoint,
    as the named actor `learner.online.learner_name(cfg)`.
    """
    import ray

    from draftalign.runtime import init_ray

    target, draft_path = resolve_paths(cfg, draft)
    app = build_app(cfg, target, draft_path)  # checks the draft before Ray starts
    init_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name="draftalign", route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    shape = f"tree {cfg.serve.tree}" if cfg.serve.tree else f"gamma {cfg.serve.gamma} ({cfg.serve.gamma_policy})"
    mode = f"draft {draft_path}, {shape}" if draft_path else "target only"
    print(f"serving {cfg.serve.model_name} ({cfg.serve.engine}: target {target}, {mode}) at {url}",
          flush=True)
    learner_run = None
    if cfg.serve.online.learner.enabled:  # trains on the captured rounds, publishes to serve.online.weight_store
        from learner.online import learner_name, start_online_learner

        _, learner_run = start_online_learner(cfg, draft_path)
        lo = cfg.serve.online.learner
        print(f"online learner {learner_name(cfg)}: {lo.records_per_step} served requests per step, replay "
              f"{lo.replay_fraction:.0%}, a version every {lo.steps_per_publish} steps to "
              f"{cfg.serve.online.weight_store}", flush=True)
    if not blocking:
        return url

    def _interrupt(signum, frame):  # `kill PID` and job managers: shut down like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1)
            if learner_run is not None and ray.wait([learner_run], timeout=0)[0]:
                try:  # the endpoint keeps serving (with its last draft) whatever the learner did
                    print(f"online learner stopped at step {ray.get(learner_run)['step']}", flush=True)
                except Exception as e:  # noqa: BLE001 - reported, not fatal to serving
                    print(f"online learner failed: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
                learner_run = None
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
