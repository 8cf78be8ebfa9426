"""`draftalign launch` against a real two-node Ray cluster on this machine.

A head (`ray start --head`, dashboard = Jobs API) and a second node process with its own custom
resource `node_b`. The job asks for `target.resources: {node_b: 1}`; the Ray state API then shows
that the TargetActor ran on node_b and nowhere else, and the distillation set was written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from cluster_helpers import BIN, ROOT, cluster_env
from cluster_helpers import two_node_cluster as two_nodes


@pytest.fixture
def two_node_cluster(tmp_path):
    with two_nodes(tmp_path) as (dashboard, _):
        yield dashboard


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
                            two_node_cluster, "--verb", "generate"], cwd=ROOT, env=cluster_env(), capture_output=True,
                           text=True, timeout=540)
    finally:
        job_path.unlink(missing_ok=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "SUCCEEDED" in r.stdout and "generate: 8 prompts" in r.stdout  # logs streamed back
    # Where to watch it, and the driver ran on the cluster's Python (this venv), found without PATH.
    assert f"dashboard:   {two_node_cluster}/#/jobs/raysubmit_" in r.stdout
    assert f"follow logs: ray job logs --follow --address {two_node_cluster} raysubmit_" in r.stdout
    drivers = re.findall(r"draftalign launch: driver python (/\S+)", r.stdout)  # the job's line, not its command
    assert drivers and all(same_file(d, BIN / "python") for d in drivers), drivers

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


def _find_python(env: dict[str, str]) -> str:
    # The entrypoint's parent is a Python process that imported Ray, as the job supervisor is.
    code = ("import subprocess, sys, ray; from draftalign.launch import FIND_PYTHON; "
            "print(subprocess.run(FIND_PYTHON + 'echo $PY', shell=True, capture_output=True, text=True).stdout)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def same_file(a, b) -> bool:
    """The same interpreter, however reached: a venv may be a symlink (the maps read the resolved path)."""
    return os.path.realpath(a) == os.path.realpath(b)


def test_the_entrypoint_finds_the_python_ray_runs_on_without_path():
    env = {**cluster_env(), "PATH": "/usr/bin:/bin"}  # no venv on PATH
    assert same_file(_find_python(env), BIN / "python")
    assert same_file(_find_python({**env, "VIRTUAL_ENV": str(BIN.parent)}), BIN / "python")
    assert _find_python({**env, "DRAFTALIGN_PYTHON": "/opt/elsewhere/python"}) == "/opt/elsewhere/python"


def test_launch_prints_the_job_id_dashboard_and_log_command():
    from draftalign.launch import announce, entrypoint

    text = announce("raysubmit_X", "http://head:8265/")
    assert "submitted job raysubmit_X" in text and "http://head:8265/#/jobs/raysubmit_X" in text
    assert "ray job logs --follow --address http://head:8265 raysubmit_X" in text
    cmd = entrypoint("cluster/jobs/a b.yaml", "eval", ["eval.gamma=[3]"])
    assert cmd.endswith("""exec "$PY" -m draftalign.cli eval 'cluster/jobs/a b.yaml' --set cluster.address=auto """
                        """--set 'eval.gamma=[3]'""")
    assert "python -m" not in cmd  # no interpreter taken from PATH
