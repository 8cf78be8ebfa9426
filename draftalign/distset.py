"""The distillation set on disk: its schema, where it lives, and loading it (written by stage 2, `actors/generate.py`).

Layout of `<run_dir>/distill_set/`:
- `plan.json` — what this set is (target, sampling, prompt ids in order, shard size);
- `part-00000.parquet`, … — one row per (prompt, response_index), schema `SCHEMA`; a shard file is either
  absent or complete (written to a temp file and renamed);
- `metadata.json` — counts and parameters, written once every shard exists: the set is complete iff it exists.

Its readers (stage 1's sequence-level KD, stage 3's replay, the draft vocabulary, the online learner's replay)
sit in different stages, so the format has its home here, below all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),  # chat-templated text, ending with the assistant cue
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("response_token_ids", pa.list_(pa.int32())),  # includes EOS when the answer stopped there
    ("response_text", pa.string()),
    ("finish_reason", pa.string()),  # "stop" (EOS) or "length" (max_tokens)
    ("response_index", pa.int32()),  # 0 … responses_per_prompt - 1
    # the target's top-k at each answer position, row-major (T, k); null when not cached
    ("target_topk_ids", pa.list_(pa.int32())),
    ("target_topk_logprobs", pa.list_(pa.float32())),
])

def distill_dir(run_path: str | Path) -> Path:
    return Path(run_path) / "distill_set"


def set_sampling(run_path: str | Path) -> dict:
    """How the set's answers were generated (metadata.json's "sampling": temperature, top_p, …; {} if it records
    none). temperature 0: the answers are the target's greedy text."""
    meta = distill_dir(run_path) / "metadata.json"
    return json.loads(meta.read_text()).get("sampling", {}) if meta.is_file() else {}


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def load_distill_set(run_path: str | Path, allow_partial: bool = False):
    """The distillation set as a `datasets.Dataset` (in memory, rows in plan order).

    `run_path` is the run directory or its `distill_set/`. Without allow_partial an unfinished
    set (no metadata.json) is an error.
    """
    import datasets
    from datasets.table import InMemoryTable

    d = Path(run_path)
    if d.name != "distill_set":
        d = distill_dir(d)
    if not d.is_dir():
        raise FileNotFoundError(f"no distillation set at {d} (run `draftalign generate` first)")
    if not allow_partial and not (d / "metadata.json").exists():
        raise FileNotFoundError(f"the distillation set at {d} is incomplete (no metadata.json); "
                                f"rerun `draftalign generate` to finish it")
    files = sorted(d.glob("part-*.parquet"))
    tables = [pq.read_table(f, schema=SCHEMA) for f in files]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return datasets.Dataset(InMemoryTable(table))
