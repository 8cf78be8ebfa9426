"""The draft's frequency-ranked vocabulary (FR-Spec, arXiv 2502.14856; EAGLE-3's `draft_vocab_size`).

The draft's LM head is restricted to the N target tokens that occur most often in the target's own
answers (the distillation set); a set with fewer than N distinct tokens is filled up to N in token-id
order (merge order of a BPE vocabulary: frequency in the tokenizer's own, broader corpus). The draft
then proposes only from those N tokens: its q is zero outside them, so rejection sampling with that q
stays lossless, and the per-token acceptance is capped by the target's mass on the subset. The head costs
N / V of the full one (8k of 49k rows: a 6× smaller matrix read per draft step and per training position).

The checkpoint stays a standard full-vocabulary HF model; the subset is one extra file,
`draft_vocab.json` ({"token_ids": [...], "source": ...}), next to its config.json. Stages that train
or decode the draft read it with `load_draft_vocab`; a checkpoint without it uses the full vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from draftalign.io import write_json_atomic

VOCAB_FILE = "draft_vocab.json"


def frequent_tokens(sequences: Iterable[Iterable[int]], size: int, always: Iterable[int] = (),
                    fill: Iterable[int] = ()) -> list[int]:
    """The `size` most frequent ids of `sequences` (ties broken by id), plus `always` (e.g. EOS), sorted.
    When fewer than `size` distinct ids occur, the rest come from `fill` in its order (a prior ranking)."""
    counts = Counter(t for seq in sequences for t in seq)
    keep = {int(t) for t in always if t is not None}
    ranked = (int(tok) for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    for tok in (*ranked, *fill) if fill else ranked:
        if len(keep) >= size:
            break
        keep.add(int(tok))
    return sorted(keep)


def coverage(sequences: Iterable[Iterable[int]], token_ids: list[int]) -> float:
    """Share of the tokens of `sequences` that lie in `token_ids`."""
    ids = set(token_ids)
    total = hit = 0
    for seq in sequences:
        for t in seq:
            total += 1
            hit += t in ids
    return hit / total if total else 0.0


def save_draft_vocab(checkpoint_dir: str | Path, token_ids: list[int], source: str = "") -> None:
    write_json_atomic(Path(checkpoint_dir) / VOCAB_FILE, {"token_ids": [int(t) for t in token_ids],
                                                          "size": len(token_ids), "source": source})


def load_draft_vocab(checkpoint_dir: str | Path | None, vocab_size: int | None = None) -> list[int] | None:
    """The checkpoint's draft vocabulary (sorted ids), or None when it has none (full vocabulary)."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        ids = [int(t) for t in json.loads(path.read_text())["token_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a draft vocabulary file: {e}") from None
    if not ids or ids != sorted(set(ids)) or ids[0] < 0 or (vocab_size is not None and ids[-1] >= vocab_size):
        raise ValueError(f"{path}: token ids must be sorted, unique and inside the vocabulary "
                         f"(size {vocab_size})")
    return ids


def subset_index(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """(V,) int64 map full id → position in the subset, −1 outside it."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[torch.tensor(token_ids, dtype=torch.long)] = torch.arange(len(token_ids))
    return index


def job_draft_vocab(cfg, rdir: Path, fallback: Iterable[Iterable[int]] | None = None) -> list[int] | None:
    """The job's draft vocabulary (`<run_dir>/draft_vocab.json`), made once: the draft.draft_vocab_size
    most frequent tokens of the distillation set's answers (else of `fallback`, e.g. the pretraining
    stream), plus the special tokens. None when draft.draft_vocab_size is 0 or reaches the vocabulary."""
    from transformers import AutoConfig

    from draftalign.models import load_tokenizer, resolve_target

    size = cfg.draft.draft_vocab_size
    target_path = resolve_target(cfg.target.model)
    vocab_size = AutoConfig.from_pretrained(target_path).vocab_size
    if not size or size >= vocab_size:
        return None
    path = Path(rdir) / VOCAB_FILE
    ids = load_draft_vocab(rdir, vocab_size) if path.is_file() else None
    if ids is not None:
        return ids
    source = "distillation set answers"
    try:
        from draftalign.distset import load_distill_set

        sequences = load_distill_set(rdir)["response_token_ids"]
    except FileNotFoundError:
        if fallback is None:
            raise ValueError(f"draft.draft_vocab_size={size} needs the distillation set of {rdir} (run "
                             f"`draftalign generate` first) or a token stream to count") from None
        sequences, source = fallback, "pretraining text"
    tok = load_tokenizer(target_path)
    special = [tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, *tok.all_special_ids]
    # a small set holds fewer distinct tokens than `size`: fill the head by token id, which in BPE and
    # SentencePiece vocabularies follows merge / score order — frequency in the tokenizer's own corpus (code,
    # other languages), so traffic the set never showed is not cut off (issue #16: 2,349 counted ids covered
    # 47% of HumanEval solution tokens; filled to 8,192, 91%)
    fill = range(vocab_size) if cfg.draft.draft_vocab_fill else ()
    ids = frequent_tokens(sequences, size, always=special, fill=fill)
    counted = len({t for seq in sequences for t in seq} | {t for t in special if t is not None})
    filled = max(0, len(ids) - counted)
    save_draft_vocab(rdir, ids, source=f"{source}; coverage {coverage(sequences, ids):.4f}"
                     + (f"; {filled} ids filled by token-id order" if filled else ""))
    return ids
