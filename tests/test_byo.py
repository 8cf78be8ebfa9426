"""Bring your own model and data: a user's ShareGPT JSONL and a local HF target directory go through generate →
pretrain → distill → eval → serve with nothing but a job YAML (issue #33)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import free_port, serving

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_target_without_chat_template_is_refused(tmp_path, tiny_target_path):
    import shutil

    from draftalign.models import ModelError, load_target_tokenizer, load_tokenizer

    plain = tmp_path / "no-template"
    shutil.copytree(tiny_target_path, plain)
    tok = load_tokenizer(str(plain))
    tok.chat_template = None
    for f in plain.glob("chat_template.*"):
        f.unlink()
    tok.save_pretrained(plain)
    with pytest.raises(ModelError, match="has no chat template"):
        load_target_tokenizer(str(plain))
    assert load_target_tokenizer(tiny_target_path).chat_template


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_user_jsonl_and_local_target_to_a_served_measured_draft(tmp_path, tiny_target_path):
    export = _user_export(tmp_path / "my_chats.jsonl", 60)
    job = {
        "name": "byo", "run_dir": str(tmp_path / "run"), "seed": 0,
        "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 512, "cpus_per_engine": 0.5},
        "draft": {"arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}},
        "data": {"train": [str(export)], "eval": {"mine": str(export)}, "holdout": 0.2},
        "pretrain": {"corpus": ["run:distill_set"], "max_steps": 4, "batch_size": 4, "seq_len": 64,
                     "checkpoint_every": 2, "warmup_steps": 1},
        "generate": {"num_prompts": 40, "shard_size": 20, "max_tokens": 12},
        "rollout": {"num_actors": 1, "cpus_per_actor": 0.5, "max_new_tokens": 8, "batch_size": 4},
        "learner": {"max_steps": 4, "checkpoint_every": 2, "sync_every": 2, "warmup_steps": 1},
        "eval": {"tasks": ["mine"], "prompts_per_task": 3, "max_new_tokens": 8},
        "serve": {"port": free_port(), "gamma": 2, "cpus_per_replica": 1},
        "cluster": {"nodes": [{"cpus": 2}]},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "draftalign.cli", "run", str(path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]

    from draftalign.config import load_config
    from draftalign.distset import load_distill_set
    from draftalign.sources import eval_prompts

    cfg = load_config(path)
    trained = {r["prompt_id"] for r in load_distill_set(cfg.run_path)}
    assert trained and all(i.startswith("my_chats.jsonl/") for i in trained)  # the user's prompts, nothing else
    held = {p["id"] for p in eval_prompts(cfg.data, "mine", 1000, cfg.seed)}
    assert held and trained.isdisjoint(held)  # the eval task reads only the held-out conversations
    ev = json.loads((cfg.run_path / "eval_distilled.json").read_text())
    assert set(ev["tasks"]) == {"mine"} and ev["tasks"]["mine"]["n_prompts"] == 3
    assert ev["lossless_greedy"]["mismatches"] == 0

    from openai import OpenAI

    with serving(cfg) as url:  # the job's newest trained draft, as `draftalign serve job.yaml`
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Hi, how was your day?"}])
        assert out.choices[0].message.content and out.usage.completion_tokens >= 1
