"""Token trees in the engine: LeanLlama's tree pass and KV compaction, and lossless tree decoding in SpecDecoder.

LeanLlama: one pass over the tree on top of the KV cache (explicit attention rows and positions) gives each node
the logits of a plain HF forward over prefix ++ its path, and the cache compacted to an accepted path continues
like a plain one. SpecDecoder(tree=...): greedy decoding equals HF `generate` of the target alone, with a draft
that agrees partially (partial paths and non-first siblings accepted), through the lean and the HF bodies, in
ragged batches; tree [1] * γ equals the chain path; sampling passes a χ² test of the first three tokens against
the target's exact distribution, and a rule without the residual update fails it.
"""

from __future__ import annotations

import pytest
import torch
from specdec_helpers import (
    chi2_p,
    empirical,
    exact_three_token_dist,
    hf_greedy,
    random_prompts,
    small_lm,
)
from transformers import LlamaConfig, LlamaForCausalLM

import serve.draft_tree as specdec_mod
import serve.tree as tree_mod
from draftalign.sampling import SamplingParams
from serve.lean_llama import LeanLlama
from serve.specdec import SpecDecoder
from serve.tree import kv_keep_index, path_to, static_tree, tree_attention_mask, tree_positions

ATOL = 1e-5
P_MIN = 0.01  # χ² p-value above which the empirical distribution is accepted as the target's


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- LeanLlama: tree pass and compaction
V_LM = 50


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V_LM, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(cfg).float().eval()


@torch.no_grad()
def _plain_last(model, ids: list[int]) -> torch.Tensor:
    """HF's own forward, no cache, no mask: the logits after the last token (V,)."""
    return model(torch.tensor([ids])).logits[0, -1]


def _grid(prefixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask (B, W)."""
    W = max(len(p) for p in prefixes)
    ids = torch.zeros(len(prefixes), W, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prefixes):
        ids[b, W - len(p):], mask[b, W - len(p):] = torch.tensor(p), 1
    return ids, mask


def _tree_pass(lean: LeanLlama, prefixes: list[list[int]], parents: torch.Tensor, tokens: torch.Tensor, fed: int,
               per_sequence: bool = False):
    """Prefill all but the last `fed` grid columns, then ONE call feeding those columns (causal rows) and the
    tree nodes (tree rows, positions prefix_len + depth − 1) → (cache, grid width, hidden of the nodes (B, N, H)).
    per_sequence: pass the rows as (B, n, T) instead of (n, T)."""
    ids, mask = _grid(prefixes)
    B, W = ids.shape
    N = parents.numel()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = lean.new_cache(B, capacity=4)  # grows during the calls
    lean.hidden(cache, ids[:, : W - fed], mask[:, : W - fed], pos[:, : W - fed], 0)
    rows = torch.ones(W + N, W + N, dtype=torch.bool).tril()  # causal rows for the grid's columns
    rows[W:] = tree_attention_mask(parents, W)  # the tree's rows
    ids = torch.cat([ids, tokens], 1)
    positions = torch.cat([pos, mask.sum(1, keepdim=True) + tree_positions(parents, 0)[None]], 1)
    mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    rows = rows[W - fed:].expand(B, -1, -1) if per_sequence else rows[W - fed:]
    h = lean.hidden(cache, ids, mask, positions, W - fed, rows)  # (B, fed + N, H)
    assert cache.get_seq_length() == W + N
    return cache, W, h[:, fed:]


def _prefixes(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V_LM, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("branching", [[2, 2, 1], [3, 1], [1, 1, 1]])
def test_lean_tree_pass_equals_plain_forward_per_path(lm, branching):
    """A ragged batch of two (left padding, different prefix lengths) and two grid columns fed with the tree."""
    t = static_tree(branching)
    prefixes = _prefixes([7, 4], seed=len(branching))
    tokens = torch.randint(1, V_LM, (2, t.num_nodes), generator=torch.Generator().manual_seed(5))
    _, _, h = _tree_pass(LeanLlama(lm), prefixes, t.parents, tokens, fed=2)
    logits = h @ lm.lm_head.weight.T  # (B, N, V)
    for b, prefix in enumerate(prefixes):
        for i in range(t.num_nodes):
            want = _plain_last(lm, prefix + tokens[b, path_to(t.parents, i)].tolist())
            torch.testing.assert_close(logits[b, i], want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_lean_compacted_cache_continues_like_a_plain_one(lm):
    """Per-sequence keep index (B, m): each row keeps its own path (the same length), then one more token."""
    t = static_tree([2, 2, 1])
    prefixes = _prefixes([6, 3], seed=3)
    tokens = torch.randint(1, V_LM, (2, t.num_nodes), generator=torch.Generator().manual_seed(6))
    lean = LeanLlama(lm)
    for leaves in ((9, 6), (4, 3), (1, 0), (None, None)):  # paths of length 3, 2, 1, 0
        cache, W, _ = _tree_pass(lean, prefixes, t.parents, tokens, fed=1, per_sequence=True)
        paths = [torch.tensor(path_to(t.parents, leaf) if leaf is not None else [], dtype=torch.long)
                 for leaf in leaves]
        cache.keep(torch.stack([kv_keep_index(p, W) for p in paths]))  # (B, W + k)
        k = len(paths[0])
        assert cache.get_seq_length() == W + k
        nxt = torch.tensor([[17], [23]])
        ids, mask = _grid(prefixes)
        ids = torch.cat([ids, torch.stack([tokens[b, p] for b, p in enumerate(paths)]), nxt], 1)  # (B, W + k + 1)
        mask = torch.cat([mask, torch.ones(2, k + 1, dtype=torch.long)], 1)
        h = lean.hidden(cache, ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), W + k)[:, -1]  # (B, H)
        for b, prefix in enumerate(prefixes):
            want = _plain_last(lm, prefix + tokens[b, paths[b]].tolist() + nxt[b].tolist())
            torch.testing.assert_close(h[b] @ lm.lm_head.weight.T, want, atol=ATOL, rtol=0)


def test_kv_cache_keep_moves_only_the_tail(lm):
    lean = LeanLlama(lm)
    cache = lean.new_cache(1, capacity=8)
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, :6] = torch.arange(6.0)[None, None, :, None]
    cache.length = 6
    cache.keep(torch.tensor([0, 1, 2, 3]))  # identity: a crop
    assert cache.length == 4
    cache.length = 6
    cache.keep(torch.tensor([0, 1, 4, 5]))
    assert cache.length == 4 and cache.k[1][0, 0, :4, 0].tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="out of range"):
        cache.keep(torch.tensor([0, 9]))


# ---------------------------------------------------------------- engine: greedy losslessness
SHAPES = [[1, 1, 1], [2, 2, 1], [3, 1]]


@torch.no_grad()

@pytest.mark.parametrize("branching", SHAPES, ids=["chain-1x1x1", "2x2x1", "3x1"])
def test_greedy_tree_equals_hf_generate(partial_pair, target_tokenizer, branching):
    target, ref, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, tree=branching)
    D, N = len(branching), static_tree(branching).num_nodes
    params = SamplingParams(max_new_tokens=24)
    hist, siblings = [0] * (D + 1), 0
    for p in random_prompts(16, target.config.vocab_size, seed=40):
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, target_tokenizer.eos_token_id)
        assert (got.proposed, got.tree_nodes) == (D * got.rounds, N * got.rounds)
        assert sum(got.accepted_histogram) == got.rounds
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
        siblings += got.accepted_siblings
    assert all(h > 0 for h in hist[1:D]), hist  # partial paths accepted (and the caches compacted to them)
    assert siblings > 0 or max(branching) == 1  # a path through a draft's non-first choice was accepted


def test_chain_tree_equals_chain_path(partial_pair, target_tokenizer):
    target, _, draft = partial_pair
    params = SamplingParams(max_new_tokens=20)
    for gamma in (1, 3):
        chain = SpecDecoder(target, draft, target_tokenizer, gamma=gamma)
        tree = SpecDecoder(target, draft, target_tokenizer, tree=[1] * gamma)
        for p in random_prompts(6, target.config.vocab_size, seed=50 + gamma):
            a, b = chain.generate([p], params)[0], tree.generate([p], params)[0]
            assert b.token_ids == a.token_ids
            assert (b.rounds, b.accepted, b.rejected, b.accepted_histogram) == (
                a.rounds, a.accepted, a.rejected, a.accepted_histogram)


def test_ragged_batch_of_trees_equals_single(partial_pair, target_tokenizer):
    target, _, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, tree=[2, 2, 1])
    params = SamplingParams(max_new_tokens=20)
    prompts = random_prompts(8, target.config.vocab_size, seed=61)
    batched = engine.generate(prompts, params)
    assert len({tuple(g.accepted_histogram) for g in batched}) > 1  # sequences advanced by different k
    for p, b in zip(prompts, batched):
        single = engine.generate([p], params)[0]
        assert b.token_ids == single.token_ids
        assert (b.rounds, b.accepted, b.rejected, b.accepted_siblings) == (
            single.rounds, single.accepted, single.rejected, single.accepted_siblings)


def test_restricted_draft_vocabulary_tree(partial_pair, target_tokenizer):
    """The draft's head on a third of the vocabulary: its top-k children are mapped back to token ids."""
    target, ref, draft = partial_pair
    vocab = sorted(set(range(0, target.config.vocab_size, 3)) | {target_tokenizer.eos_token_id})
    engine = SpecDecoder(target, draft, target_tokenizer, tree=[2, 2, 1], draft_vocab=vocab)
    params = SamplingParams(max_new_tokens=16)
    accepted = 0
    for p in random_prompts(6, target.config.vocab_size, seed=81):
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 16, target_tokenizer.eos_token_id)
        accepted += got.accepted
    assert accepted > 0


def test_hf_body_with_4d_tree_mask(partial_pair, target_tokenizer):
    """lean=False: both models run HF's body, the tree rows passed as a 4D additive mask."""
    target, ref, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, tree=[2, 2, 1], lean=False)
    params = SamplingParams(max_new_tokens=16)
    for p in random_prompts(4, target.config.vocab_size, seed=71):
        assert engine.generate([p], params)[0].token_ids == hf_greedy(ref, p, 16, target_tokenizer.eos_token_id)
    batched = engine.generate(random_prompts(4, target.config.vocab_size, seed=71), params)
    assert [g.token_ids for g in batched] == [hf_greedy(ref, p, 16, target_tokenizer.eos_token_id)
                                              for p in random_prompts(4, target.config.vocab_size, seed=71)]


def test_cropping_instead_of_compacting_is_caught(partial_pair, target_tokenizer, monkeypatch):
    """Negative control: keeping the first m tree columns (a chain's crop) instead of the accepted path breaks
    the greedy equality as soon as a non-first sibling is accepted."""
    target, ref, draft = partial_pair
    monkeypatch.setattr(specdec_mod, "_keep", lambda cache, index: specdec_mod._crop(cache, index.shape[1]))
    engine = SpecDecoder(target, draft, target_tokenizer, tree=[3, 1])
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    prompts = random_prompts(12, target.config.vocab_size, seed=42)
    assert any(engine.generate([p], params)[0].token_ids != hf_greedy(ref, p, 24, eos) for p in prompts)


def test_bad_tree_configuration_is_named(partial_pair):
    target, _, draft = partial_pair
    with pytest.raises(ValueError, match="needs a draft"):
        SpecDecoder(target, None, tree=[2, 1])
    with pytest.raises(ValueError, match="branching"):
        SpecDecoder(target, draft, tree=[2, 0])
    with pytest.raises(ValueError, match="exceeds the draft's vocabulary"):
        SpecDecoder(target, draft, tree=[4], draft_vocab=[0, 1, 2])
    with pytest.raises(ValueError, match="drafting"):
        SpecDecoder(target, draft, tree=[2], drafting="beam")
    engine = SpecDecoder(target, draft, tree=[2, 1])
    assert engine.gamma == 2
    with pytest.raises(ValueError, match="tree's depth"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=2), gamma=3)


# ---------------------------------------------------------------- engine: sampling χ² losslessness


CHI2_CASES = [([2, 2, 1], "topk", SamplingParams(temperature=1.0)),
              ([3, 1], "topk", SamplingParams(temperature=1.0)),
              ([2, 2], "with_replacement", SamplingParams(temperature=1.0)),
              ([2, 1], "without_replacement", SamplingParams(temperature=0.7, top_k=4))]


@pytest.mark.parametrize("branching, drafting, params", CHI2_CASES,
                         ids=["2x2x1-topk", "3x1-topk", "2x2-iid", "2x1-wor-T0.7-topk4"])
def test_tree_sampling_matches_target_distribution(branching, drafting, params):
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt = [1, 5, 2]
    engine = SpecDecoder(target, draft, None, tree=branching, drafting=drafting)
    counts = empirical(engine, prompt, params, n=6000, batch=500, tokens=3, seed0=7000)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) > P_MIN


def test_rule_without_residual_update_fails_the_same_test(monkeypatch):
    """Negative control: on a rejected sibling, test the next one (and draw the recovered token) from the unchanged
    p instead of norm(max(p − s, 0)). Same models, tree and trials: the χ² test must see it."""
    monkeypatch.setattr(tree_mod, "_residual", lambda p, s: p)
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, draft, None, tree=[2, 2, 1])
    counts = empirical(engine, prompt, params, n=6000, batch=500, tokens=3, seed0=7000)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) < P_MIN
