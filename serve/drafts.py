"""The drafts the engine decodes with, whatever their kind: an HF-format Llama draft (+ its draft vocabulary) or a
feature-level head — FSPAD (`learner.fspad`) or EAGLE-3 (`learner.eagle3`, also read from a speculators
checkpoint) — on the target's frozen weights. The kind is read from the
checkpoint's config.json, so a job, `eval` and the endpoint take either from one path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draftalign.models import check_draft, load_draft
from draftalign.storage import ensure_local
from draftalign.vocab import load_draft_vocab
from learner.feature_heads import check_head, is_feature_head, load_head


def check_engine_draft(path: str, target_tok, target_config) -> Path:
    """`check_draft` for an HF-format draft; for an FSPAD head its config, checked against the target's shape.
    Reads no weights."""
    path = str(ensure_local(path))  # a URI (s3://…/draft_distilled) or a URI run's staging copy, pulled
    if not is_feature_head(path):
        return check_draft(path, target_tok, target_config.vocab_size)
    p = Path(path).expanduser()
    check_head(p, target_config)
    return p


def load_engine_draft(path: str, target, target_tok, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(draft, its vocabulary or None) for the engine, the kind read from the checkpoint's config.json: an HF-format
    Llama draft (`load_draft`, + its draft_vocab.json) or an FSPAD head on `target`'s frozen embedding and LM head
    (`learner.fspad.FSPADHead.load`; float32, its vocabulary inside it, so None here)."""
    path = str(ensure_local(path))
    if is_feature_head(path):  # FSPAD, EAGLE-3, or a speculators EAGLE-3 checkpoint
        return load_head(path, target).to(device).eval(), None
    vocab_size = target.config.vocab_size
    return load_draft(path, target_tok, dtype, device, vocab_size), load_draft_vocab(path, vocab_size)
