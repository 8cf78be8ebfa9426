"""`draftalign run` end to end on tiny models, bring-your-own: killed during generation, rerun, completed, served.

One scenario (it is the expensive one, and it carries issue #33's path too): a user's ShareGPT JSONL export and a
local HF target directory, with nothing but a job YAML (data.train and eval task "mine" on the export, a held-out
split, pretraining on the distillation set). The CLI runs the whole job in a subprocess; as soon as the first
distillation shard is on disk the whole process group is SIGKILLed; the rerun skips the finished shards, finishes
the set and the remaining stages. Then: every prompt id exactly once and only the user's, the eval task reading only
held-out conversations, both eval files in the foundation's schema (the user's task beside a packaged one), the
sampled eval at T = 1, the report, a third run that skips everything, and the trained draft served to the `openai`
client.
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
from cluster_helpers import free_port, serving

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = {"n_prompts", "acceptance_rate", "block_efficiency", "expected_block_efficiency", "cost_ratio_c",
             "target_tokens_per_s", "spec_tokens_per_s", "speedup"}


def _user_export(path: Path, n: int) -> Path:
    """Conversations in ShareGPT form, as a user would export them (here: packaged chitchat, system prompt added)."""
    from draftalign.data import chitchat_conversations

    lines = []
    for _, turns in chitchat_conversations("train")[:n]:
        conv = [{"from": "system", "value": "You are a friendly assistant."}]
        conv += [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns[:4])]
        lines.append(json.dumps({"conversations": conv}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _job(tmp: Path, target: str) -> Path:
    export = _user_export(tmp / "my_chats.jsonl", 60)
    job = {
        "name": "pipe", "run_dir": str(tmp / "run"), "seed": 1,
        "target": {"model": target, "dtype": "float32", "max_model_len": 512, "cpus_per_engine": 0.5},
        "draft": {"arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}},
        "data": {"train": [str(export)], "eval": {"mine": str(export)}, "holdout": 0.2},
        "pretrain": {"corpus": ["run:distill_set"], "max_steps": 4, "batch_size": 4, "seq_len": 64,
                     "checkpoint_every": 2, "warmup_steps": 1},
        "generate": {"num_prompts": 48, "shard_size": 8, "max_tokens": 16},  # 6 shards: the kill lands between
        "rollout": {"num_actors": 1, "cpus_per_actor": 0.5, "max_new_tokens": 8, "batch_size": 4},
        "learner": {"max_steps": 4, "checkpoint_every": 2, "sync_every": 2, "warmup_steps": 1},
        "eval": {"tasks": ["mine", "chat"], "prompts_per_task": {"mine": 3, "chat": 2}, "max_new_tokens": 8,
                 "sampled": {"temperature": 1.0, "tasks": ["mine"], "gamma": [2]}},
        "serve": {"port": free_port(), "gamma": 2, "cpus_per_replica": 1},
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
@pytest.mark.timeout(1200)
def test_user_jsonl_run_killed_during_generation_then_rerun_completes_and_serves(tmp_path, tiny_target_path):
    job = _job(tmp_path, tiny_target_path)
    run = tmp_path / "run"
    shards = run / "distill_set"

    proc = _cli(job, tmp_path / "first.log")
    deadline = time.time() + 600
    while not list(shards.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "pretrain_done.json").exists() and not (run / "distill_set" / "metadata.json").exists()

    second = _cli(job, tmp_path / "second.log")
    assert second.wait(timeout=800) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()
    reused = re.search(r"\((\d+) reused\)", log)
    assert reused and int(reused.group(1)) >= 1, log[-3000:]  # generation continued from the finished shards

    from draftalign.config import load_config
    from draftalign.distset import load_distill_set
    from draftalign.sources import eval_prompts

    cfg = load_config(job)
    rows = load_distill_set(run)
    ids = Counter(r["prompt_id"] for r in rows)
    meta = json.loads((shards / "metadata.json").read_text())
    assert ids and max(ids.values()) == 1, "a prompt id was generated twice"
    assert len(ids) == meta["num_prompts"] == len(rows)
    assert all(i.startswith("my_chats.jsonl/") for i in ids)  # the user's prompts, nothing else
    held = {p["id"] for p in eval_prompts(cfg.data, "mine", 1000, cfg.seed)}
    assert held and held.isdisjoint(ids)  # the eval task reads only the held-out conversations

    for name in ("eval_pretrained.json", "eval_distilled.json"):
        ev = json.loads((run / name).read_text())
        assert set(ev["tasks"]) == {"mine", "chat"}  # the user's task beside a packaged one
        assert ev["tasks"]["mine"]["n_prompts"] == 3 and ev["tasks"]["chat"]["n_prompts"] == 2
        assert EVAL_KEYS <= set(ev["overall"]) and ev["lossless_greedy"]["mismatches"] == 0
    pre, post = (json.loads((run / n).read_text()) for n in ("eval_pretrained.json", "eval_distilled.json"))
    assert post["target_only"] == pre["target_only"]  # one interleaved target-only arm for both drafts
    assert pre["interleaved_with"] == post["interleaved_with"] == ["pretrained@3", "distilled@3"]
    for name in ("eval_pretrained_t1.json", "eval_distilled_t1.json"):  # eval.sampled: its own interleaved run
        ev = json.loads((run / name).read_text())
        assert ev["temperature"] == 1.0 and set(ev["tasks"]) == {"mine"} and ev["gamma"] == 2
        assert EVAL_KEYS <= set(ev["overall"]) and ev["interleaved_with"] == ["pretrained@2", "distilled@2"]
    report = (run / "report.md").read_text()
    assert "(γ = 2, T = 1)" in report and "Sampled at T = 1" in report
    assert (run / "report.png").stat().st_size > 0
    times = json.loads((run / "stage_times.json").read_text())  # each stage timed by the run that did it
    assert list(times) == ["generate", "pretrain", "distill", "eval", "eval at T = 1"]
    assert all(t["seconds"] > 0 and t["machine"]["cores"] for t in times.values())
    assert "- stage times (each from the run that did it): generate " in report and "[run] stages: generate" in log
    assert (run / "draft_distilled" / "config.json").is_file()

    third = subprocess.run([sys.executable, "-m", "draftalign.cli", "run", str(job)], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    for stage in ("generate", "pretrain", "distill", "eval", "eval at T = 1"):
        assert f"[run] {stage}: complete" in third.stdout

    from openai import OpenAI

    with serving(cfg) as url:  # the job's newest trained draft, as `draftalign serve job.yaml`
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Hi, how was your day?"}])
        assert out.choices[0].message.content and out.usage.completion_tokens >= 1


def test_report_headline_is_at_the_served_gamma(tmp_path):
    from draftalign.report import headline_gamma

    ev = {"gamma": 1, "by_gamma": {"1": {}, "3": {}, "5": {}}}
    (tmp_path / "job.json").write_text(json.dumps({"serve": {"gamma": 3}}))
    assert headline_gamma(tmp_path, {"pretrained": ev, "distilled": ev}) == 3
    (tmp_path / "job.json").write_text(json.dumps({"serve": {"gamma": 4}}))  # not measured: the first γ
    assert headline_gamma(tmp_path, {"pretrained": ev, "distilled": ev}) == 1


def test_stage_times_name_the_machine_once_or_per_stage(tmp_path):
    """The run summary's stage line: one machine named once; a run resumed elsewhere names each stage's machine."""
    from draftalign.report import STAGE_TIMES, stages_line

    assert stages_line(tmp_path) == ""
    epyc = {"cpu": "AMD EPYC 9B14", "cores": 2, "bf16_native": True, "amx": False}
    xeon = {"cpu": "Intel Xeon", "cores": 2, "bf16_native": True, "amx": True}
    (tmp_path / STAGE_TIMES).write_text(json.dumps({"generate": {"seconds": 254.2, "machine": epyc},
                                                    "pretrain": {"seconds": 97.6, "machine": epyc}}))
    assert stages_line(tmp_path) == "generate 254 s · pretrain 98 s on 2 cores of AMD EPYC 9B14 (native bf16)"
    (tmp_path / STAGE_TIMES).write_text(json.dumps({"generate": {"seconds": 254.2, "machine": epyc},
                                                    "pretrain": {"seconds": 60.0, "machine": xeon}}))
    assert stages_line(tmp_path) == ("generate 254 s on 2 cores of AMD EPYC 9B14 (native bf16) · "
                                     "pretrain 60 s on 2 cores of Intel Xeon (AMX)")
