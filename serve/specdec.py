"""Speculative decoding engine on torch causal LMs with KV caches (the reference, CPU and GPU).

One round (Leviathan et al. 2023): the draft proposes γ tokens autoregressively, the target scores
all γ + 1 positions in one forward pass, `serve.sampling.rejection_sample` keeps a prefix and adds a
recovered or bonus token. A batch of requests advances in lock-step: every active sequence emits
n = min_s(k_s + 1) tokens per round, where k_s is its accepted count. Stopping early at any
position is a stopping time of each sequence's own accept/reject chain, so this stays lossless;
at batch 1 it is the textbook algorithm.

Cache invariant between rounds: the sequence holds L committed tokens; the target cache covers the
first L − 1 of them; the draft cache covers at most L − 1. Each model is fed its uncached suffix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from serve.sampling import SamplingParams, logits_to_probs, rejection_sample, sample


@dataclass
class Generation:
    """One finished request: tokens, why it stopped, and its speculative statistics."""

    token_ids: list[int]
    finish_reason: str = "length"  # "stop" (EOS or stop string) or "length"
    text: str | None = None
    rounds: int = 0  # target forward passes
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the verifier accepted
    accepted_per_position: list[int] = field(default_factory=list)  # accepted at draft position i

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def block_efficiency(self) -> float:
        """τ = tokens emitted per target forward pass."""
        return len(self.token_ids) / self.rounds if self.rounds else 0.0


@dataclass
class Timing:
    draft_s: float = 0.0
    draft_steps: int = 0
    target_s: float = 0.0
    target_steps: int = 0


class _Batch:
    """Left-padded token ids, attention mask and positions of a batch of sequences."""

    def __init__(self, prompts: list[list[int]], pad_id: int, device):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p):] = torch.tensor(p, device=device)
            self.mask[i, width - len(p):] = 1

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def append(self, tokens: torch.Tensor) -> None:  # tokens (B, n)
        self.ids = torch.cat([self.ids, tokens], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], 1)


def _forward(model, cache: DynamicCache, batch: _Batch, start: int, extra: torch.Tensor | None = None):
    """Feed (batch.ids ++ extra)[:, start:] to `model` on top of `cache` → logits (B, n, V).

    `cache` must hold exactly the first `start` positions.
    """
    ids, mask = batch.ids, batch.mask
    if extra is not None:
        ids = torch.cat([ids, extra], 1)
        mask = torch.cat([mask, torch.ones_like(extra)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
                past_key_values=cache, use_cache=True)
    return out.logits


def _crop(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length` (negative crop: the non-deprecated form)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class SpecDecoder:
    """Target + draft speculative decoding; `generate_target_only` is the same loop without a draft."""

    def __init__(self, target, draft=None, tokenizer=None, gamma: int = 3, verifier=rejection_sample):
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if draft is not None and draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft vocab size {draft.config.vocab_size} != target vocab size "
                             f"{target.config.vocab_size}")
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.gamma, self.verifier = gamma, verifier
        self.device = next(target.parameters()).device
        eos = target.generation_config.eos_token_id if target.generation_config else None
        eos = eos if eos is not None else target.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = target.config.pad_token_id if target.config.pad_token_id is not None else 0
        self.max_len = target.config.max_position_embeddings
        self.timing = Timing()

    # ------------------------------------------------------------------ bookkeeping
    def _commit(self, gens: list[Generation], active: list[bool], emitted: torch.Tensor,
                params: SamplingParams) -> None:
        """Append emitted (B, n) tokens to each active generation; mark finished ones inactive."""
        for s, gen in enumerate(gens):
            if not active[s]:
                continue
            for tok in emitted[s].tolist():
                gen.token_ids.append(tok)
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

    def _finish(self, gens: list[Generation]) -> list[Generation]:
        if self.tokenizer is not None:
            for g in gens:
                if g.text is None:
                    ids = [t for t in g.token_ids if t not in self.eos_ids]
                    g.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return gens

    def _timed(self, kind: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        _sync(self.device)
        dt = time.perf_counter() - t0
        if kind == "draft":
            self.timing.draft_s += dt
            self.timing.draft_steps += 1
        else:
            self.timing.target_s += dt
            self.timing.target_steps += 1
        return out

    # ------------------------------------------------------------------ decoding
    def generate_target_only(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Plain autoregressive decoding of the target: one forward pass per token."""
        return self._drain(self.stream(prompts, params, use_draft=False))

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 gamma: int | None = None) -> list[Generation]:
        """Speculative decoding of a batch of token-id prompts (target-only when there is no draft)."""
        return self._drain(self.stream(prompts, params, gamma))

    def generate_stream(self, prompt: list[int], params: SamplingParams,
                        gamma: int | None = None) -> Iterator[tuple[list[int], Generation]]:
        """One prompt, round by round: yield (tokens committed this round, the generation so far); the last
        yield is ([], generation) with `text` and `finish_reason` set. Stop iterating early to cancel.
        Same loop and random stream as `generate([prompt])`, so a seeded stream equals it token for token."""
        for new, gens in self.stream([prompt], params, gamma):
            yield new[0], gens[0]

    @staticmethod
    def _drain(rounds) -> list[Generation]:
        for _, gens in rounds:  # noqa: B007 - the last yield carries the finished generations
            pass
        return gens

    def stream(self, prompts: list[list[int]], params: SamplingParams, gamma: int | None = None,
               use_draft: bool = True) -> Iterator[tuple[list[list[int]], list[Generation]]]:
        """The decoding loop. Yields after every target pass: (tokens each sequence committed, generations);
        a last ([] per sequence, finished generations) yield sets `text` and `finish_reason`."""
        with torch.inference_mode():
            gen = torch.Generator(self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
            batch = _Batch(prompts, self.pad_id, self.device)
            if self.draft is None or not use_draft:
                yield from self._target_rounds(batch, params, gen)
            else:
                yield from self._spec_rounds(batch, params, gamma or self.gamma, gen)

    def _emit(self, gens, active, emitted: torch.Tensor, params) -> list[list[int]]:
        before = [len(g.token_ids) for g in gens]
        self._commit(gens, active, emitted, params)
        return [g.token_ids[b:] for g, b in zip(gens, before)]

    def _target_rounds(self, batch: _Batch, params: SamplingParams, gen: torch.Generator):
        cache, cached = DynamicCache(), 0
        B = batch.ids.shape[0]
        gens = [Generation([]) for _ in range(B)]
        active = [True] * B
        while any(active) and batch.length < self.max_len:
            logits = self._timed("target", _forward, self.target, cache, batch, cached)[:, -1]
            cached = batch.length
            tok = sample(logits_to_probs(logits, params), gen)  # (B,)
            for g, a in zip(gens, active):
                g.rounds += a
            new = self._emit(gens, active, tok[:, None], params)
            batch.append(tok[:, None])
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)

    def _spec_rounds(self, batch: _Batch, params: SamplingParams, gamma: int, gen: torch.Generator):
        t_cache, d_cache = DynamicCache(), DynamicCache()
        t_len = d_len = 0
        B = batch.ids.shape[0]
        gens = [Generation([], accepted_per_position=[0] * gamma) for _ in range(B)]
        active = [True] * B
        while any(active) and batch.length + gamma + 1 <= self.max_len:
            # 1. Draft proposes γ tokens: x_i ~ q(· | seq, x_<i).
            draft_tokens, draft_probs = [], []
            extra = None
            for i in range(gamma):
                logits = self._timed("draft", _forward, self.draft, d_cache, batch, d_len, extra)[:, -1]
                d_len = batch.length + i
                q = logits_to_probs(logits, params)  # (B, V)
                draft_probs.append(q)
                draft_tokens.append(sample(q, gen))
                extra = torch.stack(draft_tokens, 1)
            x = torch.stack(draft_tokens, 1)  # (B, γ)
            q = torch.stack(draft_probs, 1)  # (B, γ, V)
            # The draft cache now covers seq ++ x_<γ: x_γ itself was never fed.

            # 2. Target scores all γ + 1 positions in one pass.
            logits = self._timed("target", _forward, self.target, t_cache, batch, t_len, x)
            p = logits_to_probs(logits[:, -(gamma + 1):], params)  # (B, γ+1, V)

            # 3. Verify: accept a prefix, then a recovered or bonus token.
            k, nxt = self.verifier(x, q, p, gen)  # (B,), (B,)
            out = torch.cat([x, torch.zeros_like(x[:, :1])], 1)  # (B, γ+1)
            out[torch.arange(B), k] = nxt
            n = min(int(k[s]) + 1 for s in range(B) if active[s])
            for s in range(B):
                if active[s]:
                    g, ks = gens[s], int(k[s])
                    g.rounds += 1
                    g.proposed += gamma
                    g.accepted += ks
                    for i in range(ks):
                        g.accepted_per_position[i] += 1
            emitted = out[:, :n]
            new = self._emit(gens, active, emitted, params)
            batch.append(emitted)
            # 4. Roll both caches back to the committed prefix minus its last token.
            t_len = batch.length - 1
            _crop(t_cache, t_len)
            d_len = min(d_len, t_len)
            _crop(d_cache, d_len)
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)
