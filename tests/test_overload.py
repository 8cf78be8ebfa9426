"""Overload (issue #37): past serve.max_queued_requests the endpoint answers 503 with Retry-After at once, and the
requests it accepted still complete. Real Ray Serve on 127.0.0.1, tiny models, concurrent real HTTP clients."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from cluster_helpers import free_port, serving

CONCURRENT = 40  # > max_ongoing_requests (16) + max_queued_requests (1): some must be turned away
MAX_TOKENS = 48


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_past_the_queue_limit_503_with_retry_after_and_accepted_requests_complete(tiny_target_path,
                                                                                   tiny_draft_path):
    from draftalign.config import JobConfig

    cfg = JobConfig.model_validate({
        "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 256},
        "serve": {"port": free_port(), "gamma": 2, "cpus_per_replica": 1, "max_batch_size": 1,
                  "max_queued_requests": 1, "model_name": "draftalign"}})

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, float, dict, dict]:
        t0 = time.perf_counter()
        r = await http.post("/v1/completions", json={"model": "draftalign", "prompt": f"Story {i}: once upon a time",
                                                     "max_tokens": MAX_TOKENS, "temperature": 0})
        return r.status_code, time.perf_counter() - t0, dict(r.headers), r.json()

    async def burst(root: str):
        async with httpx.AsyncClient(base_url=root, timeout=300) as http:
            return await asyncio.gather(*(one(http, i) for i in range(CONCURRENT)))

    with serving(cfg, tiny_draft_path) as url:
        results = asyncio.run(asyncio.wait_for(burst(url.removesuffix("/v1")), timeout=480))
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(ok) + len(busy) == CONCURRENT, [r[0] for r in results]
    assert busy and ok
    for _, seconds, headers, body in busy:
        assert headers.get("retry-after") == "1" and body["error"]["code"] == "overloaded"
        assert seconds < min(s for _, s, _, _ in ok)  # turned away at once, before any accepted one finished
    for _, _, _, body in ok:  # accepted requests complete: a whole answer with its finish reason
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("length", "stop") and body["usage"]["completion_tokens"] >= 1
        assert choice["finish_reason"] == "stop" or body["usage"]["completion_tokens"] == MAX_TOKENS


def test_free_port_is_outside_the_ranges_ray_and_the_kernel_hand_out():
    """A Serve port picked before Ray starts must not be one Ray's own processes can take first: CI once lost a
    whole module to 'Failed to bind to address' on a port from the kernel's ephemeral range."""
    from bench.clients import RAY_WORKER_PORTS, _ephemeral_ports

    ports = [free_port() for _ in range(50)]
    assert not any(p in _ephemeral_ports() or p in RAY_WORKER_PORTS for p in ports), ports
    assert len(set(ports)) > 1  # random, so concurrent callers rarely meet
