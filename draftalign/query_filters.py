"""Pure text filters and deduplication of user queries a model wrote itself (`embedded:self`, actors/magpie.py).

  filters  (`reject_reason`, the first failing one counts)  unfinished (no end of turn within max_tokens), too
           short / too long (words), template tokens (a special token or the end-of-turn marker inside),
           unprintable (< 95% printable characters), few letters (< 40% of non-space characters), answer-shaped
           (opens like an assistant reply, or writes a role label: the model answered instead of asking),
           repetitive (≥ 50% repeated word 3-grams, or one character 16 times in a row);
  dedup    (`deduplicate`)  exact after normalising (lower case, punctuation dropped, spaces collapsed), then
           near-duplicates: Jaccard(word 3-gram shingles) ≥ threshold against an earlier kept query, candidates
           found by MinHash LSH (63 hashes, 21 bands of 3).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter

import numpy as np

from draftalign.config import SelfQueryConfig

# -------------------------------------------------------------------------------------------------- filters (pure)
ANSWER_OPENERS = re.compile(
    r"^(sure\b|certainly\b|of course\b|absolutely\b|great question|good question|here is\b|here are\b|here's\b|"
    r"i'm sorry|i am sorry|i apologi[sz]e|as an ai\b|i'd be happy|i would be happy|i'm happy to|"
    r"(hello|hi|hey)[!.,]?\s+(how|what) can i\b|how can i (help|assist)|thank you for (your|the) question|"
    r"you're welcome)", re.IGNORECASE)
ROLE_LABEL = re.compile(r"(^|\n)\s*(assistant|user|human|ai|system|gpt)\s*:", re.IGNORECASE)
CHAR_RUN = re.compile(r"(.)\1{15,}", re.DOTALL)


def printable_share(text: str) -> float:
    """Share of characters that are printable (newlines and tabs count; U+FFFD, a broken byte, does not)."""
    ok = sum(c.isprintable() and c != "\ufffd" or c in "\n\t" for c in text)
    return ok / max(1, len(text))


def letter_share(text: str) -> float:
    """Share of non-space characters that are letters."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(1, len(chars))


def repetition(text: str, n: int = 3) -> float:
    """1 − distinct / total word n-grams (0 for fewer than 2n words): 0.5 = half the n-grams repeat."""
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def answer_shaped(text: str) -> bool:
    """The model answered instead of asking: an assistant's opening, or a role label ("Assistant:") inside."""
    return bool(ANSWER_OPENERS.match(text.lstrip(" \"'*#"))) or bool(ROLE_LABEL.search(text))


def reject_reason(text: str, ended: bool, markers: tuple[str, ...], q: SelfQueryConfig) -> str | None:
    """Why a sampled query is dropped (the first rule it fails), or None to keep it."""
    words = len(text.split())
    if not ended:
        return "unfinished"
    if words < q.min_words:
        return "too short"
    if words > q.max_words:
        return "too long"
    if any(m in text for m in markers):
        return "template tokens"
    if printable_share(text) < 0.95:
        return "unprintable"
    if letter_share(text) < 0.4:
        return "few letters"
    if answer_shaped(text):
        return "answer-shaped"
    if repetition(text) >= 0.5 or CHAR_RUN.search(text):
        return "repetitive"
    return None


# ---------------------------------------------------------------------------------------------------- dedup (pure)
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’…—–"})
MINHASH_PERM, LSH_BANDS = 63, 21  # a pair at Jaccard 0.7 shares a band with P = 1 − (1 − 0.7³)²¹ = 0.9998


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key of an exact duplicate."""
    return " ".join(text.lower().translate(_PUNCT).split())


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of the normalised text (the whole text when it has fewer than n words)."""
    w = normalise(text).split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {" ".join(w)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def minhash(sh: set[str], num_perm: int = MINHASH_PERM, seed: int = 0) -> np.ndarray:
    """MinHash signature (num_perm,) uint64: min over shingles of h_i(x) = a_i·x + b_i mod 2^64 (multiply-add
    hashing of a 64-bit hash x of the shingle; a_i odd). P[sig_a[i] == sig_b[i]] ≈ Jaccard(a, b)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # (P,) odd
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in sh],
                 dtype=np.uint64)  # (S,)
    with np.errstate(over="ignore"):
        return (x[:, None] * a[None, :] + b[None, :]).min(axis=0)  # (P,), arithmetic mod 2^64


def deduplicate(texts: list[str], threshold: float, bands: int = LSH_BANDS) -> tuple[list[int], Counter]:
    """Indices of the texts kept (the first of every group, in order) and what was dropped: "exact duplicate"
    (same `normalise`) and "near duplicate" (Jaccard of shingles ≥ threshold against a kept text; candidates share
    an LSH band of their MinHash signatures)."""
    kept: list[int] = []
    dropped: Counter = Counter()
    seen: set[str] = set()
    buckets: dict[tuple, list[int]] = {}
    sets: dict[int, set[str]] = {}
    for i, t in enumerate(texts):
        key = normalise(t)
        if key in seen:
            dropped["exact duplicate"] += 1
            continue
        sh = shingles(t)
        sig = minhash(sh)
        rows = len(sig) // bands
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        cands = {j for k in keys for j in buckets.get(k, ())}
        if any(jaccard(sh, sets[j]) >= threshold for j in cands):
            dropped["near duplicate"] += 1
            continue
        seen.add(key)
        sets[i] = sh
        kept.append(i)
        for k in keys:
            buckets.setdefault(k, []).append(i)
    return kept, dropped
