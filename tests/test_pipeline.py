"""`draftalign run` end to end on tiny models: killed during generation, rerun, completed.

One scenario (it is the expensive one): the CLI runs the whole job in a subprocess; as soon as the
first distillation shard is on disk the whole process group is SIGKILLed; the rerun skips the
finished shards, finishes the set and the remaining stages. Then: every prompt id exactly once,
both eval files in the foundation's schema, the report, and a third run that skips everything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = {"n_prompts", "acceptance_rate", "block_efficiency", "expected_block_efficiency", "cost_ratio_c",
             "target_tokens_per_s", "spec_tokens_per_s", "speedup"}


def _job(tmp: Path, target: str) -> Path:
    job = {
        "name": "pipe", "run_dir": str(tmp / "run"), "seed": 1,
        "target": {"model": target, "dtype": "float32", "max_model_len": 512, "cpus_per_engine": 0.5},
        "draft": {"arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}},
        "pretrain": {"max_steps": 6, "batch_size": 4, "seq_len": 64, "checkpoint_every": 3, "warmup_steps": 1},
        "generate": {"num_prompts": 48, "shard_size": 6, "max_tokens": 16},
        "rollout": {"num_actors": 1, "cpus_per_actor": 0.5, "max_new_tokens": 8, "batch_size": 4},
        "learner": {"max_steps": 6, "checkpoint_every": 3, "sync_every": 2, "warmup_steps": 1},
        "eval": {"tasks": ["chat", "code", "summarize"], "prompts_per_task": 2, "max_new_tokens": 8,
                 "sampled": {"temperature": 1.0, "tasks": ["chat"], "gamma": [2]}},
        "cluster": {"nodes": [{"cpus": 2}]},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _cli(job: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "draftalign.cli", "run", str(job)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_killed_during_generation_then_rerun_completes(tmp_path, tiny_target_path):
    job = _job(tmp_path, tiny_target_path)
    run = tmp_path / "run"
    shards = run / "distill_set"

    proc = _cli(job, tmp_path / "first.log")
    deadline = time.time() + 600
    while not list(shards.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "pretrain_done.json").exists() and not (run / "distill_set" / "metadata.json").exists()

    second = _cli(job, tmp_path / "second.log")
    assert second.wait(timeout=800) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()
    reused = re.search(r"\((\d+) reused\)", log)
    assert reused and int(reused.group(1)) >= 1, log[-3000:]  # generation continued from the finished shards

    from draftalign.distset import load_distill_set

    rows = load_distill_set(run)
    ids = Counter(r["prompt_id"] for r in rows)
    meta = json.loads((shards / "metadata.json").read_text())
    assert ids and max(ids.values()) == 1, "a prompt id was generated twice"
    assert len(ids) == meta["num_prompts"] == len(rows)

    for name in ("eval_pretrained.json", "eval_distilled.json"):
        ev = json.loads((run / name).read_text())
        assert set(ev["tasks"]) == {"chat", "code", "summarize"}
        assert EVAL_KEYS <= set(ev["overall"]) and ev["lossless_greedy"]["mismatches"] == 0
    pre, post = (json.loads((run / n).read_text()) for n in ("eval_pretrained.json", "eval_distilled.json"))
    assert post["target_only"] == pre["target_only"]  # one interleaved target-only arm for both drafts
    assert pre["interleaved_with"] == post["interleaved_with"] == ["pretrained@3", "distilled@3"]
    for name in ("eval_pretrained_t1.json", "eval_distilled_t1.json"):  # eval.sampled: its own interleaved run
        ev = json.loads((run / name).read_text())
        assert ev["temperature"] == 1.0 and set(ev["tasks"]) == {"chat"} and ev["gamma"] == 2
        assert EVAL_KEYS <= set(ev["overall"]) and ev["interleaved_with"] == ["pretrained@2", "distilled@2"]
    report = (run / "report.md").read_text()
    assert "(γ = 2, T = 1)" in report and "Sampled at T = 1" in report
    assert (run / "report.png").stat().st_size > 0
    assert (run / "draft_distilled" / "config.json").is_file()

    third = subprocess.run([sys.executable, "-m", "draftalign.cli", "run", str(job)], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    for stage in ("generate", "pretrain", "distill", "eval", "eval at T = 1"):
        assert f"[run] {stage}: complete" in third.stdout


def test_report_headline_is_at_the_served_gamma(tmp_path):
    from draftalign.report import headline_gamma

    ev = {"gamma": 1, "by_gamma": {"1": {}, "3": {}, "5": {}}}
    (tmp_path / "job.json").write_text(json.dumps({"serve": {"gamma": 3}}))
    assert headline_gamma(tmp_path, {"pretrained": ev, "distilled": ev}) == 3
    (tmp_path / "job.json").write_text(json.dumps({"serve": {"gamma": 4}}))  # not measured: the first γ
    assert headline_gamma(tmp_path, {"pretrained": ev, "distilled": ev}) == 1
