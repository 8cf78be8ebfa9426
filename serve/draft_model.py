"""The Llama draft model as a chain proposer (vLLM's `draft_model.py`): γ tokens drafted autoregressively on the
draft's own KV cache, then verified and emitted (`serve.verification`), both caches rolled back to the columns
every sequence agrees with (`serve.batch_state`: the cache invariant)."""

from __future__ import annotations

import torch

from draftalign.sampling import SamplingParams, draw
from serve.batch_state import Generation, _Batch, _crop
from serve.verification import Verification


class DraftModelProposer(Verification):
    """Mixin of `serve.specdec.SpecDecoder`: chain rounds drafted by the Llama draft `_d` (a `serve.heads._Head`,
    swapped by `refresh_draft`), γ per round or the goodput policy's choice from each request's acceptance."""

    def _spec_rounds(self, batch: _Batch, params: SamplingParams, gamma: int, gen: torch.Generator):
        t_cache, d_cache = self._t.new_cache(batch), self._d.new_cache(batch)
        t_len = d_len = 0
        B = batch.ids.shape[0]
        rows = torch.arange(B, device=self.device)
        gens = [Generation([], accepted_per_position=[0] * gamma, accepted_histogram=[0] * (gamma + 1))
                for _ in range(B)]
        active = [True] * B
        d = self._d
        requests = None if self.policy is None else self.policy.begin(B)  # α̂ per sequence (serve.goodput)
        while any(active) and batch.length + gamma + 1 <= self.max_len:
            if self._d is not d:  # `refresh_draft` ran since the last round: start the draft cache over
                d, d_cache, d_len = self._d, self._d.new_cache(batch), 0
            L = batch.length
            g = gamma if requests is None else min(gamma, requests.choose(active))  # this round's γ (0: target only)
            # 1. Draft proposes γ tokens: x_i ~ q(· | seq, x_<i). Its first prediction is read at each
            #    sequence's own last column, the later ones at the grid's last column.
            draft_tokens, draft_probs, extra = [], [], None
            for i in range(g):
                h = self._timed("draft", d_len == 0, d.hidden, d_cache, batch, d_len, extra)
                h = h[rows, (batch.last - d_len).clamp_min(0)] if i == 0 else h[:, -1]  # (B, H)
                d_len = L + i
                q, q_sub = d.probs(h, params)  # (B, V), (B, N)
                draft_probs.append(q)
                draft_tokens.append(d.token(draw(q_sub, params, gen)))
                extra = torch.stack(draft_tokens, 1)
            x = torch.stack(draft_tokens, 1) if g else batch.ids.new_zeros(B, 0)  # (B, γ)
            q = torch.stack(draft_probs, 1) if g else None  # (B, γ, V)
            # The draft cache now covers the grid ++ x_<γ: x_γ itself was never fed.

            # 2. Target scores all γ + 1 positions in one pass: after each sequence's last real token,
            #    and after each draft token.
            _, _, z, p = self._score_chain(t_cache, batch, t_len, x, L, g, params)  # (B, γ+1, V) each

            # 3. Verify: accept a prefix, then a recovered or bonus token; sequence s emits k_s + 1 tokens.
            out, ks = self._verify_chain(x, q, p, params, gen)  # (B, γ+1), k_s per sequence
            expected = torch.minimum(p[:, :g], q).sum(-1) if requests is not None and g else None  # α_i (B, γ)
            new, live, n = self._emit(gens, active, batch, out, ks, g, params, x, q, z, requests, expected)
            # 4. Roll both caches back to the columns every sequence still agrees with.
            t_len = L + min(ks[s] for s in live)
            _crop(t_cache, t_len)
            d_len = min(d_len, t_len)
            _crop(d_cache, d_len)
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)
