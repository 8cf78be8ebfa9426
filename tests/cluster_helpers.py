"""Ray for the tests: `serving` (a Serve app on a local Ray, torn down after), and a real multi-node Ray cluster on
this machine for the launch and shared-storage tests: a head (`ray start
--head`, dashboard = Jobs API) and a second node with its own custom resource `node_b`, each `ray start --block` in
its own working directory, stopped by pid (never by name: other Ray instances may run on this machine)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.clients import free_port  # noqa: E402  (re-exported for the tests)

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def serving(cfg, draft: str | None = None):
    """`run_serve(cfg, draft)` on this process's own local Ray; yields the /v1 URL; shuts Serve and Ray down after."""
    import ray
    from ray import serve

    from serve.app import run_serve

    try:
        yield run_serve(cfg, draft=draft, blocking=False)
    finally:
        serve.shutdown()
        ray.shutdown()


def cluster_env() -> dict[str, str]:
    # Token auth switches itself on when ~/.ray/auth_token exists; this local cluster runs without it.
    # PATH is left as it is (the venv not on it, unless the caller put it there): the job's driver must find
    # the cluster's Python without it.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "DRAFTALIGN_PYTHON")}
    return {**env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def stop_nodes(procs: list[subprocess.Popen]) -> None:
    """Stop the `ray start --block` processes this test started, and every process below them, by pid."""
    import psutil

    tree = []
    for p in procs:
        try:
            tree += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in reversed(procs):  # `ray start --block` shuts its node down on SIGTERM
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    _, alive = psutil.wait_procs(tree, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@contextlib.contextmanager
def two_node_cluster(tmp_path: Path, head_cwd: Path | None = None, node_cwd: Path | None = None):
    """Yields (dashboard URL, GCS address) of a head (1 CPU, resource head_node) and node_b (2 CPUs)."""
    from ray.util.state import list_nodes

    port, dash = free_port(), free_port()
    temp = Path("/tmp") / f"ray_launch_{os.getpid()}"
    env = cluster_env()

    def common() -> list[str]:
        # Two nodes on one machine: every per-node agent port must be distinct (and free of other
        # Ray instances on this machine), or a node's job agent fails to bind and jobs cannot start.
        return ["--block", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]

    def start(args: list[str], name: str, cwd: Path | None) -> subprocess.Popen:
        # --block keeps `ray start` in the foreground with the node's processes below it, so the teardown
        # stops exactly those (never `ray stop` or a kill by name: other Ray instances may run on this machine).
        log = open(tmp_path / f"{name}.log", "w")
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([str(BIN / "ray"), "start", *args, *common()], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)

    procs = [start(["--head", f"--port={port}", "--num-cpus=1", '--resources={"head_node": 1}',
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--temp-dir={temp}"], "head", head_cwd)]
    try:
        address = f"http://127.0.0.1:{dash}"
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        deadline = time.time() + 180
        while True:  # the head's GCS and dashboard first, then the second node joins
            assert all(p.poll() is None for p in procs), (tmp_path / "head.log").read_text()[-3000:]
            try:
                alive = [n for n in list_nodes(address=address) if n.state == "ALIVE"]
            except Exception:
                alive = []
            if len(procs) == 1 and alive:
                procs.append(start([f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"node_b": 1}'],
                                   "node_b", node_cwd))
            if len(alive) == 2:
                break
            assert time.time() < deadline, "the two-node cluster did not come up"
            time.sleep(2)
        yield address, f"127.0.0.1:{port}"
    finally:
        stop_nodes(procs)
