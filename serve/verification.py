"""Verification and emission, the half of a round every proposer shares (vLLM: the rejection sampler and the
model runner's bookkeeping, apart from the proposers).

A chain round (Leviathan et al. 2023): the target scores all γ + 1 positions in one pass (`_score_chain`),
`draftalign.sampling.rejection_sample` (the engine's `verifier`) keeps a prefix of k accepted draft tokens and
adds one more — the recovered token, drawn from the residual max(0, p − q) after a rejection, or the bonus token,
drawn from p after γ acceptances (`_verify_chain`) — and sequence s emits its k_s + 1 tokens up to its stop
(`_emit`, `_commit`). A tree round walks down the tree instead (`_verify_tree`, `serve.tree`). The counts go to
`Generation.record_round` (α, τ: `serve.acceptance`), the goodput policy and the online observer (`RoundView`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from draftalign.sampling import SamplingParams, draw, greedy_verify
from serve.batch_state import Generation, _Batch
from serve.tree import Tree, verify_greedy, verify_sample


@dataclass
class RoundView:
    """What one chain round computed, handed to `SpecDecoder.observer` after verification (references to
    tensors the round already holds, no copies; `serve.online` reads them). Rows are the batch's sequences;
    only rows with live[s] took part. The grid (ids, mask) is the state before this round's tokens."""

    ids: torch.Tensor  # (B, L) the column grid, left-padded: context of s = ids[s][mask[s] == 1]
    mask: torch.Tensor  # (B, L)
    live: list[bool]  # sequences active in this round
    draft_tokens: torch.Tensor  # (B, γ) x_1 … x_γ
    draft_probs: torch.Tensor  # (B, γ, V) q after the request's sampling params (one-hot at greedy)
    target_logits: torch.Tensor  # (B, γ + 1, V) raw target logits at the γ + 1 verified positions
    num_accepted: list[int]  # k_s
    outcomes: list[tuple[int, int]]  # (accepted, rejected) of each live sequence (`round_outcome`)
    params: SamplingParams
    draft_version: int
    committed: list[list[int]] = field(default_factory=list)  # tokens s kept: out[s, :k_s + 1] up to its stop
    call: int = -1  # the decoding call (`SpecDecoder.stream`): (call, s) names one request


@dataclass
class Timing:
    """Seconds and counts of forward passes; the first pass of each model per call (the prompt's
    prefill) is kept apart, so target_s / target_steps is a decoding step (or a verification)."""

    draft_s: float = 0.0
    draft_steps: int = 0
    target_s: float = 0.0
    target_steps: int = 0
    prefill_s: float = 0.0
    prefills: int = 0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Verification:
    """Mixin of `serve.specdec.SpecDecoder`: the target's verification pass, the accept test, emission, counting
    and timing, shared by every proposer's round loop. It reads the engine's attributes (set in
    `SpecDecoder.__init__`): `_t` (the target's `serve.heads._Head`), `device`, `gamma`, `verifier`, `eos_ids`,
    `tokenizer`, `policy`, `observer`, `draft_version` and `timing`."""

    def _commit(self, gens: list[Generation], active: list[bool], emitted: list[list[int]],
                params: SamplingParams) -> list[list[int]]:
        """Append each active sequence's emitted tokens up to its stop; mark finished ones inactive.
        Returns the tokens each sequence committed."""
        new: list[list[int]] = []
        for s, gen in enumerate(gens):
            new.append([])
            if not active[s]:
                continue
            for tok in emitted[s]:
                gen.token_ids.append(tok)
                new[s].append(tok)
                if tok in self.eos_ids:
                    gen.finish_reason, active[s] = "stop", False
                    break
                if params.stop and self.tokenizer is not None:
                    text = self.tokenizer.decode(gen.token_ids)
                    hit = min((text.find(s_) for s_ in params.stop if s_ in text), default=-1)
                    if hit >= 0:
                        gen.text, gen.finish_reason, active[s] = text[:hit], "stop", False
                        break
                if len(gen.token_ids) >= params.max_new_tokens:
                    gen.finish_reason, active[s] = "length", False
                    break
        return new

    def _score_chain(self, t_cache, batch: _Batch, t_len: int, x: torch.Tensor, L: int, g: int,
                     params: SamplingParams):
        """A chain round's verification: one target pass over the columns from t_len and the γ proposals x →
        h (B, n, H) every fed column's state, hv (B, γ+1, H) the states that score the γ + 1 positions, their
        logits z and distributions p (B, γ+1, V)."""
        h = self._timed("target", t_len == 0, self._t.hidden, t_cache, batch, t_len, x)  # (B, n, H)
        rows = torch.arange(h.shape[0], device=self.device)
        hv = h[rows[:, None], self._verified_slots(batch, t_len, L, g)]  # (B, γ+1, H)
        z = self._t.logits(hv)  # (B, γ+1, V)
        p, _ = self._t.probs(hv, params, z)  # (B, γ+1, V)
        return h, hv, z, p

    def _verified_slots(self, batch: _Batch, t_len: int, L: int, g: int) -> torch.Tensor:
        """Columns of a chain pass's output (fed from column t_len) whose states score the γ + 1 positions:
        each sequence's last real token, then the grid's draft columns L … L + γ − 1 → (B, γ+1)."""
        B = batch.ids.shape[0]
        return torch.cat([(batch.last - t_len).clamp_min(0)[:, None],  # finished rows: any column
                          L - t_len + torch.arange(g, device=self.device)[None].expand(B, -1)], 1)

    def _verify_chain(self, x: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, params: SamplingParams,
                      gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
        """Step 3 of a chain round: x (B, γ) against p (B, γ+1, V) → (out (B, γ+1) = x with the recovered or
        bonus token at k_s, [k_s]). Greedy is the verifier's one-hot special case without its sampling;
        γ = 0 (no draft this round) is a target step."""
        B, g = x.shape
        if g and params.greedy:
            k, nxt = greedy_verify(x, p.argmax(-1))  # (B,), (B,)
        elif g:
            k, nxt = self.verifier(x, q, p, gen)  # (B,), (B,)
        else:
            k, nxt = torch.zeros(B, dtype=torch.long, device=self.device), draw(p[:, 0], params, gen)
        out = torch.cat([x, x.new_zeros(B, 1)], 1)  # (B, γ+1)
        out[torch.arange(B, device=self.device), k] = nxt
        return out, k.tolist()

    def _emit(self, gens: list[Generation], active: list[bool], batch: _Batch, out: torch.Tensor, ks: list[int],
              g: int, params: SamplingParams, x: torch.Tensor, q: torch.Tensor | None,
              z: torch.Tensor, requests=None, expected: torch.Tensor | None = None
              ) -> tuple[list[list[int]], list[int], int]:
        """After a chain round's verification (either draft kind): sequence s emits out[s, :k_s + 1] up to its
        stop; the round is counted, the call's goodput state (`requests`, a `serve.goodput.RequestGoodput`: the
        expected counts Σ α_i, (tested − Σ α_i) over the positions tested, from `expected` (B, γ) α_i = Σ min(p_i, q_i)
        when given, else the counted outcomes) and the online observer told; the emitted tokens join
        the grid (ragged: masked beyond k_s + 1). Returns (tokens committed per sequence, the sequences that
        were active, n = the widest emission)."""
        B = len(gens)
        was_active = list(active)
        new = self._commit(gens, active, [out[s, :ks[s] + 1].tolist() for s in range(B)], params)
        live = [s for s in range(B) if was_active[s]]
        outcomes = [gens[s].record_round(ks[s], g, len(new[s])) for s in live]
        if requests is not None and g:
            soft = None
            if expected is not None:  # Rao–Blackwell: E[accepted] over the same tested positions
                sums = expected.cumsum(-1).tolist()
                soft = {s: (sums[s][a + r - 1], a + r - sums[s][a + r - 1]) if a + r else (0.0, 0.0)
                        for s, (a, r) in zip(live, outcomes)}
            requests.observe(dict(zip(live, outcomes)), soft)
        if self.observer is not None and g:
            self.observer(RoundView(batch.ids, batch.mask, was_active, x, q, z, ks, outcomes, params,
                                    self.draft_version, new, batch.call))
        n = max(ks[s] + 1 for s in live)
        valid = torch.tensor([ks[s] + 1 if was_active[s] else 0 for s in range(B)], device=self.device)
        batch.append(out[:, :n], valid)
        return new, live, n

    def _verify_tree(self, gens: list[Generation], active: list[bool], batch: _Batch, shape: Tree,
                     tokens: torch.Tensor, qs: list[torch.Tensor], p: torch.Tensor, params: SamplingParams,
                     gen: torch.Generator, drafting: str):
        """After a tree pass (either draft kind): walk down the tree (`verify_greedy` at T = 0, else recursive
        rejection over siblings, `verify_sample`); sequence s emits its accepted path (k_s nodes) + 1 token up to
        its stop; the round is counted (as γ = the engine's depth) and the emitted tokens join the grid.
        tokens (B, N); qs: the draft's distributions per frontier slot of the sampled drafting schemes (else []);
        p (B, N + 1, V) the target's per slot. Returns (tokens committed per sequence, path (B, depth) root-first,
        k per sequence, the sequences that were active, n = the widest emission)."""
        B, N = tokens.shape
        t = shape.with_tokens(tokens)
        if params.greedy:
            out = verify_greedy(t, p.argmax(-1))
        else:
            q = None
            if qs:  # per slot; the leaves have no children, their rows are unused
                q = torch.cat(qs, 1)  # (B, 1 + nodes above the last depth, V)
                q = torch.cat([q, q.new_zeros(B, N + 1 - q.shape[1], q.shape[2])], 1)  # (B, N+1, V)
            out = verify_sample(t, p, q, gen, drafting)
        path = out.path.clamp_min(0)  # (B, depth)
        emit = torch.cat([tokens.gather(1, path), torch.zeros_like(path[:, :1])], 1)  # (B, depth + 1)
        emit[torch.arange(B, device=self.device), out.num_accepted] = out.next_token
        ks = out.num_accepted.tolist()
        side = (shape.ranks.to(self.device)[path] > 0).tolist()  # accepted node was not the draft's first choice
        was_active = list(active)
        new = self._commit(gens, active, [emit[s, : ks[s] + 1].tolist() for s in range(B)], params)
        live = [s for s in range(B) if was_active[s]]
        for s in live:
            acc, _ = gens[s].record_round(ks[s], self.gamma, len(new[s]))
            gens[s].tree_nodes += N
            gens[s].accepted_siblings += sum(side[s][:acc])
        n = max(ks[s] + 1 for s in live)
        valid = torch.tensor([ks[s] + 1 if was_active[s] else 0 for s in range(B)], device=self.device)
        batch.append(emit[:, :n], valid)
        return new, path, ks, live, n

    def _finish(self, gens: list[Generation]) -> list[Generation]:
        if self.tokenizer is not None:
            for g in gens:
                if g.text is None:
                    ids = [t for t in g.token_ids if t not in self.eos_ids]
                    g.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return gens

    def _timed(self, kind: str, first: bool, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(self.device)
        dt = time.perf_counter() - t0
        t = self.timing
        if first:
            t.prefill_s += dt
            t.prefills += 1
        elif kind == "draft":
            t.draft_s += dt
            t.draft_steps += 1
        else:
            t.target_s += dt
            t.target_steps += 1
        return out
