"""Replica failure bench (issue #37): how long until a Ray Serve endpoint answers again after its replica is killed
mid-stream under concurrent streaming clients, and what those clients saw. Used by tests/test_replica_failure.py.

    .venv/bin/python bench/replica_failure.py --target T --draft D [--trials 3] --out F.json

Per trial: CLIENTS streamed completions start; once every one is mid-stream the replica process is SIGKILLed (by
its pid, from the GCS actor table); each stream must end with [DONE] after either its finish_reason or an error
event; then one small request per second until a 200 — recovery time is kill → that 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clients import free_port  # noqa: E402

CLIENTS = 8
RECOVERY_LIMIT_S = 180.0


async def _stream(http: httpx.AsyncClient, i: int, started: asyncio.Event, count: list[int], clients: int) -> dict:
    """One streamed completion → {"text", "finish_reason", "error", "done"}."""
    out = {"text": "", "finish_reason": None, "error": None, "done": False}
    body = {"model": "draftalign", "prompt": f"Story {i}: once upon a time", "max_tokens": 200, "temperature": 0,
            "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                out["done"] = True
                break
            ev = json.loads(data)
            if "error" in ev:
                out["error"] = ev["error"]
                continue
            ch = ev["choices"][0] if ev["choices"] else {}
            out["text"] += ch.get("text", "")
            if ch.get("finish_reason"):
                out["finish_reason"] = ch["finish_reason"]
            if out["text"] and not out.get("counted"):
                out["counted"] = True
                count[0] += 1
                if count[0] == clients:
                    started.set()
    return out


def _kill_replica() -> int:
    from ray._private.state import actors  # the GCS's actor table: no dashboard needed

    replicas = [a for a in actors().values()
                if a["State"] == "ALIVE" and a["ActorClassName"].endswith("SpecDecodeReplica")]
    assert len(replicas) == 1, [a["ActorClassName"] for a in replicas]
    os.kill(replicas[0]["Pid"], signal.SIGKILL)  # the replica this test's Serve app started, by its pid
    return replicas[0]["Pid"]


async def scenario(root: str, clients: int = CLIENTS) -> dict:
    """One trial against the endpoint at `root` (module docstring): {"killed_pid", "streams", "recovery_s"}."""
    started, count = asyncio.Event(), [0]
    async with httpx.AsyncClient(base_url=root, timeout=120) as http:
        tasks = [asyncio.create_task(_stream(http, i, started, count, clients)) for i in range(clients)]
        await asyncio.wait_for(started.wait(), timeout=180)  # every client is mid-stream
        killed = _kill_replica()
        t0 = time.perf_counter()
        streams = await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)  # never a hang
        recovered, statuses = None, []
        while time.perf_counter() - t0 < RECOVERY_LIMIT_S:
            r = await http.post("/v1/completions", json={"model": "draftalign", "prompt": "Hi", "max_tokens": 4,
                                                         "temperature": 0})
            statuses.append(r.status_code)
            if r.status_code == 200:
                recovered = time.perf_counter() - t0
                break
            await asyncio.sleep(1.0)
    return {"killed_pid": killed, "streams": streams, "recovery_s": recovered, "statuses_while_down": statuses}


def main() -> None:
    import ray
    from ray import serve

    from draftalign.config import JobConfig
    from draftalign.evaluate import machine
    from draftalign.io import write_json_atomic
    from serve.app import run_serve

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default="runs/bench/replica_failure.json")
    a = ap.parse_args()
    trials = []
    for _ in range(a.trials):
        cfg = JobConfig.model_validate({
            "target": {"model": a.target, "dtype": "float32", "max_model_len": 512},
            "serve": {"port": free_port(), "gamma": 2, "cpus_per_replica": 1, "max_batch_size": 8,
                      "max_tokens_cap": 256}})
        try:
            url = run_serve(cfg, draft=a.draft, blocking=False)
            t = asyncio.run(scenario(url.removesuffix("/v1")))
        finally:
            serve.shutdown()
            ray.shutdown()
        errors = sum(bool(r["error"]) for r in t["streams"])
        print(f"trial {len(trials) + 1}: {errors} of {CLIENTS} streams ended with an error event, "
              f"{CLIENTS - errors} complete; served again {t['recovery_s']:.1f} s after the kill", flush=True)
        trials.append({"recovery_s": t["recovery_s"], "streams_errored": errors, "streams_complete": CLIENTS - errors,
                       "statuses_while_down": t["statuses_while_down"]})
    write_json_atomic(a.out, {"clients": CLIENTS, "trials": trials, "machine": machine()})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
