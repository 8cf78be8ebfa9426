"""TargetEngine (vLLM) against Hugging Face transformers on the same tiny model.

One in-process engine serves the whole module (engine start ≈20 s here). It is built with
max_logprobs = -1 so that top-k and full-vocabulary scoring share it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

ATOL = 1e-4  # fp32 vLLM vs fp32 HF: measured ≈2e-6


@pytest.fixture(scope="module")
def engine(tiny_target_path):
    from actors.target import TargetEngine

    eng = TargetEngine(tiny_target_path, dtype="float32", max_model_len=256, top_k_logprobs=-1, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_target_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(target_tokenizer) -> list[list[int]]:
    from draftalign.data import chat_prompt_ids

    texts = ["Hi, how are you today?", "Tell me about owls.", "What is 2 + 2?",
             "Write a short poem about the sea and the wind."]
    return [chat_prompt_ids(target_tokenizer, [{"role": "user", "content": t}]) for t in texts]


def hf_logprobs(hf, seq: list[int]) -> np.ndarray:
    """(L, V): row i is the distribution predicting seq[i + 1]."""
    with torch.no_grad():
        logits = hf(torch.tensor([seq])).logits[0].float()  # (L, V)
    return torch.log_softmax(logits, -1).numpy()


def test_score_topk_matches_hf(engine, hf, prompts):
    rng = np.random.default_rng(0)
    seqs = [p + rng.integers(0, 49152, size=n).tolist() for p, n in zip(prompts, [0, 5, 17, 40], strict=True)]
    starts = [1, len(seqs[1]) - 5, 7, len(seqs[3]) - 1]
    for k in (1, 5, 20):
        out = engine.score(seqs, starts, k)
        for seq, st, o in zip(seqs, starts, out, strict=True):
            ref = hf_logprobs(hf, seq)[st - 1: len(seq) - 1]  # (T, V): predicts seq[st:]
            T = len(seq) - st
            assert o["ids"].shape == o["logprobs"].shape == (T, k)
            assert o["ids"].dtype == np.int64 and o["logprobs"].dtype == np.float32
            ref_ids = np.argsort(-ref, axis=1, kind="stable")[:, :k]
            ref_lp = np.take_along_axis(ref, ref_ids, 1)
            # the values are the reference's top-k values, and each id carries its own log-prob
            np.testing.assert_allclose(o["logprobs"], ref_lp, atol=ATOL)
            np.testing.assert_allclose(np.take_along_axis(ref, o["ids"], 1), o["logprobs"], atol=ATOL)
            # ids equal, except where a rank ties with a neighbouring rank within fp noise
            ranked = np.take_along_axis(ref, np.argsort(-ref, axis=1)[:, :k + 1], 1)  # (T, k+1)
            gaps = -np.diff(ranked, axis=1)  # (T, k): gap to the next rank
            tie = gaps < ATOL
            tie[:, 1:] |= gaps[:, :-1] < ATOL
            assert not (o["ids"] != ref_ids)[~tie].any()
            assert (np.diff(o["logprobs"], axis=1) <= 0).all(), "columns sorted by rank"


def test_score_reading_the_prefix_cache_equals_scoring_from_scratch(engine, hf, prompts):
    """`score(prefix_cache=True)` (target-assisted rounds: each extends a sequence scored before) reads whole
    cached blocks (128 tokens: vLLM's CPU default) and prefills the rest; its rows equal transformers'. A cached
    prefix that reaches past start − 1 (vLLM computes no log-probs there) is scored again without the cache.
    (The module's engine: a second vLLM engine in one process tears down the first one's parallel state.)"""
    rng = np.random.default_rng(1)
    base = prompts[3] + rng.integers(0, 49152, size=220).tolist()
    before = engine.score_stats()
    rounds = [(base[:140] + [7, 8, 9, 10], 140), (base[:200] + [11, 12, 13, 14], 200),  # hits: 0, 128
              (base[:200] + [11, 12, 13, 14], 100)]  # a hit of 128 past start − 1 = 99: scored again
    for seq, st in rounds:
        [o] = engine.score([seq], [st], 5, prefix_cache=True)
        ref = hf_logprobs(hf, seq)[st - 1: len(seq) - 1]  # (T, V)
        np.testing.assert_allclose(o["logprobs"], np.take_along_axis(ref, o["ids"], 1), atol=ATOL)
        np.testing.assert_allclose(o["logprobs"], -np.sort(-ref, 1)[:, :5], atol=ATOL)
    after = engine.score_stats()
    assert after["cached_tokens"] - before["cached_tokens"] >= 2 * 128, (before, after)
    assert after["rescored"] - before["rescored"] == 1, (before, after)


def test_score_full_vocab_matches_hf(engine, hf, prompts):
    seq = prompts[1] + [1, 2, 3]
    [o] = engine.score([seq], [4], -1)
    assert o["ids"] is None
    ref = hf_logprobs(hf, seq)[3: len(seq) - 1]
    assert o["logprobs"].shape == ref.shape == (len(seq) - 4, engine.vocab_size)
    np.testing.assert_allclose(o["logprobs"], ref, atol=ATOL)
    np.testing.assert_allclose(np.exp(o["logprobs"]).sum(1), 1.0, atol=1e-4)


def test_score_edge_cases(engine, prompts):
    [o] = engine.score([prompts[0]], [len(prompts[0])], 5)  # nothing to score
    assert o["ids"].shape == (0, 5) and o["logprobs"].shape == (0, 5)
    assert engine.score([], [], 5) == []
    with pytest.raises(ValueError, match="start"):
        engine.score([prompts[0]], [0], 5)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.score([list(range(1, 300))], [1], 5)
    with pytest.raises(ValueError, match="k must be"):
        engine.score([prompts[0]], [1], 0)


def test_generate_text_is_decoded_ids(engine, prompts, target_tokenizer):
    outs = engine.generate(prompts, temperature=1.0, top_p=0.9, max_tokens=12, n=2, seed=[11, 2222, 33, 4])
    assert len(outs) == len(prompts)
    for answers in outs:
        assert len(answers) == 2
        for a in answers:
            assert 1 <= len(a["token_ids"]) <= 12
            assert a["finish_reason"] in ("stop", "length")
            assert a["text"] == target_tokenizer.decode(a["token_ids"], skip_special_tokens=True)


def test_generate_seeded_is_reproducible(engine, prompts):
    a = engine.generate(prompts[:2], temperature=1.0, top_p=1.0, max_tokens=10, n=2, seed=123)
    b = engine.generate(prompts[:2], temperature=1.0, top_p=1.0, max_tokens=10, n=2, seed=123)
    assert a == b
    assert a[0][0]["token_ids"] != a[0][1]["token_ids"], "n answers of one prompt differ"


def test_generate_per_prompt_seeds_ignore_batch(engine):
    """A batch whose prefills exceed one step's token budget: vLLM-CPU's default (chunked
    prefill) crashes on per-request seeds here; with whole prefills each prompt's answer depends
    only on its seed, not on its batch neighbours or their order."""
    rng = np.random.default_rng(1)
    batch = [rng.integers(10, 40000, size=200).tolist() for _ in range(30)]  # 6000 prefill tokens
    seeds = [int(s) for s in rng.integers(0, 2**31, size=30)]
    kw = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 6}
    a = engine.generate(batch, seed=seeds, **kw)
    b = engine.generate(batch[::-1], seed=seeds[::-1], **kw)[::-1]
    c = engine.generate(batch[3:5], seed=seeds[3:5], **kw)
    assert a == b and a[3:5] == c


def test_generate_logprobs_equal_score(engine, prompts):
    """The top-k vLLM records while sampling an answer is the distribution `score` computes for
    the same tokens: stage 3 replays the cached one instead of scoring again."""
    k = 8
    outs = engine.generate(prompts, temperature=0.9, max_tokens=12, seed=[11, 22_000, 333_000, 4_444_000],
                           logprobs=k)
    for p, [a] in zip(prompts, outs, strict=True):
        T = len(a["token_ids"])
        assert a["target_ids"].shape == a["target_logprobs"].shape == (T, k)
        [sc] = engine.score([p + a["token_ids"]], [len(p)], k)
        np.testing.assert_array_equal(a["target_ids"], sc["ids"])
        np.testing.assert_allclose(a["target_logprobs"], sc["logprobs"], atol=ATOL)
        assert np.all(np.diff(a["target_logprobs"], axis=1) <= 1e-6)  # ranked, most likely first


def test_generate_greedy_matches_hf(engine, hf, prompts):
    """Temperature 0 = HF greedy: every vLLM token is HF's argmax given the same prefix, so the
    two sequences are equal. The random tiny model's distribution is flat, so a divergence is
    tolerated only at a tie (top-2 gap below fp noise), after which the sequences may differ
    for good; none happens here (gaps are ≥1e-3 against ≈2e-6 noise)."""
    steps = 16
    outs = engine.generate(prompts, temperature=0.0, max_tokens=steps)
    matched = 0
    for p, [a] in zip(prompts, outs, strict=True):
        seq = list(p)
        for t, tok in enumerate(a["token_ids"]):
            lp = hf_logprobs(hf, seq)[-1]
            top2 = np.sort(lp)[-2:]
            if tok != int(lp.argmax()):
                gap = top2[1] - top2[0]
                assert gap < ATOL, f"step {t}: vLLM {tok} vs HF {lp.argmax()} (gap {gap})"
                break
            matched += 1
            seq.append(tok)
    assert matched >= len(prompts) * steps * 0.75, matched


def test_target_actor_matches_local_engine(engine, prompts, tiny_target_path):
    """The Ray actor path (resources, options, numpy results across the object store)."""
    import ray

    from actors.target import create_target_actors, shutdown_target_actors
    from draftalign.config import load_config
    from draftalign.runtime import init_ray

    cfg = load_config(None, [f"target.model={tiny_target_path}", "target.dtype=float32",
                             "target.max_model_len=256", "target.top_k_logprobs=8",
                             "target.cpus_per_engine=0.5"])
    started = not ray.is_initialized()
    init_ray(cfg, num_cpus=2)
    try:
        [actor] = create_target_actors(cfg, tiny_target_path)
        info = ray.get(actor.info.remote())
        assert info["max_logprobs"] == 20 and info["threads"] == "1" and info["dtype"] == "float32"
        assert info["omp_wait_policy"] == "PASSIVE"
        seqs, starts = [p + [5, 6, 7] for p in prompts], [3] * len(prompts)
        remote = ray.get(actor.score.remote(seqs, starts, 8))
        local = engine.score(seqs, starts, 8)
        for r, loc in zip(remote, local, strict=True):
            np.testing.assert_array_equal(r["ids"], loc["ids"])
            np.testing.assert_allclose(r["logprobs"], loc["logprobs"], atol=ATOL)
        greedy = ray.get(actor.generate.remote(prompts[:2], temperature=0.0, max_tokens=6))
        assert greedy == engine.generate(prompts[:2], temperature=0.0, max_tokens=6)
        shutdown_target_actors([actor])
    finally:
        if started:
            ray.shutdown()
