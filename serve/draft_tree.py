"""Token trees drafted by the Llama draft model, and the KV compaction to a tree's accepted path.

Token trees (`tree=[k_1, …, k_D]`, opt-in; `serve.tree`): a round drafts a static tree — k_d children
under every node at depth d − 1 — level by level, one draft pass per depth over the whole frontier
(each node at position prefix_len + depth − 1, seeing the sequence and its ancestors: the rows of
`tree_attention_mask`), then the target scores all N nodes plus the root in ONE pass with the same
mask. Verification walks down the tree: `verify_greedy` at temperature 0, else `verify_sample`
(recursive rejection over siblings) with the rule of the drafting scheme. Both caches are then
compacted to prefix ++ the accepted path (`kv_keep_index`; per sequence, to the shortest accepted
path of the batch, like the chain's crop), so the cache invariant (`serve.batch_state`) holds with
k_s = accepted depth. tree=[1] * γ is the chain (the same tokens at greedy), through the tree code.
"""

from __future__ import annotations

import torch

from draftalign.sampling import SamplingParams
from serve.batch_state import Generation, _Batch, _crop
from serve.lean_llama import KVCache
from serve.tree import ancestors, expand
from serve.verification import Verification


def _keep(cache, index: torch.Tensor) -> None:
    """Keep the columns index (B, m) of each sequence, in order, as columns [0, m) (tree compaction)."""
    if isinstance(cache, KVCache):
        cache.keep(index)
        return
    m = index.shape[1]
    if bool((index == torch.arange(m, device=index.device)).all()):
        _crop(cache, m)
        return
    for layer in cache.layers:  # DynamicCache: (B, KV, T, D) per layer
        B, KV, _, D = layer.keys.shape
        g = index[:, None, :, None].expand(B, KV, m, D)
        layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)


class DraftTreeProposer(Verification):
    """Mixin of `serve.specdec.SpecDecoder`: token-tree rounds drafted by the Llama draft `_d` on the static tree
    `tree` (a `serve.tree.Tree`), children drafted by `drafting`."""

    def _tree_rounds(self, batch: _Batch, params: SamplingParams, gen: torch.Generator):
        """Token-tree rounds (module docstring): draft level by level, verify every node in one target pass,
        compact both caches to the accepted path. Same cache invariant as `_spec_rounds`."""
        shape = self.tree
        drafting = "topk" if params.greedy else self.drafting
        D, N = shape.max_depth, shape.num_nodes
        t_cache, d_cache = self._t.new_cache(batch), self._d.new_cache(batch)
        t_len = d_len = 0
        B = batch.ids.shape[0]
        rows = torch.arange(B, device=self.device)
        nodes = torch.arange(N, device=self.device)
        anc = ancestors(shape.parents).to(self.device)  # (N, N): node i sees node j iff anc[i, j]
        gens = [Generation([], accepted_per_position=[0] * D, accepted_histogram=[0] * (D + 1)) for _ in range(B)]
        active = [True] * B
        d = self._d
        while any(active) and batch.length + D + 1 <= self.max_len:
            if self._d is not d:  # `refresh_draft` ran since the last round: start the draft cache over
                d, d_cache, d_len = self._d, self._d.new_cache(batch), 0
            L = batch.length
            # 1. Draft, one pass per depth d over its frontier: the root (each sequence's last column) at d = 1,
            #    else the nodes at depth d − 1 fed on top of the draft cache with their tree rows and positions.
            tokens = torch.empty(B, 0, dtype=torch.long, device=self.device)  # (B, nodes so far)
            qs = []
            for depth in range(1, D + 1):
                if depth == 1:
                    h = self._timed("draft", d_len == 0, d.hidden, d_cache, batch, d_len)
                    h = h[rows, (batch.last - d_len).clamp_min(0)][:, None]  # (B, 1, H)
                else:
                    above = shape.level(depth - 1)
                    h = self._timed("draft", False, d.hidden, d_cache, batch, L + above.start, tokens,
                                    anc[: above.stop, : above.stop])  # (B, F, H)
                if drafting == "topk":  # the draft's ranking (logits order = q's order on its support)
                    new = d.token(expand(shape, depth, d.logits(h)))  # (B, n_depth)
                else:
                    q, _ = d.probs(h, params)  # (B, F, V)
                    new = expand(shape, depth, q, drafting, gen)
                    qs.append(q)
                tokens = torch.cat([tokens, new], 1)
            # The draft cache now covers the grid ++ the nodes above depth D: the leaves were never fed.

            # 2. Target scores every slot in one pass: after each sequence's last real token, after each node.
            h = self._timed("target", t_len == 0, self._t.hidden, t_cache, batch, t_len, tokens, anc)
            at = torch.cat([(batch.last - t_len).clamp_min(0)[:, None],  # finished rows: any column
                            (L - t_len + nodes)[None].expand(B, -1)], 1)  # (B, N+1)
            p, _ = self._t.probs(h[rows[:, None], at], params)  # (B, N+1, V)

            # 3. Verify: walk down the tree; sequence s emits its accepted path (k_s nodes) + 1 token.
            new, path, ks, live, _ = self._verify_tree(gens, active, batch, shape, tokens, qs, p, params, gen, drafting)
            # 4. Compact both caches to the grid ++ the first m accepted nodes (m = the batch's shortest path):
            #    column L + j ← L + path[j] (`serve.tree.kv_keep_index`); the draft never fed the leaves.
            m = min(ks[s] for s in live)
            keep = torch.cat([torch.arange(L, device=self.device).expand(B, L), L + path[:, :m]], 1)  # (B, L+m)
            _keep(t_cache, keep)
            t_len = L + m
            d_len = L + min(m, D - 1)
            _keep(d_cache, keep[:, :d_len])
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)
