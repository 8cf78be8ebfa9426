"""Bring your own target: a target directory without a chat template is refused, naming the problem (issue #33).

The whole bring-your-own path — a user's ShareGPT JSONL and a local HF target directory through generate →
pretrain → distill → eval → serve with nothing but a job YAML — runs in `tests/test_pipeline.py`'s end-to-end
scenario (one `draftalign run` carries both, killed during generation and rerun)."""

from __future__ import annotations

import pytest


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
