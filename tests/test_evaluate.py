"""`draftalign eval` on tiny models: the target-only arm is measured once and shared by later evals."""

from __future__ import annotations

import json

from draftalign.config import load_config
from draftalign.evaluate import run_eval


def _cfg(tmp_path, target: str, draft: str, max_new_tokens: int = 6):
    return load_config(None, [f"target.model={target}", f"draft.model={draft}", f"run_dir={tmp_path / 'run'}",
                              "eval.tasks=[chat,code]", "eval.prompts_per_task=2",
                              f"eval.max_new_tokens={max_new_tokens}", "target.max_model_len=512"])


def test_target_only_arm_is_reused_only_when_it_matches(tmp_path, tiny_target_path, tiny_draft_path):
    base = tmp_path / "target_only.json"
    cfg = _cfg(tmp_path, tiny_target_path, tiny_draft_path)
    first = run_eval(cfg, out=tmp_path / "a.json", baseline=base)
    assert not first["target_only"]["reused"] and base.is_file()

    again = run_eval(cfg, draft=tiny_target_path, out=tmp_path / "b.json", baseline=base)  # another draft
    assert again["target_only"] == {**first["target_only"], "reused": True}
    for task in ("chat", "code"):  # same denominator: target-only tokens/s copied, not re-timed
        assert again["tasks"][task]["target_tokens_per_s"] == first["tasks"][task]["target_tokens_per_s"]
    # the greedy losslessness check still compares against the stored target tokens: draft = target
    # accepts everything, and still matches token for token
    assert again["lossless_greedy"] == {"checked": 4, "mismatches": 0}
    assert again["overall"]["acceptance_rate"] == 1.0

    longer = run_eval(_cfg(tmp_path, tiny_target_path, tiny_draft_path, max_new_tokens=8), baseline=base)
    assert not longer["target_only"]["reused"]  # different sampling settings: measured afresh, file replaced
    assert json.loads(base.read_text())["key"] == longer["target_only"]["key"] != first["target_only"]["key"]
