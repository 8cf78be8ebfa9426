"""What the serving benches share: a free loopback port, Serve's quiet logging, and the load clients.

`run_clients` sends chat completions from concurrent async openai clients, client i sending the prompts
`assignment[i]` one after another (greedy, fixed max_tokens); a failed request is a record with its error, not
an exception — failures are a result the benches report.
"""

from __future__ import annotations

import asyncio
import socket
import time

QUIET = {"enable_access_log": False}  # the benches print their own tables; Serve's access log is noise there


def free_port() -> int:
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
