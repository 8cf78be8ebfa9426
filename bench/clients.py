"""What the serving benches share: a free loopback port, Serve's quiet logging, and the load clients.

`run_clients` sends chat completions from concurrent async openai clients, client i sending the prompts
`assignment[i]` one after another (greedy, fixed max_tokens); a failed request is a record with its error, not
an exception — failures are a result the benches report.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

QUIET = {"enable_access_log": False}  # the benches print their own tables; Serve's access log is noise there


# Ray's processes bind ports after a test picks one: its workers take 10002-19999 (Ray's default
# min/max_worker_port) and its raylet, object manager, agents and gRPC servers take ports from the kernel's
# ephemeral range. A port picked from either can be taken before Serve binds it ("Failed to bind to address",
# CI, 27 errors), so free ports are drawn from neither.
RAY_WORKER_PORTS = range(10002, 20000)


def _ephemeral_ports() -> range:
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port() -> int:
    """A loopback port free now and outside the ranges Ray or the kernel hand out by themselves (a random one,
    so concurrent callers rarely meet); the kernel's pick where no such range is left."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in range(20000, 65536) if p not in ephemeral and p not in RAY_WORKER_PORTS]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_clients(url: str, model: str, prompts: list[list[dict]], assignment: list[list[int]],
                      max_tokens: int, timeout: float = 900) -> dict:
    """{"wall_s", "records"}: one record per request, {"prompt", "latency_s", "text", "completion_tokens", and the
    response's `spec_decoding` fields} or {"prompt", "error"}, in client order."""
    from openai import AsyncOpenAI

    async def one(ks: list[int]) -> list[dict]:
        c = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout)
        out = []
        try:
            for k in ks:
                t0 = time.perf_counter()
                try:
                    r = await c.chat.completions.create(model=model, messages=prompts[k], max_tokens=max_tokens,
                                                        temperature=0)
                except Exception as e:  # counted: failed requests are a result
                    out.append({"prompt": k, "error": f"{type(e).__name__}: {e}"})
                    continue
                out.append({"prompt": k, "latency_s": time.perf_counter() - t0, "text": r.choices[0].message.content,
                            "completion_tokens": r.usage.completion_tokens, **r.model_extra["spec_decoding"]})
        finally:
            await c.close()
        return out

    t0 = time.perf_counter()
    per = await asyncio.gather(*(one(ks) for ks in assignment))
    return {"wall_s": time.perf_counter() - t0, "records": [r for rs in per for r in rs]}
