"""`draftalign launch`: submit a verb of a job YAML to a Ray cluster through the Ray Jobs API.

The project directory ships as the job's working dir (runtime env), the job YAML is part of it,
and the driver runs `python -m draftalign.cli <verb> <job> --set cluster.address=auto` on the
head node; logs stream back until the job ends.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

EXCLUDES = [".venv", ".cache", "runs", ".git", "**/__pycache__", "bench/results", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _relative_job(job: Path, root: Path) -> str:
    try:
        return str(job.resolve().relative_to(root))
    except ValueError:
        raise FileNotFoundError(f"job YAML {job} must live inside the project directory {root} "
                                f"(it ships as the job's working dir)") from None


def submit(job: Path, address: str, verb: str = "run", overrides: list[str] | None = None,
           root: Path | None = None, env_vars: dict[str, str] | None = None) -> tuple[object, str]:
    """Submit and return (client, submission id) without waiting."""
    from ray.job_submission import JobSubmissionClient

    root = (root or Path.cwd()).resolve()
    sets = " ".join(f"--set {shlex.quote(o)}" for o in ["cluster.address=auto", *(overrides or [])])
    entrypoint = f"python -m draftalign.cli {verb} {shlex.quote(_relative_job(job, root))} {sets}"
    client = JobSubmissionClient(address)
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint,
                                       runtime_env={"working_dir": str(root), "excludes": EXCLUDES,
                                                    "env_vars": env_vars or {}},
                                       metadata={"draftalign_job": str(job), "verb": verb})
            return client, job_id
        except RuntimeError as e:  # a freshly started head has no job agent for a few seconds
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def launch(job: Path, address: str, verb: str = "run", overrides: list[str] | None = None,
           timeout_s: float | None = None) -> int:
    """Submit, stream the logs, and return 0 when the job succeeded (1 otherwise)."""
    client, job_id = submit(job, address, verb, overrides)
    print(f"submitted {job_id} to {address}", flush=True)
    try:
        asyncio.run(asyncio.wait_for(_tail(client, job_id), timeout_s))
    except (TimeoutError, RuntimeError):
        pass
    deadline = time.time() + 30
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(job_id))
    status = status.split(".")[-1]
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
