"""The held-out prompts of the distillation set: no stage trains on them.

They are the n prompt ids with the smallest md5, n = min(HELDOUT_MAX_PROMPTS, ⌊HELDOUT_FRACTION · #prompts⌋),
chosen over every prompt of the set (before any stage filters rows by length), so the choice is stable across
runs and the same for stage 1 (sequence-level KD on the set leaves them out), stage 3 and the online learner
(which measure the teacher-forced acceptance on them). All responses of a prompt go together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

HELDOUT_MAX_PROMPTS = 16  # held-out prompts (teacher-forced acceptance estimate)
HELDOUT_FRACTION = 0.1  # ... but never more than this share of the distillation set


def heldout_prompt_ids(prompt_ids: Iterable[str], max_prompts: int = HELDOUT_MAX_PROMPTS,
                       fraction: float = HELDOUT_FRACTION) -> set[str]:
    """The held-out subset of a set's prompt ids (repeats allowed: several responses per prompt)."""
    ids = sorted({str(i) for i in prompt_ids}, key=lambda s: hashlib.md5(s.encode()).hexdigest())
    return set(ids[:min(max_prompts, int(len(ids) * fraction))])


def split_heldout(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) by prompt_id, `rows` being every row of the set (filter after splitting)."""
    held = heldout_prompt_ids(r["prompt_id"] for r in rows)
    return [r for r in rows if r["prompt_id"] not in held], [r for r in rows if r["prompt_id"] in held]
