"""`draftalign launch` against a real two-node Ray cluster on this machine.

A head (`ray start --head`, dashboard = Jobs API) and a second node process with its own custom
resource `node_b`. The job asks for `target.resources: {node_b: 1}`; the Ray state API then shows
that the TargetActor ran on node_b and nowhere else, and the distillation set was written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # Token auth switches itself on when ~/.ray/auth_token exists; this local cluster runs without it.
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": str(ROOT)}


@pytest.fixture
def two_node_cluster(tmp_path):
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray_launch_{os.getpid()}"
    env = _env()

    def common() -> list[str]:
        # Two nodes on one machine: every per-node agent port must be distinct (and free of other
        # Ray instances on this machine), or a node's job agent fails to bind and jobs cannot start.
        return ["--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}"]
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
                    '--resources={"head_node": 1}', "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--temp-dir={temp}", *common()],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                        '--resources={"node_b": 1}', *common()], check=True, env=env, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        # `ray stop` would also stop other Ray instances of this machine: kill only this cluster's processes.
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)
        subprocess.run(["pkill", "-9", "-f", f":{port}"], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_launch_places_target_actor_on_the_node_its_resources_name(two_node_cluster, tmp_path, tiny_target_path):
    from ray.util.state import list_actors, list_nodes

    run = tmp_path / "run"
    job = {"name": "launch-test", "run_dir": str(run), "seed": 0,
           "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 256, "num_engines": 1,
                      "cpus_per_engine": 1, "resources": {"node_b": 1}},
           "generate": {"num_prompts": 8, "shard_size": 4, "max_tokens": 8},
           "rollout": {"cpus_per_actor": 0.5}, "learner": {"cpus_per_worker": 0.5},
           "cluster": {"nodes": [{"cpus": 1, "resources": {"head_node": 1}}, {"cpus": 2, "resources": {"node_b": 1}}]}}
    # Inside the project so it ships with the working dir (Ray skips .gitignored files: not ignored).
    job_path = ROOT / "tests" / f"_launch_job_{os.getpid()}.yaml"
    job_path.write_text(yaml.safe_dump(job))
    try:
        r = subprocess.run([sys.executable, "-m", "draftalign.cli", "launch", str(job_path), "--address",
                            two_node_cluster, "--verb", "generate"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=540)
    finally:
        job_path.unlink(missing_ok=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "SUCCEEDED" in r.stdout and "generate: 8 prompts" in r.stdout  # logs streamed back

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    nodes = list_nodes(address=two_node_cluster, detail=True)
    node_b = [n.node_id for n in nodes if "node_b" in (n.resources_total or {})]
    assert len(nodes) == 2 and len(node_b) == 1
    engines = list_actors(address=two_node_cluster, filters=[("class_name", "=", "TargetEngine")], detail=True)
    assert engines and {a.node_id for a in engines} == set(node_b)
    meta = json.loads((run / "distill_set" / "metadata.json").read_text())
    assert meta["num_prompts"] == 8


def test_launch_refuses_a_job_outside_the_project(tmp_path):
    from draftalign.launch import submit

    with pytest.raises(FileNotFoundError, match="inside the project directory"):
        submit(tmp_path / "job.yaml", "http://127.0.0.1:1", root=ROOT)
