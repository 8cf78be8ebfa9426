"""Chain drafting with an FSPAD head: γ tokens from the target's last verified features.

The piece a speculative-decoding engine calls between verification passes (EAGLE §3.2; vLLM's
`spec_decode` proposers play the same role). After a pass the target has features F_0 … F_{L−1}
of the verified tokens s_0 … s_{L−1} (post final norm, `learner/fspad.py`) and has emitted one more
token x (accepted, recovered or bonus) it has not read yet. The head then runs as in training, but
on its own predictions after the first step:

    node L−1:     (F_{L−1}, x)        at position L−1 → f̂_L,     q_1 = softmax(W f̂_L / T),     y_1 ~ q_1
    node L−2+i:   (f̂_{L−2+i}, y_{i−1}) at position L−2+i → f̂_{L−1+i}, q_i,  y_i ~ q_i     (i = 2 … γ)

with the head's KV cache holding the data nodes (F_d, s_{d+1}), d < L − 1. q is over the head's draft
vocabulary (zero elsewhere: the verifier's accept test stays exact, FR-Spec); greedy (T = 0) takes
argmax q. Returns the γ token ids and their q rows for the verifier.

`draft_chain` is the reference, cache-free per call; the engine's FSPAD rounds (`FSPADProposer`, a mixin of
`serve.specdec.SpecDecoder`) draft the same chains on a KV cache kept across rounds (tested against it), and
token trees — static or EAGLE-2's dynamic ones — with the same head columns, verified by `serve.verification`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from draftalign.sampling import SamplingParams, draw
from learner.fspad import FSPADHead
from serve.batch_state import Generation, _Batch, _crop
from serve.draft_tree import _keep
from serve.heads import _Rows
from serve.tree import Tree, ancestors, expand, rerank
from serve.verification import Verification


@torch.no_grad()
def draft_chain(head: FSPADHead, features: torch.Tensor, tokens: list[int] | torch.Tensor, next_token: int,
                gamma: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features (L, H) = F of the verified tokens (L, ), next_token = x → (ids (γ,) full-vocabulary ids,
    q (γ, n) the draft distributions they were drawn from; one-hot rows at T = 0)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # (L,)
    L = tokens.shape[0]
    if features.dim() != 2 or features.shape[0] != L:
        raise ValueError(f"features {tuple(features.shape)}: expected ({L}, H), one per verified token")
    if gamma < 1:
        raise ValueError(f"gamma must be ≥ 1, got {gamma}")
    cache = DynamicCache()
    if L > 1:  # the data nodes (F_d, s_{d+1}), d < L − 1: context for every drafted step
        head(features[None, :-1], tokens[None, 1:], torch.arange(L - 1)[None],
             torch.ones(L - 1, L - 1, dtype=torch.bool).tril()[None], past_key_values=cache)
    f, x = features[-1], int(next_token)
    ids, qs = [], []
    for i in range(gamma):
        pos = L - 1 + i
        f = head(f[None, None], torch.tensor([[x]]), torch.tensor([[pos]]),
                 torch.ones(1, 1, pos + 1, dtype=torch.bool), past_key_values=cache)[0, 0]  # (H,) f̂
        logits = head.logits(f).float()  # (n,)
        if temperature == 0:
            slot = int(logits.argmax())
            q = torch.zeros_like(logits).index_fill_(0, torch.tensor([slot]), 1.0)
        else:
            q = torch.softmax(logits / temperature, -1)
            slot = int(torch.multinomial(q, 1, generator=generator))
        x = int(head.vocab.full_ids(torch.tensor(slot)))
        ids.append(x)
        qs.append(q)
    return torch.tensor(ids), torch.stack(qs)


@torch.no_grad()
def propose(target, head: FSPADHead, prompt_ids: list[int], gamma: int, temperature: float = 0.0,
            generator: torch.Generator | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One target pass over `prompt_ids` (its features and its greedy next token x), then γ drafted tokens after
    x. Returns (x, ids (γ,), q (γ, n))."""
    out = target.get_decoder()(input_ids=torch.tensor([prompt_ids]))
    F = out.last_hidden_state[0].float()  # (L, H)
    x = int(target.get_output_embeddings()(F[-1:].to(target.dtype)).argmax())
    ids, q = draft_chain(head, F, prompt_ids, x, gamma, temperature, generator)
    return x, ids, q


class _Features(_Rows):
    """An FSPAD head (`learner.fspad.FSPADHead`) as the draft: f̂ = head(features, tokens, positions) on top of
    its own KV cache, read out through the target's frozen LM head rows (its draft vocabulary)."""

    def __init__(self, head, one_row_dtype: torch.dtype | None = None):
        ids = head.vocab.ids
        super().__init__(head.head_weight, None if ids is None else ids.to(head.head_weight.device),
                         head.shape["vocab_size"], one_row_dtype)
        self.head = head
        self.readout = getattr(head, "readout", None)  # EAGLE-3: its own final norm before the LM head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h if self.readout is None else self.readout(h))

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def hidden(self, cache: DynamicCache, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
               allowed: torch.Tensor) -> torch.Tensor:
        """features (B, n, H), tokens (B, n), positions (B, n), allowed (B, n, K) over the K = cached + n keys
        → f̂ (B, n, H); the n nodes' keys and values are appended to `cache`."""
        return self.head(features, tokens, positions, allowed, past_key_values=cache)


def _causal(keys: torch.Tensor, start: int) -> torch.Tensor:
    """keys (B, K) bool (columns holding a node) → (B, K − start, K) bool: query start + i sees key j iff
    j <= start + i and keys[:, j]."""
    K = keys.shape[1]
    cols = torch.arange(K, device=keys.device)
    return (cols[None] <= cols[start:, None])[None] & keys[:, None]


class FSPADProposer(Verification):
    """Mixin of `serve.specdec.SpecDecoder`: chain and token-tree rounds drafted by an FSPAD head `_f` (a
    `_Features`) from the target's features; static trees are `tree`, dynamic ones (EAGLE-2) `dynamic`. An
    EAGLE-3 head drafts the same rounds from the target's aux states instead (`_head_inputs`)."""

    def _head_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """The features the head reads from the target pass that returned h (B, n, H), column for column: h itself
        (FSPAD: post-norm last states) or that pass's aux states (B, n, len · H) (EAGLE-3, `serve.heads._Head`)."""
        return h if self._t.aux_layers is None else self._t.aux

    def _fspad_root(self, f_cache, batch: _Batch, pending: torch.Tensor, h_len: int, first: torch.Tensor,
                    extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed the head its pending verified nodes, columns [h_len, L), and read f̂ at each sequence's last
        column → (f̂ (B, H), keys (B, L + extra) bool: the head columns holding a node, draft columns after the
        grid included, positions (B, L + extra): pos(j) − 1)."""
        B, L = batch.ids.shape
        rows = torch.arange(B, device=self.device)
        keys = torch.cat([batch.mask.bool(), batch.mask.new_ones(B, extra, dtype=torch.bool)], 1)
        keys[rows, first] = False  # no feature before a sequence's first token
        pos = (torch.cat([batch.mask, batch.mask.new_ones(B, extra)], 1).cumsum(-1) - 2).clamp_min(0)
        f = self._timed("draft", h_len == 0, self._f.hidden, f_cache, pending, batch.ids[:, h_len:],
                        pos[:, h_len:L], _causal(keys[:, :L], h_len))  # (B, L − h_len, H)
        return f[rows, (batch.last - h_len).clamp_min(0)], keys, pos  # finished rows: any column

    def _fspad_rounds(self, batch: _Batch, params: SamplingParams, gamma: int, gen: torch.Generator):
        """Chain rounds drafted by an FSPAD head from the target's features (EAGLE §3.2; `serve.fspad_proposer`).

        Head column j of the grid holds the node (f_{j⁻}, s_j) at position pos(j) − 1, where j⁻ is the sequence's
        real column before j and f its target feature (post final norm: what `_Head.hidden` returns): the node
        at a sequence's last column gives f̂ after its last token, hence q_1; the draft nodes (f̂, y_i) follow at
        the grid's end. A sequence's first column has no feature before it: no node (masked).
        Head cache invariant between rounds: columns [0, h_len) hold nodes of verified features and tokens only,
        `pending` (B, L − h_len, H) the features of columns [h_len, L), fed at the next round's first draft pass.
        After a round the draft nodes are cropped (h_len = the round's L) and the i-th new column waits with the
        target's feature at the verified slot before it, hv[:, i] (slot 0: the old last column; i: x_i). So the
        accepted positions are re-fed with the target's real features, never the head's own f̂. The first round
        has no features yet: a target step (γ = 0) whose pass gives every prompt column's."""
        t_cache, f_cache = self._t.new_cache(batch), self._f.new_cache()
        t_len = h_len = 0
        pending = None  # (B, L − h_len, H); None before the first target pass
        B = batch.ids.shape[0]
        first = batch.mask.argmax(1)  # (B,) each sequence's first real column (left padding)
        gens = [Generation([], accepted_per_position=[0] * gamma, accepted_histogram=[0] * (gamma + 1))
                for _ in range(B)]
        active = [True] * B
        while any(active) and batch.length + gamma + 1 <= self.max_len:
            L = batch.length
            g = gamma if pending is not None else 0
            # 1. Draft: feed the pending verified nodes, read f̂ at each sequence's last column, then γ − 1 steps
            #    on the head's own predictions: y_i ~ q_i = softmax(W f̂ / T).
            draft_tokens, draft_probs = [], []
            if g:
                f, keys, pos = self._fspad_root(f_cache, batch, pending, h_len, first, g - 1)
                h_len, pending = L, pending[:, :0]
                for i in range(g):
                    q, q_sub = self._f.probs(f, params)  # (B, V), (B, N)
                    draft_probs.append(q)
                    draft_tokens.append(self._f.token(draw(q_sub, params, gen)))
                    if i + 1 < g:  # node (f̂, y_{i+1}) at column L + i
                        f = self._timed("draft", False, self._f.hidden, f_cache, f[:, None], draft_tokens[-1][:, None],
                                        pos[:, L + i: L + i + 1], _causal(keys[:, : L + i + 1], L + i))[:, 0]
            x = torch.stack(draft_tokens, 1) if g else batch.ids.new_zeros(B, 0)  # (B, γ)
            q = torch.stack(draft_probs, 1) if g else None  # (B, γ, V)

            # 2. Target scores all γ + 1 positions in one pass; its features there are the head's next inputs.
            h, hv, z, p = self._score_chain(t_cache, batch, t_len, x, L, g, params)  # hv: features at the slots
            a = self._head_inputs(h)  # (B, n, W) what the head reads
            av = a[torch.arange(B, device=self.device)[:, None], self._verified_slots(batch, t_len, L, g)]
            if pending is None:  # the first pass covers the prompt: column j ← f_{j−1}
                pending = torch.cat([a.new_zeros(B, 1, a.shape[-1]), a[:, : L - 1]], 1)  # (B, L, W)

            # 3. Verify, as `_spec_rounds`.
            out, ks = self._verify_chain(x, q, p, params, gen)  # (B, γ+1), k_s per sequence
            new, live, n = self._emit(gens, active, batch, out, ks, g, params, x, q, z)
            # 4. Roll back: the target to the columns every sequence agrees with, the head to its verified nodes;
            #    the new columns wait with the target's features before them (masked beyond k_s + 1).
            t_len = L + min(ks[s] for s in live)
            _crop(t_cache, t_len)
            _crop(f_cache, h_len)
            pending = torch.cat([pending, av[:, :n]], 1)
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)

    def _fspad_tree_rounds(self, batch: _Batch, params: SamplingParams, gen: torch.Generator):
        """Token-tree rounds drafted by an FSPAD head: `_fspad_rounds`' head columns and cache invariant, the tree
        drafted and verified as in `_tree_rounds`. A static tree (`_fspad_draft_static`) has the same shape every
        round; a dynamic one (`_fspad_draft_dynamic`, EAGLE-2) is expanded and reranked per round. Either way the
        head's drafting nodes sit after the verified columns, one head pass per depth, and the head is cropped to
        its verified nodes after verification (no compaction: the accepted path is re-fed with the target's
        features at its slots)."""
        drafting = "topk" if params.greedy or self.dynamic is not None else self.drafting
        D = self.gamma  # the tree's (largest) depth: proposals counted per round, as for a chain of D
        t_cache, f_cache = self._t.new_cache(batch), self._f.new_cache()
        t_len = h_len = 0
        pending = None
        B = batch.ids.shape[0]
        rows = torch.arange(B, device=self.device)
        first = batch.mask.argmax(1)  # (B,)
        if self.tree is not None:
            shape = self.tree
            anc = ancestors(shape.parents).to(self.device)  # (N, N): node i sees node j iff anc[i, j]
        gens = [Generation([], accepted_per_position=[0] * D, accepted_histogram=[0] * (D + 1)) for _ in range(B)]
        active = [True] * B
        while any(active) and batch.length + D + 1 <= self.max_len:
            L = batch.length
            if pending is None:  # no features yet: a target step over the prompt gives every column's
                h = self._timed("target", True, self._t.hidden, t_cache, batch, 0)  # (B, L, H)
                a = self._head_inputs(h)  # (B, L, W)
                pending = torch.cat([a.new_zeros(B, 1, a.shape[-1]), a[:, : L - 1]], 1)  # column j ← f_{j−1}
                hv = h[rows, batch.last][:, None]  # (B, 1, H)
                av = a[rows, batch.last][:, None]  # (B, 1, W)
                p, _ = self._t.probs(hv[:, 0], params)
                nxt = draw(p, params, gen)  # (B,)
                new = self._commit(gens, active, nxt[:, None].tolist(), params)
                for s in range(B):
                    gens[s].record_round(0, 0, len(new[s]))
                batch.append(nxt[:, None])
                t_len, pending = L, torch.cat([pending, av], 1)
                yield new, gens
                continue
            # 1. Draft: the pending verified nodes (→ f̂ at the root), then one head pass per depth.
            fh, keys, pos = self._fspad_root(f_cache, batch, pending, h_len, first, 0)
            h_len, pending = L, pending[:, :0]
            base = pos[rows, batch.last][:, None]  # (B, 1) the root node's position
            qs = []
            if self.dynamic is not None:
                shape, tokens = self._fspad_draft_dynamic(f_cache, fh, keys[:, :L], base)
                anc = ancestors(shape.parents).to(self.device)
            else:
                tokens, qs = self._fspad_draft_static(f_cache, fh, keys[:, :L], base, anc, params, gen, drafting)
            N = shape.num_nodes

            # 2. Target scores every slot in one pass; its features there are the head's next inputs.
            h = self._timed("target", False, self._t.hidden, t_cache, batch, t_len, tokens, anc)
            at = torch.cat([(batch.last - t_len).clamp_min(0)[:, None],  # finished rows: any column
                            (L - t_len + torch.arange(N, device=self.device))[None].expand(B, -1)], 1)  # (B, N+1)
            hs = h[rows[:, None], at]  # (B, N+1, H)
            hs_in = self._head_inputs(h)[rows[:, None], at]  # (B, N+1, W) what the head reads there
            p, _ = self._t.probs(hs, params)  # (B, N+1, V)

            # 3. Verify, as `_tree_rounds`.
            new, path, ks, live, n = self._verify_tree(gens, active, batch, shape, tokens, qs, p, params, gen, drafting)
            # 4. The target cache compacted to the grid ++ the shortest accepted path (`_tree_rounds`), the head
            #    cropped to its verified nodes; new column i waits with the target's feature at the slot before it.
            m = min(ks[s] for s in live)
            keep = torch.cat([torch.arange(L, device=self.device).expand(B, L), L + path[:, :m]], 1)  # (B, L+m)
            _keep(t_cache, keep)
            t_len = L + m
            _crop(f_cache, h_len)
            before = torch.cat([torch.zeros_like(path[:, :1]), path + 1], 1)  # slot before new column i
            pending = torch.cat([pending, hs_in[rows[:, None], before[:, :n]]], 1)
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)

    def _fspad_draft_static(self, f_cache, fh: torch.Tensor, keys: torch.Tensor, base: torch.Tensor,
                            anc: torch.Tensor, params: SamplingParams, gen: torch.Generator, drafting: str):
        """The static tree `self.tree`, level by level: node i is the head node (f̂ at its parent's slot, its token)
        at column L + i, position base + depth(i), seeing the verified nodes `keys` (B, L) and its ancestors; one
        head pass per depth over the frontier (the leaves are never fed). → (tokens (B, N), q per frontier slot
        for the sampled drafting schemes, else [])."""
        shape = self.tree
        B, L = keys.shape
        parents, depths = shape.parents.to(self.device), shape.depths.to(self.device)
        fhat = fh[:, None]  # (B, slots so far, H): slot 0 = root, 1 + i = node i
        tokens = torch.empty(B, 0, dtype=torch.long, device=self.device)  # (B, nodes so far)
        qs = []
        for depth in range(1, shape.max_depth + 1):
            if depth > 1:
                above = shape.level(depth - 1)
                seen = torch.cat([keys[:, None].expand(-1, above.stop - above.start, -1),
                                  anc[None, above, : above.stop].expand(B, -1, -1)], 2)  # (B, n, L + stop)
                f = self._timed("draft", False, self._f.hidden, f_cache, fhat[:, parents[above] + 1],
                                tokens[:, above], base + depths[above][None], seen)  # (B, n, H)
                fhat = torch.cat([fhat, f], 1)
            fr = fhat[:, shape.frontier(depth).to(self.device)]  # (B, F, H)
            if drafting == "topk":
                new_tokens = self._f.token(expand(shape, depth, self._f.logits(fr)))  # (B, n_depth)
            else:
                q, _ = self._f.probs(fr, params)  # (B, F, V)
                new_tokens = expand(shape, depth, q, drafting, gen)
                qs.append(q)
            tokens = torch.cat([tokens, new_tokens], 1)
        return tokens, qs

    def _fspad_draft_dynamic(self, f_cache, fh: torch.Tensor, keys: torch.Tensor,
                             base: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        """EAGLE-2's expansion and reranking (`tree_shapes.DynamicTree`) with the head. Candidates carry their
        path's log confidence log V = Σ log q over the path (the draft's unprocessed distribution); at each depth
        the `topk` candidates of the depth above with the largest Σ_b V (one shape for the batch: EAGLE-2's own
        rule at B = 1) are fed — each as (f̂ at its parent, its token) at position base + its depth, seeing the
        verified nodes `keys` (B, L) and its fed ancestors — and give `topk` children each. The `nodes`
        candidates of largest Σ_b V form the round's tree (`serve.tree.rerank`). → (Tree, tokens (B, N))."""
        spec = self.dynamic
        B, k = fh.shape[0], spec.topk
        logp, idx = torch.log_softmax(self._f.logits(fh).float(), -1).topk(k, -1)  # (B, k)
        tok, score = self._f.token(idx), logp  # per candidate (B, P)
        parents = [-1] * k
        level = list(range(k))  # candidates at the current depth
        col: dict[int, int] = {}  # fed candidate → its head column among the fed (its f̂ in f_fed)
        f_fed = fh.new_zeros(B, 0, fh.shape[-1])
        anc = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # ancestors among the fed, self included
        for depth in range(2, spec.depth + 1):
            value = score[:, level].exp().sum(0)  # (|level|,)
            beam = [level[j] for j in value.topk(min(k, len(level))).indices.tolist()]
            n0, b = len(col), len(beam)
            rows = torch.zeros(b, n0 + b, dtype=torch.bool, device=self.device)
            for r, i in enumerate(beam):
                if parents[i] >= 0:
                    rows[r, :n0] = anc[col[parents[i]]]
                rows[r, n0 + r] = True
            anc = torch.cat([torch.nn.functional.pad(anc, (0, b)), rows], 0)
            feats = torch.stack([fh if parents[i] < 0 else f_fed[:, col[parents[i]]] for i in beam], 1)  # (B, b, H)
            col.update({i: n0 + r for r, i in enumerate(beam)})
            seen = torch.cat([keys[:, None].expand(-1, b, -1), rows[None].expand(B, -1, -1)], 2)  # (B, b, L + n0 + b)
            f = self._timed("draft", False, self._f.hidden, f_cache, feats, tok[:, beam],
                            (base + depth - 1).expand(B, b), seen)  # (B, b, H)
            f_fed = torch.cat([f_fed, f], 1)
            logp, idx = torch.log_softmax(self._f.logits(f).float(), -1).topk(k, -1)  # (B, b, k)
            level = list(range(len(parents), len(parents) + b * k))
            parents += [i for i in beam for _ in range(k)]
            tok = torch.cat([tok, self._f.token(idx).reshape(B, b * k)], 1)
            score = torch.cat([score, (score[:, beam, None] + logp).reshape(B, b * k)], 1)
        picked, shape = rerank(parents, score.exp().sum(0), spec.nodes)
        return shape, tok[:, picked]
