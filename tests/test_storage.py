"""Storage a cluster shares (issue #33): on a real two-node Ray cluster whose nodes and driver run from three
different working directories, a job with `storage_path` outside all of them writes everything there — the
learner worker on the other node included — and, with its driver and learner killed mid-stage, resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_helpers import ROOT, cluster_env, two_node_cluster


def _pretrain(job: Path, cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "draftalign.cli", "pretrain", str(job), *extra], cwd=cwd,
                            env=cluster_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_the_run_dir_is_resolved_by_the_driver(tmp_path, monkeypatch):
    from draftalign.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage_path=shared", "name=job"])
    assert cfg.run_dir == str(tmp_path / "shared" / "job")  # absolute: workers elsewhere see the same path
    assert cfg.model_copy().run_path == tmp_path / "shared" / "job"
    with pytest.raises(ConfigError, match="object-store URIs are not supported yet"):
        load_config(None, ["storage_path=s3://bucket/draftalign"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_write_only_to_shared_storage_and_resume_after_a_kill(tmp_path, tiny_target_path):
    from ray.util.state import list_actors, list_nodes

    head_cwd, node_cwd, driver_cwd, shared = (tmp_path / d for d in ("head", "node", "driver", "shared"))
    driver_cwd.mkdir()
    with two_node_cluster(tmp_path, head_cwd=head_cwd, node_cwd=node_cwd) as (dashboard, gcs):
        job = {"name": "shared-job", "storage_path": str(shared), "seed": 0,
               "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 256},
               "draft": {"arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}},
               "pretrain": {"corpus": ["embedded:chitchat"], "max_steps": 8, "checkpoint_every": 2, "batch_size": 4,
                            "seq_len": 64, "warmup_steps": 1, "cpus_per_worker": 1},
               "learner": {"resources": {"node_b": 1}},  # the stage's Ray Train worker runs on the other node
               "cluster": {"address": gcs, "nodes": [{"cpus": 1, "resources": {"head_node": 1}},
                                                     {"cpus": 2, "resources": {"node_b": 1}}]}}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        run = shared / "shared-job"

        first = _pretrain(path, driver_cwd, tmp_path / "first.log")
        deadline = time.time() + 420
        while not list(run.glob("ray_results/pretrain/checkpoint_*")) and first.poll() is None:
            assert time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # the driver, and with it the job's learner on node_b
        first.wait()
        assert not (run / "pretrain_done.json").exists()

        second = _pretrain(path, driver_cwd, tmp_path / "second.log", "--resume")
        assert second.wait(timeout=420) == 0, (tmp_path / "second.log").read_text()[-4000:]
        log = (tmp_path / "second.log").read_text()
        assert "resuming from" in log, log[-3000:]

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        nodes = list_nodes(address=dashboard, detail=True)
        node_b = {n.node_id for n in nodes if "node_b" in (n.resources_total or {})}
        workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        assert workers and {a.node_id for a in workers} == node_b

    assert json.loads((run / "pretrain_done.json").read_text())["steps"] == 8
    assert (run / "draft_pretrained" / "config.json").is_file()
    for cwd in (head_cwd, node_cwd, driver_cwd):  # nothing landed in any process's working directory
        assert not [p for p in cwd.rglob("*") if p.is_file()], f"files under {cwd}"
    assert not (ROOT / "runs" / "shared-job").exists()
