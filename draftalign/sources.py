"""Prompt sources a job names in `data.train` / `data.eval`: the user's conversations, a `datasets` name, or the
packaged sets — each turned into chat prompts that end at a user turn.

A source is
- `embedded:chitchat` (train: the train-split chitchat + summarize mix; eval: held-out chitchat turns),
  `embedded:summarize` (eval), `embedded:humaneval` (eval only: the code task) — `draftalign.data`;
- `embedded:self`: queries the target writes itself, sampled into the run dir by `actors/magpie.py` and then read
  as the file they are;
- a local file or directory (JSONL, JSON, parquet, CSV), or a URI fsspec opens (`s3://…`, `gs://…`);
- else a `datasets` name (`datasets.load_dataset(name, split=…)`: needs network or a local cache).

Formats, detected per row (`format: auto`) or named:
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value": …}, …]}
  openai    {"messages": [{"role": "user"|"assistant"|"system", "content": …}, …]}  (system prompts kept)
  alpaca    {"instruction": …, "input": …}
  prompt    {"prompt": …}
A conversation gives one prompt per user turn: the messages up to and including it (the system prompt kept).

Held-out split: a conversation's bucket is md5(its canonical JSON) mod 100, so the split depends on content, not
on row order or file layout. Buckets < 100·`data.holdout` are the source's eval part; a train source never yields
them, and an eval task reads a source's eval part when the same source (and split) is also trained on (else all
of it: a source named only under `data.eval` is never trained on).

Bad rows are skipped and counted with their file and row (`Skips`); a source that yields no prompt, an empty
file, an unknown format or a missing path is an error that names it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("auto", "sharegpt", "openai", "alpaca", "prompt")
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT,
         "bard": ASSISTANT, "model": ASSISTANT, "system": SYSTEM}


class SourceError(ValueError):
    """A data source that cannot be read: the message names the source (and file) and what is wrong."""


class RowError(SourceError):
    """One row that cannot become a conversation: `reason` is what `Skips` counts it under, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


@dataclass
class Skips:
    """Rows a source skipped, counted by reason, with the first few places (file:row) for each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(where)

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{n} {r} (e.g. {', '.join(self.examples[r])})" for r, n in self.counts.items())


# ---------------------------------------------------------------------------------------------------- reading rows
def _files(source: str) -> list[tuple[str, str]]:
    """(path or URI, suffix) of the files a local / fsspec source names; [] when it names none."""
    if "://" in source:
        import fsspec

        fs, root = fsspec.core.url_to_fs(source)
        if not fs.exists(root):
            raise SourceError(f"data source {source}: no such file or directory")
        paths = sorted(fs.find(root)) if fs.isdir(root) else [root]
        proto = source.split("://", 1)[0]
        return [(f"{proto}://{p}", Path(p).suffix) for p in paths if Path(p).suffix in SUFFIXES]
    p = Path(source).expanduser()
    if not p.exists():
        return []
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    found = [(str(f), f.suffix) for f in files if f.suffix in SUFFIXES]
    if not found:
        raise SourceError(f"data source {source}: no {', '.join(SUFFIXES)} file "
                          + ("under this directory" if p.is_dir() else f"(suffix {p.suffix or 'none'})"))
    return found


def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode).open()


def _file_rows(path: str, suffix: str) -> Iterator[tuple[str, object]]:
    """(where, row) of one file; `where` is file:row (1-based line for JSONL, index otherwise)."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            rows = pq.read_table(f).to_pylist()
        yield from ((f"{path}:{i}", r) for i, r in enumerate(rows))
        return
    with _open(path) as f:
        text = f.read().decode("utf-8-sig")
    if suffix == ".csv":
        yield from ((f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(io.StringIO(text))))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {"data": [...]} or one row
            lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise SourceError(f"{path}: a JSON source holds a list of rows, got {type(data).__name__}")
        yield from ((f"{path}:{i}", r) for i, r in enumerate(data))
    else:  # .jsonl
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    yield f"{path}:{i + 1}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{i + 1}", RowError("not valid JSON", e.msg)


def _dataset_rows(name: str, split: str) -> Iterator[tuple[str, object]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 — the loader raises many kinds; the message says which
        raise SourceError(f"data source {name}: not a local path, and datasets.load_dataset({name!r}, "
                          f"split={split!r}) failed: {type(e).__name__}: {e}") from None
    yield from ((f"{name}[{split}]:{i}", r) for i, r in enumerate(ds))


def source_rows(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """(where, row) of a file / directory / URI / `datasets` source, in a stable order."""
    files = _files(source)
    if files:
        for path, suffix in files:
            yield from _file_rows(path, suffix)
    else:
        yield from _dataset_rows(source, split)


# ------------------------------------------------------------------------------------------------ conversations
def _text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if parts and all(isinstance(t, str) for t in parts):
            return "\n".join(parts)
    return None


def detect_format(row: dict) -> str | None:
    for fmt, key in (("sharegpt", "conversations"), ("openai", "messages"), ("alpaca", "instruction"),
                     ("prompt", "prompt")):
        if key in row:
            return fmt
    return None


def to_messages(row, fmt: str = "auto") -> list[dict]:
    """One row → chat messages [{"role", "content"}]; raises SourceError saying what the row lacks."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError("not a mapping", type(row).__name__)
    if fmt == "auto":
        fmt = detect_format(row)
        if fmt is None:
            raise RowError("no known field", f"conversations, messages, instruction or prompt; got {sorted(row)}")
    if fmt in ("sharegpt", "openai"):
        key, role_key, text_key = (("conversations", "from", "value") if fmt == "sharegpt"
                                   else ("messages", "role", "content"))
        turns = row.get(key)
        if not isinstance(turns, list) or not turns:
            raise RowError(f"missing field {key!r}", "a list of turns")
        out = []
        for t in turns:
            if not isinstance(t, dict):
                raise RowError(f"{key}: a turn that is not a mapping", type(t).__name__)
            role, text = ROLES.get(str(t.get(role_key, "")).lower()), _text(t.get(text_key))
            if role is None:
                raise RowError("unknown role", f"{t.get(role_key)!r}; known: {', '.join(sorted(ROLES))}")
            if text is None:
                raise RowError(f"{key}: a turn without text", f"{role}, no {text_key!r}")
            out.append({"role": role, "content": text})
        return out
    if fmt == "alpaca":
        inst = row.get("instruction")
        if not isinstance(inst, str) or not inst.strip():
            raise RowError("missing field 'instruction'")
        extra = row.get("input")
        return [{"role": USER, "content": inst + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")}]
    if fmt == "prompt":
        text = _text(row.get("prompt"))
        if text is None or not text.strip():
            raise RowError("missing field 'prompt'")
        return [{"role": USER, "content": text}]
    raise SourceError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def user_turn_prompts(messages: list[dict]) -> list[tuple[int, list[dict]]]:
    """(turn index, messages up to and including that user turn) for every non-empty user turn."""
    return [(j, messages[:j + 1]) for j, m in enumerate(messages) if m["role"] == USER and m["content"].strip()]


def bucket(messages: list[dict]) -> int:
    """The conversation's held-out bucket in [0, 100): md5 of its canonical JSON."""
    from draftalign.data import md5_bucket

    return md5_bucket(json.dumps(messages, sort_keys=True))


def _conv_id(messages: list[dict]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def source_prompts(src, part: str, holdout: float, skips: Skips | None = None) -> list[dict]:
    """[{"id", "messages"}] of a file / `datasets` source: `part` is "train" (buckets ≥ 100·holdout), "eval"
    (buckets below) or "all". Ids are `<source name>/<conversation hash>/<turn>`: stable under reordering."""
    skips = skips if skips is not None else Skips()
    name = Path(src.source.rstrip("/")).name or src.source
    cut = int(round(100 * holdout))
    out, rows = [], 0
    for where, row in source_rows(src.source, src.split):
        rows += 1
        try:
            messages = to_messages(row, src.format)
        except RowError as e:
            skips.add(e.reason, where)
            continue
        prompts = user_turn_prompts(messages)
        if not prompts:
            skips.add("conversation with no user turn", where)
            continue
        b = bucket(messages)
        if (part == "train" and b < cut) or (part == "eval" and b >= cut):
            continue
        cid = _conv_id(messages)
        out += [{"id": f"{name}/{cid}/{j}", "messages": m} for j, m in prompts]
    if rows == 0:
        raise SourceError(f"data source {src.source}: empty (no rows)")
    if not out and skips.total():
        raise SourceError(f"data source {src.source}: no usable prompt; skipped {skips.summary()}")
    return out


# ------------------------------------------------------------------------------------------------- a job's prompts
def _embedded(source: str, part: str, n: int | None, seed: int) -> list[dict]:
    """A packaged set (`draftalign.data`). DataConfig admits unknown names nowhere and the eval-only sets
    (summarize, humaneval) only under data.eval, so a train part is always embedded:chitchat's mix."""
    from draftalign import data

    if source == "embedded:self":  # the driver samples it into the run dir first (actors/magpie.py)
        raise SourceError("embedded:self: the target's own queries are not sampled yet; the generate stage and "
                          "the eval sample them into the run dir (actors.magpie.resolve_self_sources)")
    if part == "train":
        assert source == "embedded:chitchat", source
        return data.train_messages(n, seed)
    if source == "embedded:chitchat":
        return data.chat_messages("eval", n, seed)
    if source == "embedded:summarize":
        return data.summarize_messages("eval", n, seed)
    return data.code_messages(n)


SELF_COPY = ("self_queries", "self.jsonl")  # <run_dir>/self_queries/self.jsonl: a run's embedded:self queries


def stable_source(source: str) -> str:
    """A source as a job's prompt order and its plan name it: a run's own copy of its `embedded:self` queries is
    `embedded:self` wherever the run dir lies, so the job, not the run dir's path, decides its prompts."""
    p = Path(source)
    return "embedded:self" if (p.parent.name, p.name) == SELF_COPY else source


def _shuffled(prompts: list[dict], seed: int, salt: str) -> list[dict]:
    out = list(prompts)
    random.Random(f"{seed}:{salt}").shuffle(out)
    return out


def train_prompts(data_cfg, n: int | None, seed: int, say=print) -> list[dict]:
    """The job's training prompts: the first n of one seeded order that interleaves the `data.train` sources by
    weight (each source capped at its max_prompts), so a bigger n extends a smaller one's list. A lone source
    keeps its own order (the embedded default: `draftalign.data.train_messages`)."""
    pools = []
    for src in data_cfg.train:
        if src.source.startswith("embedded:"):
            pool = _embedded(src.source, "train", None, seed)
        else:
            skips = Skips()
            pool = _shuffled(source_prompts(src, "train", data_cfg.holdout, skips), seed, stable_source(src.source))
            if skips.total():
                say(f"data: {src.source}: skipped {skips.summary()}")
        pools.append(pool[:src.max_prompts] if src.max_prompts else pool)
    if len(pools) == 1:
        out = pools[0]
    else:
        rng, cursors, out = random.Random(seed), [0] * len(pools), []
        weights = [s.weight for s in data_cfg.train]
        while n is None or len(out) < n:
            live = [i for i, p in enumerate(pools) if cursors[i] < len(p)]
            if not live:
                break
            i = rng.choices(live, [weights[j] for j in live])[0]
            out.append(pools[i][cursors[i]])
            cursors[i] += 1
    out = out[:n] if n is not None else out
    uniq = list({p["id"]: p for p in out}.values())  # the same conversation in two sources, or twice in one
    if len(uniq) < len(out):
        say(f"data: {len(out) - len(uniq)} duplicate prompts dropped (same conversation and turn)")
    return uniq


def eval_prompts(data_cfg, task: str, n: int, seed: int) -> list[dict]:
    """Held-out prompts of eval task `task` (`data.eval[task]`): a stable random sample of n."""
    if task not in data_cfg.eval:
        raise SourceError(f"eval task {task!r} has no source in data.eval (known: {', '.join(data_cfg.eval)})")
    src = data_cfg.eval[task]
    if src.source.startswith("embedded:"):
        return _embedded(src.source, "eval", n, seed)
    trained = any(t.source == src.source and t.split == src.split for t in data_cfg.train)
    pool = source_prompts(src, "eval" if trained else "all", data_cfg.holdout)
    if not pool:
        raise SourceError(f"eval task {task}: {src.source} has no held-out conversation (data.holdout="
                          f"{data_cfg.holdout}); raise data.holdout or name a separate eval file")
    return random.Random(seed).sample(pool, n) if n < len(pool) else pool
