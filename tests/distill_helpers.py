"""Shared pieces of the stage-3 integration tests (tests/test_distill.py, tests/test_faults.py):
a peaked stand-in target, a tiny distillation set, and a small job config that fits 2 CPUs.

Import the fixtures into a test module (`from distill_helpers import job_fixture,
peaked_target_fixture`) so pytest finds them there, as `job` and `peaked_target`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draftalign.config import JobConfig

TOP_K = 8


@pytest.fixture(scope="module", name="peaked_target")
def peaked_target_fixture(tmp_path_factory, tiny_target_path, target_tokenizer) -> str:
    """The tiny random Llama with its final norm scaled up, so that its next-token distributions
    are peaked (a random Llama is near-uniform over 49k tokens, and every draft would already be
    "close" to it)."""
    from draftalign.models import load_causal_lm, save_pretrained_atomic

    lm = load_causal_lm(tiny_target_path)
    with torch.no_grad():
        lm.model.norm.weight.mul_(40.0)  # logits × 40: peaked next-token distributions
    return str(save_pretrained_atomic(lm, target_tokenizer, tmp_path_factory.mktemp("models") / "peaked"))


def write_distill_set(rdir: Path, tok, n_prompts: int = 40, resp_len: int = 24) -> None:
    """A distillation set under `rdir/distill_set`: train-split chat prompts with chitchat text as
    responses (the layout of actors.generate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from draftalign.data import chat_prompt_ids, pretrain_texts, train_messages
    from draftalign.distset import SCHEMA

    msgs = train_messages(4 * n_prompts, seed=0)
    prompts = [(m["id"], chat_prompt_ids(tok, m["messages"][-1:])) for m in msgs]
    prompts = [(i, p) for i, p in prompts if len(p) <= 64][:n_prompts]
    docs = pretrain_texts(["embedded:chitchat"])[: len(prompts)]
    cols = {f.name: [] for f in SCHEMA}
    for (pid, p), doc in zip(prompts, docs, strict=True):
        resp = tok(doc, add_special_tokens=False).input_ids[:resp_len] + [tok.eos_token_id]
        for k, v in (("prompt_id", pid), ("prompt", tok.decode(p)), ("prompt_token_ids", p),
                     ("response_token_ids", resp), ("response_text", doc), ("finish_reason", "stop"),
                     ("response_index", 0), ("target_topk_ids", None), ("target_topk_logprobs", None)):
            cols[k].append(v)  # no cached target top-k: the text is not the target's, it is scored
    d = rdir / "distill_set"
    d.mkdir(parents=True)
    pq.write_table(pa.table(cols, schema=SCHEMA), d / "part-00000.parquet")
    (d / "metadata.json").write_text(json.dumps({"rows": len(prompts), "by": "tests/distill_helpers.py"}))


def make_job(tmp_path: Path, name: str, target: str, draft: str, **over) -> JobConfig:
    """A tiny distill job (one target engine, one rollout actor, one learner worker: 2 CPUs);
    `section__field=value` (or `section__sub__field=value`) overrides one field."""
    data = {
        "name": name, "run_dir": str(tmp_path / name), "seed": 0,
        "target": {"model": target, "dtype": "float32", "num_engines": 1, "cpus_per_engine": 0.5,
                   "kv_cache_gib": 1, "max_model_len": 256, "top_k_logprobs": TOP_K},
        "draft": {"model": draft},
        "rollout": {"num_actors": 1, "cpus_per_actor": 0.5, "on_policy_fraction": 0.5, "temperature": 1.0,
                    "max_new_tokens": 16, "batch_size": 4, "queue_size": 2, "max_policy_lag": 2},
        "learner": {"num_workers": 1, "cpus_per_worker": 1, "max_steps": 30, "lr": 1e-2, "warmup_steps": 2,
                    "sync_every": 2, "checkpoint_every": 15},
        "distill": {"loss": "tvd_pp"},
    }
    for key, value in over.items():
        *path, field = key.split("__")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        node[field] = value
    return JobConfig.model_validate(data)


@pytest.fixture(name="job")
def job_fixture(tmp_path, peaked_target, tiny_draft_path, target_tokenizer):
    """job(name, **overrides) -> JobConfig with its distillation set written."""
    def make(name: str, **over) -> JobConfig:
        cfg = make_job(tmp_path, name, peaked_target, tiny_draft_path, **over)
        write_distill_set(cfg.run_path, target_tokenizer)
        return cfg

    return make


def done(cfg: JobConfig) -> dict:
    return json.loads((cfg.run_path / "distill_done.json").read_text())


def distill_log(cfg: JobConfig) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_path / "distill_log.jsonl").read_text().splitlines()]
