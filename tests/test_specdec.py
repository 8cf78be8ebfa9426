"""Losslessness of the speculative decoding engine.

Greedy: token-for-token equality with Hugging Face `generate` of the target alone (an implementation
other than ours: unpatched HF modules, its own cache), with a draft that agrees partially so that
rounds accept every k in [0, γ] and roll their caches back; ragged batches equal single requests.
Sampling: a χ² test of the empirical distribution of the first two — and three — generated tokens
against the target's exact distribution, on a small-vocabulary model pair (plain, ragged batches,
a restricted draft vocabulary), with broken acceptance rules as the negative control.
"""

from __future__ import annotations

import copy

import pytest
import torch
from specdec_helpers import (
    chi2_p,
    empirical,
    exact_three_token_dist,
    exact_two_token_dist,
    hf_greedy,
    random_prompts,
    small_lm,
)

from draftalign.models import load_causal_lm, load_tokenizer
from draftalign.sampling import SamplingParams, greedy_verify, logits_to_probs, rejection_sample, sample
from serve.specdec import SpecDecoder

P_MIN = 0.01  # χ² p-value above which the empirical distribution is accepted as the target's


@pytest.fixture(scope="module")
def tiny_pair(tiny_target_path, tiny_draft_path):
    tok = load_tokenizer(tiny_target_path)
    return load_causal_lm(tiny_target_path), load_causal_lm(tiny_draft_path), tok


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_target_on_50prompts(tiny_pair, gamma):
    target, draft, tok = tiny_pair
    engine = SpecDecoder(target, draft, tok, gamma=gamma)
    params = SamplingParams(max_new_tokens=16)
    for p in random_prompts(50, target.config.vocab_size, seed=gamma):
        ref = engine.generate_target_only([p], params)[0]
        got = engine.generate([p], params)[0]
        assert got.token_ids == ref.token_ids


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_hf_generate_with_partial_acceptance(partial_pair, target_tokenizer, gamma):
    target, ref, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=gamma)
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    hist = [0] * (gamma + 1)
    for p in random_prompts(50, target.config.vocab_size, seed=10 + gamma):
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
    # every partial acceptance 0 < k < γ (and its cache rollback) happened
    assert all(h > 0 for h in hist[1:gamma]), hist


def test_float16_draft_steps_stay_lossless(partial_pair, target_tokenizer):
    """draft.step_dtype: the draft's single-row products in float16 change q, never the output."""
    target, ref, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3, draft_step_dtype=torch.float16)
    assert engine._d.lean.half[0][1].dtype == torch.float16 and engine._t.lean.half[0][1] is None
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    hist = [0] * 4
    for p in random_prompts(20, target.config.vocab_size, seed=41):
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
    assert hist[0] > 0 and sum(hist[1:]) > 0, hist  # rounds both rejected and accepted float16 proposals


def test_ragged_batch_equals_single_with_partial_acceptance(partial_pair, target_tokenizer):
    target, _, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3)
    params = SamplingParams(max_new_tokens=20)
    prompts = random_prompts(12, target.config.vocab_size, seed=21)
    batched = engine.generate(prompts, params)
    assert len({tuple(g.accepted_histogram) for g in batched}) > 1  # sequences advanced by different k
    for p, b in zip(prompts, batched):
        single = engine.generate([p], params)[0]
        assert b.token_ids == single.token_ids
        assert (b.rounds, b.accepted, b.rejected) == (single.rounds, single.accepted, single.rejected)


@pytest.mark.parametrize("kind", ["llama", "fspad"])
def test_interleaved_streams_run_every_round_without_autograd(partial_pair, target_tokenizer, kind):
    """The replica advances several streams round by round on one thread. Stream a starts first and ends while b
    is in flight: b's later rounds still run without autograd. (Inference mode held across yields was unwound by
    a's end — a guard restores the mode it found — so b's target logits required grad and the online capture
    failed on them; the answers stayed right.) Both streams equal HF `generate`."""
    from learner.fspad import FSPADHead

    target, ref, draft = partial_pair
    engine = SpecDecoder(target, draft if kind == "llama" else FSPADHead.from_target(target, seed=0),
                         target_tokenizer, gamma=3)
    rounds = []  # (stream's prompt length, target logits need grad, autograd on) of every drafted round
    engine.observer = lambda v: rounds.append((int(v.mask.sum()), v.target_logits.requires_grad,
                                               torch.is_grad_enabled()))
    pa, pb = random_prompts(2, target.config.vocab_size, seed=41)
    a = engine.generate_stream(pa, SamplingParams(max_new_tokens=3))
    b = engine.generate_stream(pb, SamplingParams(max_new_tokens=24))
    got_a, got_b = list(next(a)[0]), list(next(b)[0])  # a enters first, then b
    got_a += [t for new, _ in a for t in new]  # a ends
    got_b += [t for new, _ in b for t in new]  # b's remaining rounds
    eos = target_tokenizer.eos_token_id
    assert got_a == hf_greedy(ref, pa, 3, eos) and got_b == hf_greedy(ref, pb, 24, eos)
    assert len(rounds) > 3 and not torch.is_inference_mode_enabled()  # the caller's mode is its own again
    assert [r for r in rounds if r[1] or r[2]] == []


def test_restricted_draft_vocabulary_stays_lossless(partial_pair, target_tokenizer):
    target, ref, draft = partial_pair
    vocab = sorted(set(range(0, target.config.vocab_size, 3)) | {target_tokenizer.eos_token_id})
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3, draft_vocab=vocab)
    base = SpecDecoder(target, None, target_tokenizer)
    params = SamplingParams(max_new_tokens=16)
    proposed_inside = 0
    for p in random_prompts(20, target.config.vocab_size, seed=31):
        got = engine.generate([p], params)[0]
        assert got.token_ids == base.generate_target_only([p], params)[0].token_ids
        proposed_inside += got.accepted
    assert proposed_inside > 0


def test_greedy_batch_equals_single(tiny_pair):
    target, draft, tok = tiny_pair
    engine = SpecDecoder(target, draft, tok, gamma=3)
    params = SamplingParams(max_new_tokens=16)
    prompts = random_prompts(8, target.config.vocab_size, seed=7)
    batched = engine.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert b.token_ids == engine.generate_target_only([p], params)[0].token_ids


def test_draft_equal_to_target_accepts_everything(tiny_pair):
    target, _, tok = tiny_pair
    engine = SpecDecoder(target, target, tok, gamma=4)
    g = engine.generate(random_prompts(1, target.config.vocab_size, seed=3), SamplingParams(max_new_tokens=20))[0]
    assert g.acceptance_rate == 1.0
    assert g.block_efficiency == pytest.approx(5.0)  # γ + 1 tokens per target pass


def test_max_new_tokens_eos_and_stop_strings(tiny_pair):
    target, draft, tok = tiny_pair
    engine = SpecDecoder(target, draft, tok, gamma=3)
    p = random_prompts(1, target.config.vocab_size, seed=11)
    free = engine.generate(p, SamplingParams(max_new_tokens=12))[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    # Make the 5th token an end-of-sequence token: decoding must stop right there.
    eos = free.token_ids[4]
    engine.eos_ids = {eos}
    stopped = engine.generate(p, SamplingParams(max_new_tokens=12))[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    engine.eos_ids = set()
    stop = tok.decode(free.token_ids[3:5])
    cut = engine.generate(p, SamplingParams(max_new_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == tok.decode(free.token_ids)[: tok.decode(free.token_ids).find(stop)]


# ---------------------------------------------------------------- sampling: χ² losslessness


def _always_accept(draft_tokens, draft_probs, target_probs, generator=None):
    """Broken rule (negative control): accept every draft token, then a bonus token from p."""
    B, gamma = draft_tokens.shape
    return torch.full((B,), gamma), sample(target_probs[:, gamma], generator)


def _resample_from_p(draft_tokens, draft_probs, target_probs, generator=None):
    """Broken rule (negative control): correct accept test, but the recovered token is drawn from p
    instead of norm(max(0, p − q))."""
    k, nxt = rejection_sample(draft_tokens, draft_probs, target_probs, generator)
    rows = torch.arange(len(k))
    fresh = sample(target_probs[rows, k], generator)
    return k, torch.where(k < draft_tokens.shape[1], fresh, nxt)


SAMPLING_CASES = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4),
                  SamplingParams(temperature=1.3, top_p=0.8)]


@pytest.mark.parametrize("params", SAMPLING_CASES, ids=["T1", "T0.7-topk4", "T1.3-topp0.8"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_sampling_matches_target_distribution(params, gamma):
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt = [1, 5, 2]
    exact = exact_two_token_dist(target, prompt, params)
    engine = SpecDecoder(target, draft, None, gamma=gamma)
    counts = empirical(engine, prompt, params, n=6000, batch=500, seed0=1000 * gamma, gamma=gamma)
    assert chi2_p(counts, exact) > P_MIN


@pytest.mark.parametrize("vocab", [None, [0, 1, 2, 4, 6]], ids=["full-vocab", "draft-vocab-5-of-8"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_three_token_sampling_matches_target_distribution(gamma, vocab):
    """Three tokens: rounds after a rejection and cache rollback are sampled too (batches of 500 identical
    prompts advance raggedly); with a restricted draft vocabulary q is 0 outside it."""
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    exact = exact_three_token_dist(target, prompt, params)
    engine = SpecDecoder(target, draft, None, gamma=gamma, draft_vocab=vocab)
    counts = empirical(engine, prompt, params, n=8000, batch=500, seed0=1000 * gamma, gamma=gamma, tokens=3)
    assert chi2_p(counts, exact) > P_MIN


def test_three_token_sampling_with_float16_draft_steps_matches_target_distribution():
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    exact = exact_three_token_dist(target, prompt, params)
    engine = SpecDecoder(target, draft, None, gamma=3, draft_step_dtype=torch.float16)
    counts = empirical(engine, prompt, params, n=8000, batch=500, seed0=7000, gamma=3, tokens=3)
    assert chi2_p(counts, exact) > P_MIN


def test_bfloat16_decoding_stays_lossless(partial_pair, target_tokenizer):
    """bf16 decoding (what `pick_dtype` chooses on CPUs with native bf16; emulated, slowly, elsewhere):
    greedy equal to HF `generate` of the same bf16 target, and the χ² test over 3 sampled tokens against
    the bf16 target's exact distribution (computed by HF's forward, not the engine's)."""
    target, ref, draft = (copy.deepcopy(m).to(torch.bfloat16) for m in partial_pair)  # the fixture stays fp32
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3)
    params = SamplingParams(max_new_tokens=16)
    eos = target_tokenizer.eos_token_id
    for p in random_prompts(10, target.config.vocab_size, seed=51):
        assert engine.generate([p], params)[0].token_ids == hf_greedy(ref, p, 16, eos)
    t16, d16 = small_lm(0, 60.0).to(torch.bfloat16), small_lm(1, 60.0).to(torch.bfloat16)
    prompt, sp = [1, 5, 2], SamplingParams(temperature=1.0)
    exact = exact_three_token_dist(t16, prompt, sp)
    counts = empirical(SpecDecoder(t16, d16, None, gamma=3), prompt, sp, n=8000, batch=500, seed0=9000,
                       gamma=3, tokens=3)
    assert chi2_p(counts, exact) > P_MIN


@pytest.mark.parametrize("broken", [_always_accept, _resample_from_p], ids=["always-accept", "resample-from-p"])
def test_broken_acceptance_rule_fails_the_same_test(broken):
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    exact = exact_two_token_dist(target, prompt, params)
    engine = SpecDecoder(target, draft, None, gamma=3, verifier=broken)
    counts = empirical(engine, prompt, params, n=6000, batch=500, seed0=1000 * 3, gamma=3)
    assert chi2_p(counts, exact) < P_MIN


def test_target_only_sampling_matches_exact():
    target = small_lm(0, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, None, None)
    counts = empirical(engine, prompt, params, n=6000, batch=500, seed0=1000 * 1, gamma=1)
    assert chi2_p(counts, exact_two_token_dist(target, prompt, params)) > P_MIN


def test_rejection_sampler_marginal_is_p_by_monte_carlo():
    """One position, γ = 1: P(out = y) = q(y)·min(1, p/q) + P(reject)·residual(y) = p(y); estimated from 200,000
    draws of the draft token and the sampler's uniforms (Monte Carlo: 4e-3 is ≈ 4 standard errors)."""
    torch.manual_seed(0)
    p, q = torch.softmax(torch.randn(6) * 2, 0), torch.softmax(torch.randn(6) * 2, 0)
    counts = torch.zeros(6, dtype=torch.float64)
    n = 200_000
    x = torch.multinomial(q, n, replacement=True)[:, None]  # (n, 1)
    k, nxt = rejection_sample(x, q.expand(n, 1, 6), torch.stack([p, p]).expand(n, 2, 6),
                              torch.Generator().manual_seed(1))
    out = torch.where(k == 1, x[:, 0], nxt)
    counts += torch.bincount(out, minlength=6)
    assert torch.allclose(counts / n, p.double(), atol=4e-3)


def test_greedy_verify_is_the_rejection_sampler_on_one_hot_distributions():
    torch.manual_seed(0)
    B, gamma, V = 64, 4, 7
    target_argmax = torch.randint(0, V, (B, gamma + 1))
    x = torch.where(torch.rand(B, gamma) < 0.6, target_argmax[:, :gamma], torch.randint(0, V, (B, gamma)))
    oh = lambda t: torch.nn.functional.one_hot(t, V).float()  # noqa: E731
    k, nxt = greedy_verify(x, target_argmax)
    k_ref, nxt_ref = rejection_sample(x, oh(x), oh(target_argmax))
    assert torch.equal(k, k_ref) and torch.equal(nxt, nxt_ref)
    assert set(k.tolist()) == set(range(gamma + 1))  # every outcome, bonus included, was exercised


def test_logits_to_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert logits_to_probs(logits, SamplingParams()).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    topk = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (topk[0, 2:] == 0).all() and topk.sum().item() == pytest.approx(1.0)
    full = torch.softmax(logits, -1)[0]
    topp = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-4))
    assert (topp[0, :2] > 0).all() and (topp[0, 2:] == 0).all()


def test_bad_sampling_params_are_named():
    for kw, name in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                     ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kw)

