"""`embedded:self` (Magpie): the pre-query template derived from a chat template, the filters and the dedup as pure
functions, and a real run: the embedded target writes queries (vLLM), stage 2 answers them, a rerun reuses them
and a bigger budget extends them."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import yaml

from actors.magpie import (
    PreQueryError,
    pre_query_template,
    query_text,
    resolve_self_sources,
    select_queries,
    self_query_budget,
)
from draftalign.config import ConfigError, SelfQueryConfig, load_config
from draftalign.query_filters import deduplicate, jaccard, minhash, reject_reason, shingles
from draftalign.sources import SourceError, eval_prompts, train_prompts

ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '<s>[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}")


def _tokenizer_with(tmp_path, tiny_target_path, template: str | None, name: str):
    """A target directory whose tokenizer the test saved with another chat template (reloaded from disk)."""
    from draftalign.models import load_tokenizer

    d = tmp_path / name
    shutil.copytree(tiny_target_path, d)
    for f in d.glob("chat_template.*"):
        f.unlink()
    tok = load_tokenizer(str(d))
    tok.chat_template = template
    tok.save_pretrained(d)
    return load_tokenizer(str(d))


# ------------------------------------------------------------------------------------------ the pre-query template
def test_chatml_pre_query_is_the_template_up_to_a_user_message(target_tokenizer):
    pre = pre_query_template(target_tokenizer)
    assert pre.text.endswith("<|im_start|>user\n") and pre.text.startswith("<|im_start|>system\n")
    assert pre.stop[0] == "<|im_end|>" and target_tokenizer.convert_tokens_to_ids("<|im_end|>") in pre.stop_token_ids
    q = "How do I boil an egg?"
    rendered = target_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False)
    assert rendered.startswith(pre.text + q + pre.stop[0])  # the template, cut exactly where the message begins
    assert query_text(q + "<|im_end|>\n<|im_start|>assistant\nBoil it.", pre) == q
    assert {"<|im_start|>", "<|im_end|>"} <= set(pre.markers)


@pytest.mark.parametrize("template,head,stop", [(ZEPHYR, "<|user|>\n", "</s>"), (LLAMA2, "<s>[INST] ", "[/INST]")])
def test_other_templates_give_their_own_pre_query(tmp_path, tiny_target_path, template, head, stop):
    tok = _tokenizer_with(tmp_path, tiny_target_path, template, "other")
    pre = pre_query_template(tok)
    assert pre.text == head and pre.stop[0] == stop
    q = "Name three rivers."
    assert tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False).startswith(pre.text + q)
    assert query_text(f"{q} {stop} Nile, Amazon, Danube.", pre) == q


@pytest.mark.parametrize("template,why", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "writes nothing before a user message"),
    ("{% for m in messages %}{{ '<u>' + m['content'] }}{% endfor %}", "writes nothing after a user message"),
    ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system prompt first') }}{% endif %}",
     "cannot render a lone user message"),
    ("{% for m in messages %}{{ '<u>' + m['content'] | upper + '</u>' }}{% endfor %}", "verbatim"),
])
def test_a_template_without_a_pre_query_is_refused_saying_why(tmp_path, tiny_target_path, template, why):
    tok = _tokenizer_with(tmp_path, tiny_target_path, template, "bad")
    with pytest.raises(PreQueryError, match=why):
        pre_query_template(tok)


# ---------------------------------------------------------------------------------------------------------- filters
Q = SelfQueryConfig()


@pytest.mark.parametrize("text,ended,reason", [
    ("What is the tallest mountain in Africa?", True, None),
    ("Can you write a Python function that reverses a list?", True, None),
    ("What is the tallest mountain in", False, "unfinished"),
    ("Hello there", True, "too short"),
    (" ".join(["word"] * 201), True, "too long"),
    ("What is <|im_start|> for?", True, "template tokens"),
    ("Why \x00\x01\x02\x03 is \x04\x05 it\x06\x07\x08?", True, "unprintable"),
    ("12 + 34 = ?? 56 * 78 / 90 -- 11 22 33", True, "few letters"),
    ("Sure! Here is a short poem about the sea.", True, "answer-shaped"),
    ("How can I assist you today?", True, "answer-shaped"),
    ("What is 2+2?\nAssistant: 4", True, "answer-shaped"),
    ("tell me tell me tell me tell me tell me tell me tell me", True, "repetitive"),
    ("What is this: aaaaaaaaaaaaaaaaaaaaaaaa", True, "repetitive"),
])
def test_each_filter_drops_what_it_names(text, ended, reason):
    assert reject_reason(text, ended, ("<|im_start|>", "<|im_end|>"), Q) == reason


def test_dedup_drops_exact_and_near_duplicates_keeping_the_first():
    texts = ["What is the best way to learn Python?",       # kept
             "what is the best way to learn python",         # exact after normalising
             "What is the best way to learn Python quickly?",  # near: Jaccard of 3-gram shingles 6/7
             "What is the capital of France?",               # kept
             "What is the capital of Spain?"]                # Jaccard 0.6 < 0.7: kept
    assert jaccard(shingles(texts[0]), shingles(texts[2])) == pytest.approx(6 / 7)
    kept, dropped = deduplicate(texts, threshold=0.7)
    assert kept == [0, 3, 4] and dropped == {"exact duplicate": 1, "near duplicate": 1}
    assert deduplicate(texts, threshold=0.5)[0] == [0, 3]  # a lower threshold merges France and Spain too


def test_minhash_agreement_estimates_jaccard():
    a = {f"s{i}" for i in range(100)}
    for overlap in (0, 50, 100):
        b = {f"s{i}" for i in range(100 - overlap, 200 - overlap)}
        agree = float((minhash(a, 256) == minhash(b, 256)).mean())
        assert abs(agree - jaccard(a, b)) < 0.12, (overlap, agree)  # 256 hashes: σ ≤ 0.032


def test_select_queries_counts_every_sample_once(target_tokenizer):
    pre = pre_query_template(target_tokenizer)
    texts = [("What is the capital of France?", "stop"), ("What is the capital of France?", "stop"),
             ("Sure! Here you go.", "stop"), ("How do I", "length"), ("Which planet is the largest one?", "stop")]
    samples = [{"token_ids": target_tokenizer(t + "<|im_end|>", add_special_tokens=False).input_ids, "finish_reason": f}
               for t, f in texts]
    decode = lambda ids: target_tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    queries, counts = select_queries(samples, decode, pre, Q)
    assert queries == ["What is the capital of France?", "Which planet is the largest one?"]
    assert counts == {"sampled": 5, "answer-shaped": 1, "unfinished": 1, "exact duplicate": 1, "kept": 2}


# --------------------------------------------------------------------------------------------------- config, budget
def test_budget_and_an_unsampled_self_source(tiny_target_path):
    cfg = load_config(None, ["data.train=[embedded:chitchat, {source: embedded:self, max_prompts: 90}]"])
    assert self_query_budget(cfg, []) == 200  # ⌈2 × 90 / 0.9⌉
    cfg = load_config(None, ["data.eval={mine: embedded:self}", "eval.tasks=[mine]", "eval.prompts_per_task=10"])
    assert self_query_budget(cfg, ["mine"]) == 20  # eval-only: 2 × its count, nothing held out
    assert resolve_self_sources(cfg) is cfg and resolve_self_sources(cfg, ["chat"]) is cfg  # not needed: untouched
    with pytest.raises(SourceError, match="not sampled yet"):
        eval_prompts(cfg.data, "mine", 4, 0)
    with pytest.raises(ValueError, match="unknown embedded source"):
        load_config(None, ["data.train=[embedded:selfish]"])


# ---------------------------------------------------------------------------------------- real vLLM: write, answer
@pytest.fixture(scope="module")
def self_run(tmp_path_factory, embedded_target_path):
    tmp = tmp_path_factory.mktemp("magpie")
    job = {"name": "magpie-test", "run_dir": str(tmp / "run"), "seed": 1,
           "target": {"model": embedded_target_path, "dtype": "float32", "max_model_len": 512, "cpus_per_engine": 1},
           "data": {"train": ["embedded:chitchat", {"source": "embedded:self", "max_prompts": 8}],
                    "eval": {"self": "embedded:self"}, "holdout": 0.4,  # a held-out part among ~15 queries
                    "self_queries": {"n_samples": 20, "max_tokens": 64}},
           "generate": {"num_prompts": 16, "shard_size": 8, "max_tokens": 8, "dtype": "float32"},
           "cluster": {"nodes": [{"cpus": 2}]}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cfg = load_config(path)
    import ray

    from draftalign.pipeline import generate_stage

    d = generate_stage(cfg)  # the queries and their answers on one pool of engines, as `draftalign run` samples them
    ray.shutdown()  # left up for a run's training stages; this module has none
    resolved = resolve_self_sources(cfg)  # the stored queries, reused: no engine
    return {"cfg": cfg, "resolved": resolved, "distill": d, "dir": tmp / "run" / "self_queries"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_target_writes_queries_that_stage_2_answers(self_run):
    d, resolved = self_run["dir"], self_run["resolved"]
    meta = json.loads((d / "meta.json").read_text())
    n = self_query_budget(self_run["cfg"], [])
    assert meta["n_samples"] == n == 20 and meta["counts"]["sampled"] == n
    assert sum(v for k, v in meta["counts"].items() if k != "sampled") == n  # every sample kept or dropped once
    queries = [json.loads(line)["prompt"] for line in (d / "self.jsonl").read_text().splitlines()]
    assert len(queries) == meta["counts"]["kept"] > 0
    assert all(reject_reason(q, True, tuple(meta["stop"]), resolved.data.self_queries) is None for q in queries)
    assert resolved.data.train[1].source == str(d / "self.jsonl") == resolved.data.eval["self"].source
    plan = json.loads((self_run["distill"] / "plan.json").read_text())
    own = [p for p in plan["prompt_ids"] if p.startswith("self.jsonl/")]
    assert own and len(own) <= 8 and len(plan["prompt_ids"]) == 16  # mixed with chitchat, capped by max_prompts
    held = {p["id"] for p in eval_prompts(resolved.data, "self", 100, 0)}
    assert held and not held & set(own)  # the eval task reads only the held-out part
    from draftalign.distset import load_distill_set

    rows = load_distill_set(self_run["distill"])
    assert {r for r in rows["prompt_id"]} >= set(own) and all(len(r) > 0 for r in rows["response_token_ids"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_rerun_reuses_the_queries_and_a_bigger_budget_extends_them(self_run):
    import ray

    d, cfg = self_run["dir"], self_run["cfg"]
    mtimes = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        again = resolve_self_sources(cfg)
    assert "reused" in out.getvalue() and not ray.is_initialized()
    assert {f.name: f.stat().st_mtime_ns for f in d.iterdir()} == mtimes  # nothing sampled or written again
    assert train_prompts(again.data, 16, cfg.seed) == train_prompts(self_run["resolved"].data, 16, cfg.seed)

    before = json.loads((d / "samples.json").read_text())["samples"]
    with pytest.raises(ConfigError, match="differs in: temperature"):
        resolve_self_sources(cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "self_queries": cfg.data.self_queries.model_copy(update={"temperature": 0.5})})}))
    bigger = cfg.data.self_queries.model_copy(update={"n_samples": len(before) + 4})
    resolve_self_sources(cfg.model_copy(update={"data": cfg.data.model_copy(update={"self_queries": bigger})}))
    after = json.loads((d / "samples.json").read_text())["samples"]
    assert after[:len(before)] == before and len(after) == len(before) + 4  # only the 4 new ones were drawn
    assert json.loads((d / "meta.json").read_text())["n_samples"] == len(before) + 4
