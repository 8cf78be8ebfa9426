"""serve.tree: token-tree shape, one-pass tree attention, and lossless verification (pure torch, no Ray / vLLM).

Tree attention: one forward over prefix ++ tree with the tree mask and positions gives each node the logits
of a plain forward over prefix ++ its path (tiny random HF Llama, eager attention), and the KV cache
compacted to the accepted path continues like a plain cache. Greedy: tree decoding equals target-only
greedy decoding token for token. Sampling: χ² tests of the first one, two and three emitted tokens
against fixed target tables, for every drafting scheme with its own rule (and the point-mass rule on any
tree), and negative controls (a q-based rule applied to another scheme's tree, a rule without the
residual update) that the same test rejects.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import serve.tree as tree_mod
from draftalign.tree_shapes import DynamicTree
from serve.tree import (
    Tree,
    draft_tree,
    emitted,
    kv_keep_index,
    path_to,
    rerank,
    static_tree,
    tree_attention_mask,
    tree_positions,
    verify_greedy,
    verify_sample,
)

ATOL = 1e-5
P_MIN = 1e-3  # χ² p-value above which the empirical distribution is accepted as the target's


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- shape, mask, positions
def test_static_tree_shape():
    t = static_tree([2, 2, 1])
    assert t.parents.tolist() == [-1, -1, 0, 0, 1, 1, 2, 3, 4, 5]
    assert t.depths.tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert t.ranks.tolist() == [0, 1, 0, 1, 0, 1, 0, 0, 0, 0]
    assert t.level(2) == slice(2, 6) and t.frontier(1).tolist() == [0] and t.frontier(3).tolist() == [3, 4, 5, 6]
    assert t.children[:3].tolist() == [[0, 1], [2, 3], [4, 5]] and t.children[7:].tolist() == [[-1, -1]] * 4
    assert static_tree([1, 1, 1]).parents.tolist() == [-1, 0, 1]  # a chain
    assert path_to(t.parents, 9) == [1, 5, 9]


def test_bad_trees_are_named():
    for parents in ([0], [-1, 1], [-1, 0, -1], []):
        with pytest.raises(ValueError, match="parents"):
            Tree(torch.tensor(parents, dtype=torch.long))
    with pytest.raises(ValueError, match="branching"):
        static_tree([2, 0])


def test_rerank_hand_written():
    #   candidates: 0 (.6) ─ 2 (.5) ─ 4 (.45)      values fall along a path; 3 hangs under 1
    #               1 (.3) ─ 3 (.2)
    parents, values = [-1, -1, 0, 1, 2], torch.tensor([0.6, 0.3, 0.5, 0.2, 0.45])
    picked, t = rerank(parents, values, 4)
    assert picked == [0, 1, 2, 4]  # the four largest values, breadth-first
    assert t.parents.tolist() == [-1, -1, 0, 2]
    picked, t = rerank(parents, values, 2)
    assert picked == [0, 2] and t.parents.tolist() == [-1, 0]  # a chain when one path dominates
    # a tie goes to the shallower node; a candidate whose parent was not taken is skipped
    picked, _ = rerank([-1, 0, -1], torch.tensor([0.5, 0.5, 0.5]), 2)
    assert picked == [0, 2]


def test_rerank_is_the_best_subtree():
    """Against brute force: the picked set is closed under ancestors and has the largest total value of all
    such subtrees of its size (values fall along paths, as products of confidences do)."""
    import itertools

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        P = 9
        parents = [-1, -1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(2, P)]
        conf = torch.rand(P, generator=g, dtype=torch.float64)
        values = conf.clone()
        for i, p in enumerate(parents):
            if p >= 0:
                values[i] = values[p] * conf[i]
        n = 1 + trial % 5
        picked, t = rerank(parents, values, n)
        assert len(picked) == n and all(parents[i] < 0 or parents[i] in picked for i in picked)
        assert [parents[i] for i in picked] == [picked[j] if j >= 0 else -1 for j in t.parents.tolist()]
        best = max(sum(values[list(c)]) for c in itertools.combinations(range(P), n)
                   if all(parents[i] < 0 or parents[i] in c for i in c))
        assert float(values[picked].sum()) == pytest.approx(float(best))


def test_bad_dynamic_trees_are_named():
    with pytest.raises(ValueError, match="depth, topk and nodes"):
        DynamicTree(4, 0, 8)
    with pytest.raises(ValueError, match="nodes exceeds the 6 candidates"):
        DynamicTree(2, 2, 7)


def test_mask_and_positions_hand_written():
    #   root ─ 0 ─ 2
    #        │   └ 3
    #        └ 1 ─ 4
    parents = torch.tensor([-1, -1, 0, 0, 1])
    want = torch.tensor([
        # prefix  0  1  2  3  4
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree_attention_mask(parents, 3), want)
    assert tree_positions(parents, 3).tolist() == [3, 3, 4, 4, 4]


def test_kv_keep_index():
    assert kv_keep_index(torch.tensor([1, 4, -1]), 3).tolist() == [0, 1, 2, 4, 7]
    assert kv_keep_index(torch.tensor([-1, -1]), 2).tolist() == [0, 1]


# ---------------------------------------------------------------- one tree pass on a real model
V_LM = 50


def _lm(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V_LM, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="eager", pad_token_id=0)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def target():
    return _lm(0)


@pytest.fixture(scope="module")
def draft(target):
    """The target with a noisy LM head: agrees with it often, not always."""
    d = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        d.lm_head.weight.add_(0.7 * d.lm_head.weight.std() * torch.randn(d.lm_head.weight.shape, generator=g))
    return d


def _full_mask(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(1, 1, P+N, P+N) additive mask: causal prefix rows, then the tree's rows."""
    N = parents.numel()
    allowed = torch.zeros(prefix_len + N, prefix_len + N, dtype=torch.bool)
    allowed[:prefix_len, :prefix_len] = torch.ones(prefix_len, prefix_len, dtype=torch.bool).tril()
    allowed[prefix_len:] = tree_attention_mask(parents, prefix_len)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


@torch.no_grad()
def _tree_logits(model, prefix: list[int], parents: torch.Tensor, tokens: list[int], cache=None) -> torch.Tensor:
    """One cache-free forward over prefix ++ tree → logits per slot (N + 1, V): the root, then each node."""
    P = len(prefix)
    ids = torch.tensor([prefix + tokens])
    pos = torch.cat([torch.arange(P), tree_positions(parents, P)])[None]
    logits = model(input_ids=ids, attention_mask=_full_mask(parents, P), position_ids=pos,
                   past_key_values=cache, use_cache=cache is not None).logits[0]  # (P+N, V)
    return logits[P - 1:]


@torch.no_grad()
def _plain_last(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1]  # (V,)


def _prefix(n: int, seed: int) -> list[int]:
    return torch.randint(1, V_LM, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("branching", [[2, 2, 1], [3, 1], [1, 1, 1]])
def test_one_tree_pass_equals_plain_forward_per_path(target, branching):
    t = static_tree(branching)
    prefix = _prefix(7, seed=len(branching))
    tokens = torch.randint(1, V_LM, (t.num_nodes,), generator=torch.Generator().manual_seed(5)).tolist()
    got = _tree_logits(target, prefix, t.parents, tokens)  # (N+1, V)
    torch.testing.assert_close(got[0], _plain_last(target, prefix), atol=ATOL, rtol=0)
    for i in range(t.num_nodes):
        want = _plain_last(target, prefix + [tokens[j] for j in path_to(t.parents, i)])
        torch.testing.assert_close(got[1 + i], want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_compacted_cache_continues_like_a_plain_one(target):
    """Gather the cache to prefix ++ accepted path after a tree pass: the next token's logits are a plain forward's."""
    t = static_tree([2, 2, 1])
    prefix = _prefix(6, seed=3)
    tokens = torch.randint(1, V_LM, (t.num_nodes,), generator=torch.Generator().manual_seed(6)).tolist()
    for leaf in (9, 4, 1):  # paths of length 3, 2, 1
        path = torch.tensor(path_to(t.parents, leaf))
        cache = DynamicCache(config=target.config)
        _tree_logits(target, prefix, t.parents, tokens, cache)
        keep = kv_keep_index(path, len(prefix))
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        nxt = 17
        n = len(keep)
        got = target(torch.tensor([[nxt]]), position_ids=torch.tensor([[n]]), past_key_values=cache,
                     use_cache=True).logits[0, -1]
        want = _plain_last(target, prefix + [tokens[j] for j in path.tolist()] + [nxt])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- greedy
def test_verify_greedy_hand_written():
    t = static_tree([2, 2]).with_tokens(torch.tensor([[5, 7, 1, 2, 3, 4], [5, 7, 1, 2, 3, 4]]))
    # slots: root, nodes 0..5. Row 0: root→7 (node 1), node 1→4 (node 5), node 5→9 (bonus).
    # Row 1: root→8: no child matches, recovered token 8.
    argmax = torch.tensor([[7, 0, 4, 0, 0, 0, 9], [8, 0, 0, 0, 0, 0, 0]])
    out = verify_greedy(t, argmax)
    assert out.path.tolist() == [[1, 5], [-1, -1]]
    assert out.num_accepted.tolist() == [2, 0] and out.next_token.tolist() == [9, 8]
    assert emitted(t, out) == [[7, 4, 9], [8]]


def test_sampling_with_one_hot_target_is_greedy():
    g = torch.Generator().manual_seed(0)
    t = static_tree([3, 2, 1])
    B, V = 200, 4
    t = t.with_tokens(torch.randint(0, V, (B, t.num_nodes), generator=g))
    argmax = torch.randint(0, V, (B, t.num_nodes + 1), generator=g)
    p = torch.nn.functional.one_hot(argmax, V).float()
    want = verify_greedy(t, argmax)
    got = verify_sample(t, p, None, g)
    assert torch.equal(got.path, want.path) and torch.equal(got.next_token, want.next_token)
    assert len(set(want.num_accepted.tolist())) == 4  # every depth 0..3 occurred


def _lm_step(model, prefix: list[int], t: Tree):
    """draft_tree's step for a batch of one, cache-free: the draft's greedy distribution at the frontier."""
    def step(depth: int, above: torch.Tensor) -> torch.Tensor:
        n = above.shape[-1]
        logits = _tree_logits(model, prefix, t.parents[:n], above.reshape(-1).tolist())  # (n+1, V)
        return torch.softmax(logits[t.frontier(depth)], -1)[None]  # (1, F, V)
    return step


@torch.no_grad()
def _greedy(model, prefix: list[int], n: int) -> list[int]:
    seq = list(prefix)
    for _ in range(n):
        seq.append(int(_plain_last(model, seq).argmax()))
    return seq[len(prefix):]


@pytest.mark.parametrize("branching", [[2, 2, 1], [1, 1, 1], [4], [3, 2]])
def test_greedy_tree_decoding_equals_target_greedy(target, draft, branching):
    shape = static_tree(branching)
    n_new = 12
    accepted, side_branch = [], False
    for seed in range(4):
        prefix = _prefix(3 + 2 * seed, seed=10 + seed)
        seq = list(prefix)
        while len(seq) - len(prefix) < n_new:
            t, _ = draft_tree(shape, _lm_step(draft, seq, shape))  # top-k of the draft
            logits = _tree_logits(target, seq, t.parents, t.tokens[0].tolist())  # one target pass
            out = verify_greedy(t, logits.argmax(-1)[None])
            seq += emitted(t, out)[0]
            accepted.append(int(out.num_accepted))
            side_branch |= bool((t.ranks[out.path[0, : accepted[-1]]] > 0).any())
        assert seq[len(prefix):][:n_new] == _greedy(target, prefix, n_new)
    assert set(accepted) == set(range(shape.max_depth + 1)), accepted  # every path length, 0 … depth, happened
    assert side_branch or max(branching) == 1  # a path through a draft's non-first choice was accepted


# ---------------------------------------------------------------- sampling: χ² losslessness
V = 6  # the joint law of three tokens has 216 cells
TRIALS = 20_000


def _tables(seed: int, sharpness: float = 2.0) -> list[torch.Tensor]:
    """Fixed next-token laws after contexts of length 0, 1, 2: [(V,), (V, V), (V, V, V)] of (…, V) rows."""
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(sharpness * torch.randn((V,) * m + (V,), generator=g), -1).double() for m in range(3)]


def _law(tables: list[torch.Tensor], ctx: torch.Tensor) -> torch.Tensor:
    """ctx (B, m) → (B, V): the table's distribution after each row's context."""
    m = ctx.shape[1]
    return tables[0].expand(ctx.shape[0], V) if m == 0 else tables[m][tuple(ctx.T)]


def _slot_laws(t: Tree, tables: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """(B, N) tokens → (B, N + 1, V): the table's law after each slot's context (root, then each node's path)."""
    laws = [_law(tables, tokens[:, :0])]
    laws += [_law(tables, tokens[:, path_to(t.parents, i)]) for i in range(t.num_nodes)]
    return torch.stack(laws, 1)


def _table_step(t: Tree, tables: list[torch.Tensor], B: int):
    def step(depth: int, above: torch.Tensor) -> torch.Tensor:
        above = above.reshape(B, -1)
        return torch.stack([_law(tables, above[:, path_to(t.parents, s - 1) if s else []])
                            for s in t.frontier(depth).tolist()], 1)  # (B, F, V)
    return step


def _three_tokens(tables_p, branching, drafting, rule, seed, q_sharpness: float = 2.0) -> torch.Tensor:
    """TRIALS rounds from the same context → (TRIALS, 3) first three tokens (completed from p when a round emits
    fewer). The draft's tables are other random laws, peakier with q_sharpness."""
    g = torch.Generator().manual_seed(seed)
    tables_q = _tables(seed + 1, q_sharpness)
    shape = static_tree(branching)
    t, q = draft_tree(shape, _table_step(shape, tables_q, TRIALS), drafting, g)
    p = _slot_laws(t, tables_p, t.tokens)  # (B, N+1, V)
    out = verify_sample(t, p, q, g, rule)
    seq = torch.where(out.path >= 0, t.tokens.gather(1, out.path.clamp_min(0)), 0)  # (B, D) accepted tokens
    seq = torch.cat([seq, torch.zeros(TRIALS, 3, dtype=torch.long)], 1)  # (B, D+3)
    seq[torch.arange(TRIALS), out.num_accepted] = out.next_token
    seq, length = seq[:, :3], out.num_accepted + 1  # (B, 3): the round emitted its first `length`
    for m in range(3):  # exact target sampling after the round, as the next rounds would do in law
        need = length <= m
        if need.any():
            seq[need, m] = torch.multinomial(_law(tables_p, seq[need, :m]), 1, generator=g)[:, 0]
    return seq


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs * counts.sum() >= 5  # pool cells with small expected counts into one
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([probs[keep], probs[~keep].sum(0, keepdim=True)]) * counts.sum()
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp / exp.sum() * obs.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def _p_values(seq: torch.Tensor, tables: list[torch.Tensor]) -> list[float]:
    """χ² p-values of the first token, the first two and the first three against the exact target law."""
    exact = [tables[0]]
    exact.append(tables[0][:, None] * tables[1])
    exact.append(exact[1][:, :, None] * tables[2])
    pvals = []
    for m in (1, 2, 3):
        cell = torch.zeros(len(seq), dtype=torch.long)
        for j in range(m):
            cell = cell * V + seq[:, j]
        pvals.append(_chi2_p(torch.bincount(cell, minlength=V ** m).double(), exact[m - 1].reshape(-1)))
    return pvals


@pytest.mark.parametrize("q_sharpness", [2.0, 4.0], ids=["draft-near", "draft-peaky"])
@pytest.mark.parametrize("drafting", ["topk", "with_replacement", "without_replacement"])
@pytest.mark.parametrize("branching", [[2, 2], [3, 1], [1, 1]], ids=["2x2", "3x1", "chain"])
def test_sampling_matches_target_distribution(branching, drafting, q_sharpness):
    tables = _tables(0)
    seq = _three_tokens(tables, branching, drafting, drafting, seed=100, q_sharpness=q_sharpness)
    assert min(_p_values(seq, tables)) > P_MIN


def test_draft_equal_to_target_accepts_whole_paths():
    tables = _tables(0)
    g = torch.Generator().manual_seed(0)
    shape = static_tree([2, 2])
    t, q = draft_tree(shape, _table_step(shape, tables, 2000), "with_replacement", g)
    out = verify_sample(t, _slot_laws(t, tables, t.tokens), q, g, "with_replacement")
    assert (out.num_accepted == 2).all()  # p == q: the first child is always accepted


@pytest.mark.parametrize("drafting", ["with_replacement", "without_replacement"])
def test_point_mass_rule_is_lossless_on_any_tree(drafting):
    """The "topk" rule conditions on the candidates (draw y ~ p, follow the child holding y): lossless whatever
    drafted them, only less often accepting than the rule that knows q."""
    tables = _tables(0)
    seq = _three_tokens(tables, [3, 1], drafting, "topk", seed=100)
    assert min(_p_values(seq, tables)) > P_MIN


@pytest.mark.parametrize("drafting,rule", [
    ("topk", "with_replacement"),  # i.i.d. tests min(1, p/q) on deterministic candidates
    ("topk", "without_replacement"),  # the same with the without-replacement q update (siblings' q removed)
    ("with_replacement", "without_replacement"),  # q renormalised although siblings were i.i.d.
    ("without_replacement", "with_replacement"),  # q kept although siblings were drawn without replacement
], ids=["topk-tree/iid-rule", "topk-tree/wor-rule", "iid-tree/wor-rule", "wor-tree/iid-rule"])
def test_mismatched_rule_fails_the_same_test(drafting, rule):
    """Same tables, tree [2, 2] and trials as the lossless cases: the χ² test has the power to see a wrong rule
    (measured p-values ≤ 1e-20 here)."""
    tables = _tables(0)
    seq = _three_tokens(tables, [2, 2], drafting, rule, seed=100)
    assert min(_p_values(seq, tables)) < P_MIN


def test_rule_without_residual_update_fails_the_same_test(monkeypatch):
    """min(1, p/q) tests on a top-k tree, every sibling tested against the unchanged p, then a draw from p."""
    monkeypatch.setattr(tree_mod, "_residual", lambda p, s: p)
    tables = _tables(0)
    seq = _three_tokens(tables, [2, 2], "topk", "with_replacement", seed=100)
    assert min(_p_values(seq, tables)) < P_MIN
    monkeypatch.undo()
    seq = _three_tokens(tables, [2, 2], "topk", "topk", seed=100)  # the same run with the update: lossless
    assert min(_p_values(seq, tables)) > P_MIN
