"""Sampled losslessness where rejections are shown to happen (issue #37): windows of γ + 2 tokens, so every sample
runs past its first round; the acceptance histograms must put mass strictly between 0 and γ accepted; and the
reference law is computed independently — the target's logits from its HF forward, then temperature, top-k and
top-p in numpy (not the project's `logits_to_probs`). Chains (γ = 3) and token trees, with top-k and top-p.

The exact law of the first 5 tokens (V⁵ = 32,768 sequences of a V = 8 model, one batched forward per depth) is
marginalised to what the samples can test: the joint of tokens 1–3 (512 cells: the first round and its
rejections) and the joint of tokens 4–5 (64 cells: always a later round, after a cache rollback). The served
per-request γ policy (`serve.goodput`) is tested the same way, with γ changing within every sampled window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from specdec_helpers import V, chi2_p, small_lm

from draftalign.sampling import SamplingParams
from serve.specdec import SpecDecoder

P_MIN = 1e-3
TOKENS = 5  # γ + 2 for γ = 3
N, BATCH = 6000, 500


def np_process(logits: np.ndarray, t: float, top_k: int, top_p: float) -> np.ndarray:
    """(..., V) logits → probabilities: softmax(z / t), then the top-k, then the smallest top-p nucleus, renormalised
    (ties at the k-th logit kept, like a sort-based filter would not: logits here are continuous)."""
    z = logits.astype(np.float64) / t
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_k:
        kth = np.sort(p, -1)[..., -top_k][..., None]
        p = np.where(p >= kth, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, -1)
        sorted_p = np.take_along_axis(p, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass strictly above each token
        keep_sorted = before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


@torch.no_grad()
def exact_joint(target, prompt: list[int], params: SamplingParams, tokens: int = TOKENS) -> np.ndarray:
    """P(x_1 … x_tokens | prompt) for every sequence → (V,) * tokens, one batched forward per depth."""
    joint = np.ones(())
    prefixes = np.zeros((1, 0), dtype=np.int64)
    for _ in range(tokens):
        ids = torch.cat([torch.tensor([prompt]).repeat(len(prefixes), 1), torch.from_numpy(prefixes)], 1)
        p = np_process(target(ids).logits[:, -1].numpy(), params.temperature, params.top_k, params.top_p)  # (P, V)
        joint = joint.reshape(-1, 1) * p  # (P, V)
        prefixes = np.concatenate([np.repeat(prefixes, V, 0), np.tile(np.arange(V), len(prefixes))[:, None]], 1)
        joint = joint.reshape(-1)
    return joint.reshape((V,) * tokens)


def samples(engine: SpecDecoder, prompt: list[int], params: SamplingParams, seed0: int, **kw):
    """(N, TOKENS) token ids and the summed accepted-count histogram of every round."""
    rows, hist = [], None
    for i in range(N // BATCH):
        p = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                           max_new_tokens=TOKENS, seed=seed0 + i)
        for g in engine.generate([prompt] * BATCH, p, **kw):
            assert len(g.token_ids) == TOKENS
            rows.append(g.token_ids)
            h = np.asarray(g.accepted_histogram)
            hist = h if hist is None else hist + h
    return np.asarray(rows), hist


def counts(rows: np.ndarray, cols: slice) -> torch.Tensor:
    part = rows[:, cols]
    cells = np.zeros(len(part), dtype=np.int64)
    for j in range(part.shape[1]):
        cells = cells * V + part[:, j]
    return torch.from_numpy(np.bincount(cells, minlength=V ** part.shape[1]).astype(np.float64))


def assert_lossless(rows: np.ndarray, exact: np.ndarray) -> None:
    first = torch.from_numpy(exact.sum(axis=(3, 4)).reshape(-1))  # tokens 1-3
    later = torch.from_numpy(exact.sum(axis=(0, 1, 2)).reshape(-1))  # tokens 4-5
    assert chi2_p(counts(rows, slice(0, 3)), first) > P_MIN
    assert chi2_p(counts(rows, slice(3, 5)), later) > P_MIN


def assert_rejections_happened(hist: np.ndarray, depth: int) -> None:
    """Mass strictly inside (0, γ): rounds that accepted some drafted tokens and then rejected one."""
    assert hist is not None and len(hist) == depth + 1
    assert hist[1:depth].sum() > 0.05 * hist.sum(), hist.tolist()
    assert hist[0] > 0 and hist[depth] > 0, hist.tolist()


CASES = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4),
         SamplingParams(temperature=1.2, top_p=0.8)]
IDS = ["T1", "T0.8-topk4", "T1.2-topp0.8"]


def test_numpy_reference_agrees_with_an_enumerated_chain():
    """The reference itself: its 2-token joint equals p(a)·p(b | a) computed one prefix at a time."""
    target, params = small_lm(0, 60.0), SamplingParams(temperature=0.9, top_k=5, top_p=0.9)
    joint = exact_joint(target, [1, 5, 2], params, tokens=2)
    with torch.no_grad():
        p1 = np_process(target(torch.tensor([[1, 5, 2]])).logits[0, -1].numpy(), 0.9, 5, 0.9)
        for a in range(V):
            p2 = np_process(target(torch.tensor([[1, 5, 2, a]])).logits[0, -1].numpy(), 0.9, 5, 0.9)
            assert np.allclose(joint[a], p1[a] * p2, atol=1e-12)
    assert np.isclose(joint.sum(), 1.0)


@pytest.mark.parametrize("params", CASES, ids=IDS)
def test_chain_over_gamma_plus_two_tokens_with_rejections(params):
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt = [1, 5, 2]
    rows, hist = samples(SpecDecoder(target, draft, None, gamma=3), prompt, params, seed0=11_000, gamma=3)
    assert_rejections_happened(hist, 3)
    assert_lossless(rows, exact_joint(target, prompt, params))


@pytest.mark.parametrize("params", CASES[1:], ids=IDS[1:])
def test_tree_over_depth_plus_two_tokens_with_rejections(params):
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt = [1, 5, 2]
    engine = SpecDecoder(target, draft, None, tree=[2, 1, 1], drafting="topk")
    rows, hist = samples(engine, prompt, params, seed0=13_000)
    assert_rejections_happened(hist, 3)
    assert_lossless(rows, exact_joint(target, prompt, params))


def test_a_rule_that_never_rejects_fails_the_same_test():
    """Negative control: accept every drafted token (the draft's law leaks into the output)."""
    def always_accept(draft_tokens, draft_probs, target_probs, generator=None):
        B, gamma = draft_tokens.shape
        return torch.full((B,), gamma), torch.multinomial(target_probs[:, gamma], 1, generator=generator)[:, 0]

    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, draft, None, gamma=3, verifier=always_accept)
    rows, _ = samples(engine, prompt, params, seed0=11_000, gamma=3)
    exact = exact_joint(target, prompt, params)
    assert chi2_p(counts(rows, slice(0, 3)), torch.from_numpy(exact.sum(axis=(3, 4)).reshape(-1))) < P_MIN


def _swinging_policy(record: list[int]):
    """The served per-request policy (`serve.goodput.GoodputPolicy`) on a cost model whose γ* moves across 0 … 3
    with α̂ (each extra verified token costs 0.15 steps), request estimates that follow their last rounds, and a
    probe after 2 target steps: γ changes mid-sequence inside the 5-token window. α̂ learns from the accept draws
    (estimator="drawn"): the served expected counts Σ min(p, q) move α̂ too little over a batch of 500 copies of one
    prompt for γ to cross 0 … 3 in every call; either estimator reads only the past. record[i]: the γ of every
    round of decoding call i."""
    from serve.goodput import GoodputPolicy, StepCosts

    class Recorded(GoodputPolicy):
        def begin(self, batch):
            call, played = super().begin(batch), []
            record.append(played)
            choose = call.choose
            call.choose = lambda live: played.append(choose(live)) or played[-1]
            return call

    rows = {r * BATCH: 1.0 + 0.15 * (r - 1) for r in (1, 2, 3, 4)}  # a pass over r tokens per sequence
    return Recorded(StepCosts(target=rows, draft={BATCH: 0.01}), gamma_max=3, request_weight=1.0,
                    request_decay=0.5, probe_every=2, probe_max=2, estimator="drawn")


@pytest.mark.parametrize("params", CASES[:2], ids=IDS[:2])
def test_adaptive_gamma_over_gamma_plus_two_tokens_with_rejections(params):
    """γ chosen every round from each request's own acceptance (the served policy), changing mid-sequence."""
    target, draft = small_lm(0, 60.0), small_lm(0, 6.0)  # the target's weights, flatter: α ≈ 0.35 (T = 1) … 0.5
    prompt, played = [1, 5, 2], []
    engine = SpecDecoder(target, draft, None, gamma=3, policy=_swinging_policy(played))
    rows, hist = samples(engine, prompt, params, seed0=17_000, gamma=3)
    assert {0, 1, 2, 3} <= set().union(*played), played  # target steps, short and full drafts
    assert all(len(set(call)) > 1 for call in played), played  # γ changed within every call's 5 tokens
    assert hist[1:3].sum() > 0 and hist[0] > 0, hist.tolist()  # rejections after some acceptances, and at once
    assert_lossless(rows, exact_joint(target, prompt, params))


def test_adaptive_gamma_with_a_rule_that_never_rejects_fails():
    """Negative control for the adaptive case: the same policy and windows, a verifier that accepts everything."""
    def always_accept(draft_tokens, draft_probs, target_probs, generator=None):
        B, gamma = draft_tokens.shape
        return torch.full((B,), gamma), torch.multinomial(target_probs[:, gamma], 1, generator=generator)[:, 0]

    target, draft = small_lm(0, 60.0), small_lm(0, 6.0)
    prompt, params, played = [1, 5, 2], SamplingParams(temperature=1.0), []
    engine = SpecDecoder(target, draft, None, gamma=3, verifier=always_accept, policy=_swinging_policy(played))
    rows, _ = samples(engine, prompt, params, seed0=17_000, gamma=3)
    assert any(len(set(call)) > 1 for call in played), played  # every draft accepted: α̂ → 1, then γ = 3 throughout
    exact = exact_joint(target, prompt, params)
    assert chi2_p(counts(rows, slice(0, 3)), torch.from_numpy(exact.sum(axis=(3, 4)).reshape(-1))) < P_MIN
