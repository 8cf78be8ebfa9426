"""`draftalign launch`: submit a verb of a job YAML to a Ray cluster through the Ray Jobs API.

The project directory ships as the job's working dir (runtime env), the job YAML is part of it,
and the driver runs `<python> -m draftalign.cli <verb> <job> --set cluster.address=auto` on the
head node; it prints the job id, the dashboard URL and how to follow the logs, then streams the
logs until the job ends (unless told not to wait).

The driver runs in the cluster's Python environment, found on the head node, not through PATH
(the Ray job supervisor's PATH is the raylet's, where `python` may be any interpreter). In order:
`$DRAFTALIGN_PYTHON` (set it in the image or the runtime env's env_vars), `$VIRTUAL_ENV` or
`$CONDA_PREFIX` (set by the image, or by a pip / uv / conda runtime env, whose activation Ray runs
before the entrypoint), else the interpreter Ray itself runs on: the environment whose
site-packages the job supervisor (the entrypoint's parent process) loaded Ray from.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

EXCLUDES = [".venv", ".cache", "runs", ".git", "**/__pycache__", "bench/results", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# POSIX sh, run by the job supervisor on the head node: sets PY to the cluster environment's Python.
# $PPID of the entrypoint's shell is the job supervisor, a Ray worker running on that Python.
FIND_PYTHON = (
    'PY="$DRAFTALIGN_PYTHON"; '
    'RAYENV="$(sed -n \'s#^.* \\(/.*\\)/lib/python3[^/]*/site-packages/ray/.*$#\\1#p\' /proc/$PPID/maps 2>/dev/null'
    ' | head -n 1)"; '
    'for d in "$VIRTUAL_ENV" "$CONDA_PREFIX" "$RAYENV"; do '
    '[ -z "$PY" ] && [ -n "$d" ] && [ -x "$d/bin/python" ] && PY="$d/bin/python"; done; '
    '[ -n "$PY" ] || PY="$(readlink -f /proc/$PPID/exe)"; '
)


def entrypoint(job: str, verb: str, overrides: list[str]) -> str:
    """The job's shell command: the cluster's Python (see the module docstring) runs the draftalign CLI."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in ["cluster.address=auto", *overrides])
    return (f'{FIND_PYTHON}echo "draftalign launch: driver python $PY"; '
            f'exec "$PY" -m draftalign.cli {verb} {shlex.quote(job)} {sets}')


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
    command = entrypoint(_relative_job(job, root), verb, list(overrides or []))
    client = JobSubmissionClient(address)
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=command,
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


def dashboard_url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def announce(job_id: str, address: str) -> str:
    """What to tell the user once the job is submitted: its id, the dashboard, the log and stop commands."""
    url = dashboard_url(address).rstrip("/")
    return (f"submitted job {job_id}\n"
            f"  dashboard:   {url}/#/jobs/{job_id}\n"
            f"  follow logs: ray job logs --follow --address {url} {job_id}\n"
            f"  status:      ray job status --address {url} {job_id}\n"
            f"  stop:        ray job stop --address {url} {job_id}")


def launch(job: Path, address: str, verb: str = "run", overrides: list[str] | None = None,
           timeout_s: float | None = None, follow: bool = True) -> int:
    """Submit, print where to watch it, stream the logs, and return 0 when the job succeeded (1 otherwise).

    With follow=False it returns 0 right after submitting."""
    client, job_id = submit(job, address, verb, overrides)
    print(announce(job_id, address), flush=True)
    if not follow:
        return 0
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
