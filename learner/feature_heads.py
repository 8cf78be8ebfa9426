"""The heads on the target's features, whatever their kind: an FSPAD head (`learner.fspad`), this project's EAGLE-3
head (`learner.eagle3`) or a speculators-format EAGLE-3 checkpoint (read as an EAGLE-3 head). The kind is read
from the directory's config.json, so training (resume, `draft.eagle3.init_from`) and the engine (`serve.drafts`)
take any of them from one path.
"""

from __future__ import annotations

import json
from pathlib import Path

from learner import eagle3, fspad


def head_kind(path: str | Path) -> str | None:
    """"fspad", "eagle3", "speculators" (an EAGLE-3 speculators checkpoint) or None (not a feature head)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("kind") in (fspad.KIND, eagle3.KIND):
        return cfg["kind"]
    if cfg.get("speculators_model_type") == eagle3.KIND:
        return "speculators"
    return None


def is_feature_head(path: str | Path) -> bool:
    return head_kind(path) is not None


HEADS = (fspad.FSPADHead, eagle3.EAGLE3Head)  # the feature-level heads: they draft on the target's features


def is_head(model) -> bool:
    """A loaded draft is a feature-level head (FSPAD or EAGLE-3), not a Llama draft."""
    return isinstance(model, HEADS)


def check_head(path: str | Path, target_config) -> None:
    """The head's config checked against the target's shape (reads no weights); a speculators checkpoint is checked
    when it is loaded."""
    kind = head_kind(path)
    if kind == fspad.KIND:
        fspad.check_target(fspad.read_config(path)["target"], target_config, str(path))
    elif kind == eagle3.KIND:
        eagle3.check_target(eagle3.read_config(path), target_config, str(path))


def load_head(path: str | Path, target):
    """The head at `path` on `target`'s frozen weights (float32, train mode as built)."""
    kind = head_kind(path)
    if kind == fspad.KIND:
        return fspad.FSPADHead.load(path, target)
    if kind == eagle3.KIND:
        return eagle3.EAGLE3Head.load(path, target)
    if kind == "speculators":
        return eagle3.EAGLE3Head.from_speculators(path, target)
    raise ValueError(f"{path} holds no feature-level head (FSPAD, EAGLE-3 or a speculators EAGLE-3 checkpoint)")
