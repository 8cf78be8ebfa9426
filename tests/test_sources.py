"""Prompt sources from the user (draftalign.sources): formats, multi-turn prompts, the content-hash held-out split,
mixing, and clear errors / counted skips for bad input."""

from __future__ import annotations

import csv
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draftalign import data
from draftalign.config import ConfigError, DataConfig, SourceConfig, load_config
from draftalign.sources import Skips, SourceError, bucket, eval_prompts, source_prompts, to_messages, train_prompts


def _sharegpt(i: int, turns: int = 3) -> dict:
    conv = [{"from": "system", "value": "Be brief."}]
    for t in range(turns):
        conv += [{"from": "human", "value": f"question {i}.{t}"}, {"from": "gpt", "value": f"answer {i}.{t}"}]
    return {"conversations": conv}


def _write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_each_format_becomes_chat_messages():
    assert to_messages(_sharegpt(0, 1)) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "question 0.0"},
                                            {"role": "assistant", "content": "answer 0.0"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert to_messages(parts) == [{"role": "user", "content": "a\nb"}]
    assert to_messages({"instruction": "Translate.", "input": "Hallo"}) == [{"role": "user",
                                                                              "content": "Translate.\n\nHallo"}]
    assert to_messages({"instruction": "Say hi.", "input": ""}) == [{"role": "user", "content": "Say hi."}]
    assert to_messages({"prompt": "hi"}) == [{"role": "user", "content": "hi"}]
    with pytest.raises(SourceError, match="missing field 'prompt'"):
        to_messages({"text": "x", "prompt": ""}, "prompt")
    with pytest.raises(SourceError, match="no known field"):
        to_messages({"text": "x"})
    with pytest.raises(SourceError, match="unknown role \\('tool'"):
        to_messages({"messages": [{"role": "tool", "content": "x"}]})


def test_a_conversation_gives_one_prompt_per_user_turn_ending_there(tmp_path):
    src = SourceConfig(source=_write_jsonl(tmp_path / "c.jsonl", [_sharegpt(0, 3)]))
    prompts = source_prompts(src, "all", holdout=0.1)
    assert len(prompts) == 3
    for t, p in enumerate(prompts):
        assert p["messages"][0] == {"role": "system", "content": "Be brief."}  # system prompt kept
        assert p["messages"][-1] == {"role": "user", "content": f"question 0.{t}"}
        assert len(p["messages"]) == 2 + 2 * t
    assert len({p["id"] for p in prompts}) == 3 and all(p["id"].startswith("c.jsonl/") for p in prompts)


def test_bad_rows_are_counted_with_file_and_row(tmp_path):
    rows = [_sharegpt(0, 1), "{not json", {"text": "no known field"},
            {"conversations": [{"from": "gpt", "value": "only the assistant"}]}, {"prompt": "fine"}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    skips = Skips()
    prompts = source_prompts(SourceConfig(source=path), "all", 0.1, skips)
    assert len(prompts) == 2
    assert skips.counts == {"not valid JSON": 1, "no known field": 1, "conversation with no user turn": 1}
    assert skips.examples["not valid JSON"] == [f"{path}:2"]
    assert skips.examples["conversation with no user turn"] == [f"{path}:4"]


def test_unusable_sources_are_errors_naming_them(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SourceError, match="empty.jsonl: empty"):
        source_prompts(SourceConfig(source=str(empty)), "all", 0.1)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(SourceError, match=r"bad.jsonl: no usable prompt; skipped 2 no known field"):
        source_prompts(SourceConfig(source=bad), "all", 0.1)
    with pytest.raises(SourceError, match="missing field 'instruction'"):
        source_prompts(SourceConfig(source=_write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}]), format="alpaca"),
                       "all", 0.1)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="no .jsonl, .json, .parquet, .csv file"):
        source_prompts(SourceConfig(source=str(tmp_path / "notes.txt")), "all", 0.1)
    with pytest.raises(ConfigError, match="format"):
        load_config(None, ["data.train=[{source: x.jsonl, format: markdown}]"])
    with pytest.raises(ConfigError, match="eval-only"):
        load_config(None, ["data.train=[embedded:humaneval]"])


def test_json_parquet_csv_and_directories(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "a.json").write_text(json.dumps({"data": [{"messages": [{"role": "user", "content": "from json"}]}]}))
    pq.write_table(pa.Table.from_pylist([{"instruction": "from parquet", "input": ""}]), d / "b.parquet")
    with open(d / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt"])
        w.writeheader()
        w.writerow({"prompt": "from csv"})
    got = [p["messages"][-1]["content"] for p in source_prompts(SourceConfig(source=str(d)), "all", 0.1)]
    assert got == ["from json", "from parquet", "from csv"]


def test_holdout_split_is_by_content_and_never_trained_on(tmp_path):
    rows = [_sharegpt(i, 1) for i in range(300)]
    a = _write_jsonl(tmp_path / "a.jsonl", rows)
    b = _write_jsonl(tmp_path / "b.jsonl", random.Random(1).sample(rows, len(rows)))  # same content, reordered
    cfg = DataConfig(train=[a], eval={"mine": a}, holdout=0.1)
    train = train_prompts(cfg, None, seed=0, say=lambda *_: None)
    held = eval_prompts(cfg, "mine", 1000, seed=0)
    assert {p["id"] for p in train}.isdisjoint({p["id"] for p in held})
    assert len(train) + len(held) == 300 and 10 <= len(held) <= 55  # ≈ 10% of 300
    expected = {r["conversations"][1]["value"] for r in rows if bucket(to_messages(r)) < 10}
    assert {p["messages"][-1]["content"] for p in held} == expected
    held_b = source_prompts(SourceConfig(source=b), "eval", 0.1)
    assert sorted(p["id"].split("/", 1)[1] for p in held) == sorted(p["id"].split("/", 1)[1] for p in held_b)
    only_eval = DataConfig(train=["embedded:chitchat"], eval={"mine": a})  # named only under data.eval
    assert len(eval_prompts(only_eval, "mine", 1000, seed=0)) == 300


def test_mixing_by_weight_keeps_a_prefix_order(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [_sharegpt(i, 1) for i in range(400)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}"} for i in range(400)])
    cfg = DataConfig(train=[{"source": a, "weight": 3}, {"source": b, "max_prompts": 50}], holdout=0.0)
    big = train_prompts(cfg, 200, seed=0)
    assert train_prompts(cfg, 120, seed=0) == big[:120]
    from_b = sum(p["id"].startswith("b.jsonl/") for p in big)
    assert from_b <= 50 and 30 <= sum(p["id"].startswith("b.jsonl/") for p in big[:160]) <= 50


def test_embedded_default_is_the_packaged_mix():
    """data.train's default is draftalign.data.train_messages; make run's job adds the target's own queries to it
    (embedded:self) and evaluates on the same packaged sets, so its chat figures stay comparable."""
    default = load_config(None)
    assert train_prompts(default.data, 64, default.seed) == data.train_messages(64, default.seed)
    cfg = load_config("cluster/jobs/local.yaml")
    assert [s.source for s in cfg.data.train] == ["embedded:chitchat", "embedded:self"]
    assert eval_prompts(cfg.data, "chat", 16, 0) == data.chat_messages("eval", 16, 0)
    assert eval_prompts(cfg.data, "code", 4, 0) == data.code_messages(4)
    assert eval_prompts(cfg.data, "summarize", 4, 0) == data.summarize_messages("eval", 4, 0)
