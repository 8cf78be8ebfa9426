"""Speculative decoding engine on torch causal LMs with KV caches (the reference, CPU and GPU).

One round (Leviathan et al. 2023): the draft proposes γ tokens autoregressively, the target scores
all γ + 1 positions in one forward pass, `draftalign.sampling.rejection_sample` keeps a prefix and adds a
recovered or bonus token. At batch 1 it is the textbook algorithm.

Batches are ragged: every sequence advances by its own k + 1 tokens per round. The batch is one
grid of columns; a round appends max_s(k_s + 1) columns, sequence s filling the first k_s + 1 and
masking the rest (attention mask 0, positions from the mask's cumulative sum). So a sequence's last
real token is not always the grid's last column: `_Batch.last` records it, and the next round reads
the first prediction of each sequence at its own last column. Masked columns are never attended.

Cache invariant between rounds: the target cache covers columns [0, t_len), the draft cache
[0, d_len), each holding correct keys and values for every sequence there; each model is fed the
columns from its cached length on. After a round, t_len = (old length) + min_s k_s: the column of
the recovered token (k_s + 1-th) held a rejected draft token's keys.

Token trees (`tree=[k_1, …, k_D]`, opt-in; `serve.tree`): a round drafts a static tree — k_d children
under every node at depth d − 1 — level by level, one draft pass per depth over the whole frontier
(each node at position prefix_len + depth − 1, seeing the sequence and its ancestors: the rows of
`tree_attention_mask`), then the target scores all N nodes plus the root in ONE pass with the same
mask. Verification walks down the tree: `verify_greedy` at temperature 0, else `verify_sample`
(recursive rejection over siblings) with the rule of the drafting scheme. Both caches are then
compacted to prefix ++ the accepted path (`kv_keep_index`; per sequence, to the shortest accepted
path of the batch, like the chain's crop), so the invariant above holds with k_s = accepted depth.
tree=[1] * γ is the chain (the same tokens at greedy), through the tree code.

Cost (see `serve.kernels`, `serve.lean_llama` and `draftalign.vocab`): both models run their bodies
through the lean Llama forward (fused weights, preallocated KV cache) and their linear layers through
the decode-sized matmul on CPU, the LM heads only at the positions whose distribution is used (one
per sequence per draft step, γ + 1 per verification), and the draft's head only on its
frequency-ranked vocabulary when it has one (q = 0 outside it: lossless).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from draftalign.sampling import SamplingParams, draw, greedy_verify, logits_to_probs, rejection_sample
from draftalign.tree_shapes import DynamicTree
from serve.acceptance import draft_acceptance, per_token_acceptance, round_outcome
from serve.goodput import GoodputPolicy, StepCosts
from serve.kernels import half_copy, one_row_linear, use_decode_matmul, use_one_row_dtype
from serve.lean_llama import KVCache, LeanLlama
from serve.tree import DRAFTING, Tree, ancestors, expand, rerank, static_tree, verify_greedy, verify_sample


@dataclass
class Generation:
    """One finished request: tokens, why it stopped, and its speculative statistics (emitted tokens only)."""

    token_ids: list[int]
    finish_reason: str = "length"  # "stop" (EOS or stop string) or "length"
    text: str | None = None
    rounds: int = 0  # target forward passes
    proposed: int = 0  # draft tokens proposed: γ per round; a tree's depth D per round (so α̂ stays comparable)
    accepted: int = 0  # draft tokens accepted and emitted
    rejected: int = 0  # rounds that ended in a rejection (their recovered token emitted)
    accepted_per_position: list[int] = field(default_factory=list)  # accepted at draft position (tree: depth) i
    accepted_histogram: list[int] = field(default_factory=list)  # rounds that accepted k = 0 … γ (tree: … D)
    target_only_rounds: int = 0  # rounds a goodput policy ran without a draft (γ = 0): in rounds, not in the histogram
    tree_nodes: int = 0  # tree mode: nodes the target verified (N per round)
    accepted_siblings: int = 0  # tree mode: accepted nodes that were not the draft's first choice (rank > 0)

    def record_round(self, k: int, gamma: int, emitted: int) -> tuple[int, int]:
        """Count one round that accepted k of γ draft tokens (a tree: of its depth) and emitted
        `emitted` tokens (fewer when a stop ended the request); returns (accepted, rejected) as counted."""
        acc, rej = round_outcome(k, gamma, emitted)
        self.rounds += 1
        if gamma == 0:
            self.target_only_rounds += 1
            return 0, 0
        self.proposed += gamma
        self.accepted += acc
        self.rejected += rej
        self.accepted_histogram[k] += 1
        for i in range(acc):
            self.accepted_per_position[i] += 1
        return acc, rej

    @property
    def acceptance_rate(self) -> float:
        """α̂ = accepted / (accepted + rejected): per-token acceptance (serve.acceptance)."""
        return per_token_acceptance(self.accepted, self.rejected)

    @property
    def draft_acceptance_rate(self) -> float:
        """accepted / proposed (vLLM's counters)."""
        return draft_acceptance(self.accepted, self.proposed)

    @property
    def block_efficiency(self) -> float:
        """τ = tokens emitted per target forward pass."""
        return len(self.token_ids) / self.rounds if self.rounds else 0.0


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


class _Batch:
    """The column grid of a batch: token ids, attention mask, and each sequence's last real column."""

    def __init__(self, prompts: list[list[int]], pad_id: int, device, call: int = -1):
        self.call = call  # SpecDecoder.stream's call number (RoundView.call)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        for i, p in enumerate(prompts):  # left padding
            self.ids[i, width - len(p):] = torch.tensor(p, device=device)
            self.mask[i, width - len(p):] = 1
        self.last = torch.full((len(prompts),), width - 1, dtype=torch.long, device=device)  # (B,)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def append(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """tokens (B, n); sequence s keeps its first valid[s] of them (default all), the rest masked."""
        n = tokens.shape[1]
        cols = torch.ones_like(tokens) if valid is None else (
            torch.arange(n, device=tokens.device)[None] < valid[:, None]).long()
        if valid is not None:
            self.last = torch.where(valid > 0, self.length + valid - 1, self.last)
        else:
            self.last = torch.full_like(self.last, self.length + n - 1)
        self.ids = torch.cat([self.ids, tokens], 1)
        self.mask = torch.cat([self.mask, cols], 1)


class _Rows:
    """An LM head's rows (n, H) over the token ids `ids` (sorted; None = all V rows, in order): logits on the
    rows, q over the full vocabulary (0 outside the rows: FR-Spec, the accept test stays exact), row → id."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor | None, vocab_size: int,
                 one_row_dtype: torch.dtype | None = None):
        self.vocab_size, self.ids, self.weight = vocab_size, ids, weight  # (n, H)
        self.half = half_copy(self.weight, one_row_dtype)  # (n, H) in one_row_dtype, or None
        self.one_row_dtype = one_row_dtype

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) → logits over the head's own rows (..., N)."""
        return one_row_linear(h, self.weight, self.half)

    def probs(self, h: torch.Tensor, params: SamplingParams,
              logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (..., H) → (probabilities over the full vocabulary (..., V), over the head's own rows).
        `logits`: self.logits(h) when the caller already has them (the online observer reads them too)."""
        sub = logits_to_probs(self.logits(h) if logits is None else logits, params)  # (..., N)
        if self.ids is None:
            return sub, sub
        full = sub.new_zeros(*sub.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.ids, sub), sub

    def token(self, sub_idx: torch.Tensor) -> torch.Tensor:
        return sub_idx if self.ids is None else self.ids[sub_idx]


class _Head(_Rows):
    """A model's body and LM head, the head restricted to `vocab` (sorted token ids) when given. The body
    runs through `serve.lean_llama` where it supports the model (lean=True), else HF's own forward."""

    def __init__(self, model, vocab: list[int] | None = None, lean: bool = True,
                 one_row_dtype: torch.dtype | None = None):
        if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
            raise ValueError(f"{type(model).__name__}: logit soft-capping / scaling is not supported by the engine")
        self.model, self.body = model, model.get_decoder()
        self.lean = LeanLlama(model, one_row_dtype) if lean and LeanLlama.supports(model) else None
        weight = model.get_output_embeddings().weight  # (V, H)
        ids = None if vocab is None else torch.tensor(vocab, dtype=torch.long, device=weight.device)
        super().__init__(weight if ids is None else weight.detach()[ids].contiguous(), ids, weight.shape[0],
                         one_row_dtype)

    def hidden(self, cache: DynamicCache, batch: _Batch, start: int, extra: torch.Tensor | None = None,
               anc: torch.Tensor | None = None):
        """Feed (batch.ids ++ extra)[:, start:] on top of `cache` (which holds `start` columns) → (B, n, H).

        anc (n_extra, n_extra) bool (`serve.tree.ancestors`): `extra` holds the first n_extra nodes of a token
        tree instead of a chain; node i sees the sequence's columns and its ancestors anc[i] and sits at position
        prefix_len + depth(i) − 1, depth(i) = Σ_j anc[i, j]."""
        ids, mask = batch.ids, batch.mask
        if extra is not None:
            ids = torch.cat([ids, extra], 1)
            mask = torch.cat([mask, torch.ones_like(extra)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        attn = None
        if anc is not None:
            L = batch.length
            positions[:, L:] = batch.mask.sum(1, keepdim=True) + anc.sum(1)[None] - 1  # prefix_len + depth − 1
            attn = _tree_rows(anc, L, start)  # (n, T)
        if self.lean is not None:
            return self.lean.hidden(cache, ids, mask, positions, start, attn)
        if attn is not None:  # HF takes a 4D additive mask over (cache + new) columns as it is
            allowed = attn[None, None] & mask.bool()[:, None, None]  # (B, 1, n, T)
            dtype = self.weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)  # finite: a query without keys gives no NaN
        out = self.body(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
                        past_key_values=cache, use_cache=True)
        return out.last_hidden_state

    def new_cache(self, batch: _Batch):
        """An empty KV cache for `batch` (the lean body's preallocated one, else HF's DynamicCache)."""
        if self.lean is not None:
            return self.lean.new_cache(batch.ids.shape[0], capacity=batch.length + 128)
        return DynamicCache()


class _Features(_Rows):
    """An FSPAD head (`learner.fspad.FSPADHead`) as the draft: f̂ = head(features, tokens, positions) on top of
    its own KV cache, read out through the target's frozen LM head rows (its draft vocabulary)."""

    def __init__(self, head, one_row_dtype: torch.dtype | None = None):
        ids = head.vocab.ids
        super().__init__(head.head_weight, None if ids is None else ids.to(head.head_weight.device),
                         head.shape["vocab_size"], one_row_dtype)
        self.head = head

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


def _crop(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length` (negative crop: the non-deprecated form)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


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


def _tree_rows(anc: torch.Tensor, length: int, start: int) -> torch.Tensor:
    """(n, T) bool attention rows of the columns [start, T) of a grid (`length` columns) ++ tree nodes (anc their
    ancestor matrix): causal for grid columns, `serve.tree.tree_attention_mask`'s rows (the whole grid, then the
    node's ancestors) for nodes. The sequences' padding is masked by the caller."""
    T = length + anc.shape[0]
    cols = torch.arange(T, device=anc.device)
    rows = cols[None] <= cols[start:, None]  # (n, T) causal
    first = max(start, length) - start  # first node row
    rows[first:, length:] = anc[max(start, length) - length:]
    return rows


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class SpecDecoder:
    """Target + draft speculative decoding; `generate_target_only` is the same loop without a draft.

    draft_vocab: the draft's frequency-ranked vocabulary (sorted ids; `draftalign.vocab`), None = full.
    decode_matmul: route small matrix products through `serve.kernels` (CPU; measured faster).
    lean: run Llama bodies through `serve.lean_llama` (fused weights, preallocated cache): a decoding
    step of the embedded target 30 vs 42 ms, a 4-token verification 34 vs 48 ms (2 cores, fp32).
    tree: branching per depth of a static token tree, e.g. [2, 2, 1] (N = 2 + 4 + 4 nodes, depth D = 3),
    None = a chain of gamma tokens (`verifier`). In tree mode gamma = D and rounds verify with
    `serve.tree`, drafting the children of a node as
      "topk" (default): the draft's top-k by logits, deterministic; verified by drawing from the
        target's residual (q unused) — lossless for any tree;
      "with_replacement" / "without_replacement": sampled from the draft's processed q, verified with
        min(1, p/s) tests and that scheme's residuals (SpecInfer / recursive speculative decoding);
        without replacement needs k tokens with q > 0 under every node (top-k/top-p may leave fewer).
    At temperature 0 the tree is always top-k and verified by `verify_greedy`.
    policy: a `serve.goodput.GoodputPolicy` picks each chain round's γ ≤ gamma from the batch size and the
    measured step costs (`measure_step_costs`); None = every round drafts gamma (the eval's setting).
    draft_step_dtype: the dtype of the draft's single-row products (`serve.kernels.one_row_linear`, e.g.
    torch.float16 on CPU), None = the draft's own. Lossless either way: q is what the draft computed.
    draft may also be an FSPAD head (`learner.fspad.FSPADHead`, draft.kind=fspad): it drafts from the target's
    features of the last verification pass (`_fspad_rounds`); its draft vocabulary is its own (draft_vocab
    None), and it has no goodput policy or hot-swap; draft_step_dtype applies to its layer and LM-head rows.
    """

    def __init__(self, target, draft=None, tokenizer=None, gamma: int = 3, verifier=rejection_sample,
                 draft_vocab: list[int] | None = None, decode_matmul: bool = True, lean: bool = True,
                 tree: list[int] | None = None, drafting: str = "topk", policy: GoodputPolicy | None = None,
                 draft_step_dtype: torch.dtype | None = None):
        from learner.fspad import FSPADHead, check_target

        features = isinstance(draft, FSPADHead)
        if features:
            if draft_vocab is not None:
                raise ValueError("an FSPAD head carries its own draft vocabulary: pass draft_vocab=None")
            check_target(draft.shape, target.config, "given to the engine")
            draft_vocab = None if draft.vocab.ids is None else draft.vocab.ids.tolist()
        self.tree, self.dynamic = None, None
        if tree is not None:
            if draft is None:
                raise ValueError("a token tree needs a draft model")
            dynamic = isinstance(tree, DynamicTree)
            if dynamic and not features:
                raise ValueError(f"{tree}: dynamic trees are drafted by an FSPAD head (draft.kind=fspad); "
                                 "give the Llama draft a static tree, e.g. [2, 1, 1]")
            width = tree.topk if dynamic else max(int(k) for k in tree) if tree else 0
            vocab = (len(draft_vocab) if draft_vocab is not None else
                     draft.shape["vocab_size"] if features else draft.config.vocab_size)
            if width > vocab:
                raise ValueError(f"tree branching {width} exceeds the draft's vocabulary of {vocab} tokens")
            if dynamic:
                self.dynamic = tree
                gamma = tree.depth
            else:
                self.tree = static_tree(list(tree))  # validates the shape
                gamma = self.tree.max_depth
        if drafting not in DRAFTING:
            raise ValueError(f"drafting must be one of {DRAFTING}, got {drafting!r}")
        self.drafting = drafting
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if draft is not None and not features and draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft vocab size {draft.config.vocab_size} != target vocab size "
                             f"{target.config.vocab_size}")
        if decode_matmul:
            use_decode_matmul(target)
            if draft is not None and not features:
                use_decode_matmul(draft)
        if features:
            use_one_row_dtype(draft, draft_step_dtype)  # the head's layer: single rows in draft_step_dtype
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.gamma, self.verifier = gamma, verifier
        self.device = next(target.parameters()).device
        self._t = _Head(target, lean=lean)
        self._d = _Head(draft, draft_vocab, lean, draft_step_dtype) if draft is not None and not features else None
        self._f = _Features(draft, draft_step_dtype) if features else None  # the FSPAD head (then _d is None)
        eos = target.generation_config.eos_token_id if target.generation_config else None
        eos = eos if eos is not None else target.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = target.config.pad_token_id if target.config.pad_token_id is not None else 0
        self.max_len = target.config.max_position_embeddings
        self.timing = Timing()
        self.policy = policy
        # Online serving (`serve.online`): observer(RoundView) once per chain round with a draft (γ > 0), on the
        # engine thread; draft_version names the weights `refresh_draft` installed (0 = the loaded checkpoint).
        # call_done(call) once a decoding call ends (finished, cancelled or failed): its requests get no more rounds.
        self.observer = None
        self.call_done = None
        self.draft_version = 0
        self._calls = itertools.count()

    @property
    def draft_vocab_ids(self) -> torch.Tensor | None:
        """The Llama draft's vocabulary rows (sorted token ids), None = the full vocabulary."""
        return None if self._d is None else self._d.ids

    def refresh_draft(self, version: int) -> None:
        """Rebuild the draft's derived weights after its parameters were overwritten in place (a new version):
        LeanLlama's fused q|k|v and gate|up copies and the head's vocabulary rows are snapshots. Call between
        rounds (on the engine thread). A generation in flight notices the new head at its next round and
        re-prefills its draft cache (the old keys and values came from the old weights): one round uses one
        draft, and the tokens stay the target's whatever the draft proposes."""
        if self._d is None:
            raise ValueError("this engine has no Llama draft to refresh (none, or an FSPAD head)")
        vocab = None if self._d.ids is None else self._d.ids.tolist()
        self._d = _Head(self.draft, vocab, self._d.lean is not None, self._d.one_row_dtype)
        self.draft_version = version

    # ------------------------------------------------------------------ step costs
    def measure_step_costs(self, batch_sizes: tuple[int, ...] = (1, 2, 4, 8), context: int = 128,
                           repeats: int = 3, seed: int = 0) -> StepCosts:
        """`serve.goodput.StepCosts` of this engine, measured: for each batch size B, target passes over
        n = 1 … gamma + 1 new tokens per sequence (B·n rows, body + head at every row) and one draft step,
        on top of a `context`-token random prefix; median of `repeats` after one warm-up each."""
        if self._d is None:
            raise ValueError("step costs are for speculative decoding with a Llama draft: this engine has no draft "
                             "or an FSPAD head")
        rng = torch.Generator().manual_seed(seed)
        params = SamplingParams(temperature=0.0)
        vocab = self.target.config.vocab_size
        target: dict[int, float] = {}
        draft: dict[int, float] = {}

        def median_time(head: _Head, cache, batch: _Batch, x: torch.Tensor) -> float:
            """Median seconds of head.probs(head.hidden(x on cache)) at the positions used, cache restored."""
            L, times = batch.length, []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                h = head.hidden(cache, batch, L, x)
                head.probs(h if head is self._t else h[:, -1], params)
                _sync(self.device)
                times.append(time.perf_counter() - t0)
                _crop(cache, L)
            return sorted(times[1:])[len(times[1:]) // 2]

        with torch.inference_mode():
            for B in batch_sizes:
                batch = _Batch(torch.randint(vocab, (B, context), generator=rng).tolist(), self.pad_id, self.device)
                t_cache, d_cache = self._t.new_cache(batch), self._d.new_cache(batch)
                self._t.hidden(t_cache, batch, 0)
                self._d.hidden(d_cache, batch, 0)
                for n in range(1, self.gamma + 2):
                    x = torch.randint(vocab, (B, n), generator=rng).to(self.device)
                    target[B * n] = median_time(self._t, t_cache, batch, x)
                x = torch.randint(vocab, (B, 1), generator=rng).to(self.device)
                draft[B] = median_time(self._d, d_cache, batch, x)
        return StepCosts(target=target, draft=draft)

    # ------------------------------------------------------------------ bookkeeping
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
              z: torch.Tensor) -> tuple[list[list[int]], list[int], int]:
        """After a chain round's verification (either draft kind): sequence s emits out[s, :k_s + 1] up to its
        stop; the round is counted, the goodput policy and the online observer told; the emitted tokens join
        the grid (ragged: masked beyond k_s + 1). Returns (tokens committed per sequence, the sequences that
        were active, n = the widest emission)."""
        B = len(gens)
        was_active = list(active)
        new = self._commit(gens, active, [out[s, :ks[s] + 1].tolist() for s in range(B)], params)
        live = [s for s in range(B) if was_active[s]]
        outcomes = [gens[s].record_round(ks[s], g, len(new[s])) for s in live]
        if self.policy is not None and g:
            self.policy.observe(sum(a for a, _ in outcomes), sum(r for _, r in outcomes))
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
        call = next(self._calls)
        try:
            yield from self._call(call, prompts, params, gamma, use_draft)
        finally:
            if self.call_done is not None:
                self.call_done(call)

    def _call(self, call: int, prompts: list[list[int]], params: SamplingParams, gamma: int | None, use_draft: bool):
        with torch.inference_mode():
            gen = torch.Generator(self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
            batch = _Batch(prompts, self.pad_id, self.device, call)
            if self.draft is None or not use_draft:
                yield from self._target_rounds(batch, params, gen)
            elif self.tree is not None or self.dynamic is not None:
                if gamma not in (None, self.gamma):
                    raise ValueError(f"gamma={gamma}: in tree mode gamma is the tree's depth {self.gamma}")
                yield from (self._tree_rounds if self._f is None else self._fspad_tree_rounds)(batch, params, gen)
            elif self._f is not None:
                yield from self._fspad_rounds(batch, params, gamma or self.gamma, gen)
            else:
                yield from self._spec_rounds(batch, params, gamma or self.gamma, gen)

    def _target_rounds(self, batch: _Batch, params: SamplingParams, gen: torch.Generator):
        cache, cached = self._t.new_cache(batch), 0
        B = batch.ids.shape[0]
        gens = [Generation([]) for _ in range(B)]
        active = [True] * B
        while any(active) and batch.length < self.max_len:
            h = self._timed("target", cached == 0, self._t.hidden, cache, batch, cached)[:, -1]  # (B, H)
            cached = batch.length
            _, p = self._t.probs(h, params)  # (B, V)
            tok = draw(p, params, gen)  # (B,)
            for g, a in zip(gens, active):
                g.rounds += a
            new = self._commit(gens, active, tok[:, None].tolist(), params)
            batch.append(tok[:, None])
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)

    def _spec_rounds(self, batch: _Batch, params: SamplingParams, gamma: int, gen: torch.Generator):
        t_cache, d_cache = self._t.new_cache(batch), self._d.new_cache(batch)
        t_len = d_len = 0
        B = batch.ids.shape[0]
        rows = torch.arange(B, device=self.device)
        gens = [Generation([], accepted_per_position=[0] * gamma, accepted_histogram=[0] * (gamma + 1))
                for _ in range(B)]
        active = [True] * B
        d = self._d
        while any(active) and batch.length + gamma + 1 <= self.max_len:
            if self._d is not d:  # `refresh_draft` ran since the last round: start the draft cache over
                d, d_cache, d_len = self._d, self._d.new_cache(batch), 0
            L = batch.length
            g = gamma if self.policy is None else self.policy.choose(B)  # this round's γ (0: target only)
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
            new, live, n = self._emit(gens, active, batch, out, ks, g, params, x, q, z)
            # 4. Roll both caches back to the columns every sequence still agrees with.
            t_len = L + min(ks[s] for s in live)
            _crop(t_cache, t_len)
            d_len = min(d_len, t_len)
            _crop(d_cache, d_len)
            yield new, gens
        yield [[] for _ in gens], self._finish(gens)

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

    # ------------------------------------------------------------------ FSPAD head as the draft
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
            if pending is None:  # the first pass covers the prompt: column j ← f_{j−1}
                pending = torch.cat([h.new_zeros(B, 1, h.shape[-1]), h[:, : L - 1]], 1)  # (B, L, H)

            # 3. Verify, as `_spec_rounds`.
            out, ks = self._verify_chain(x, q, p, params, gen)  # (B, γ+1), k_s per sequence
            new, live, n = self._emit(gens, active, batch, out, ks, g, params, x, q, z)
            # 4. Roll back: the target to the columns every sequence agrees with, the head to its verified nodes;
            #    the new columns wait with the target's features before them (masked beyond k_s + 1).
            t_len = L + min(ks[s] for s in live)
            _crop(t_cache, t_len)
            _crop(f_cache, h_len)
            pending = torch.cat([pending, hv[:, :n]], 1)
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
                pending = torch.cat([h.new_zeros(B, 1, h.shape[-1]), h[:, : L - 1]], 1)  # column j ← f_{j−1}
                hv = h[rows, batch.last][:, None]  # (B, 1, H)
                p, _ = self._t.probs(hv[:, 0], params)
                nxt = draw(p, params, gen)  # (B,)
                new = self._commit(gens, active, nxt[:, None].tolist(), params)
                for s in range(B):
                    gens[s].record_round(0, 0, len(new[s]))
                batch.append(nxt[:, None])
                t_len, pending = L, torch.cat([pending, hv], 1)
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
            pending = torch.cat([pending, hs[rows[:, None], before[:, :n]]], 1)
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
