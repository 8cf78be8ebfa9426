"""The engine's view of a model: its body fed on top of a KV cache, and its LM head's rows.

Cost (see `serve.kernels`, `serve.lean_llama` and `draftalign.vocab`): both models run their bodies
through the lean Llama forward (fused weights, preallocated KV cache) and their linear layers through
the decode-sized matmul on CPU, the LM heads only at the positions whose distribution is used (one
per sequence per draft step, γ + 1 per verification), and the draft's head only on its
frequency-ranked vocabulary when it has one (q = 0 outside it: lossless).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from draftalign.aux_states import recording
from draftalign.sampling import SamplingParams, logits_to_probs
from serve.batch_state import _Batch
from serve.kernels import half_copy, one_row_linear
from serve.lean_llama import LeanLlama


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
                 one_row_dtype: torch.dtype | None = None, aux_layers: list[int] | None = None):
        if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
            raise ValueError(f"{type(model).__name__}: logit soft-capping / scaling is not supported by the engine")
        self.model, self.body = model, model.get_decoder()
        # EAGLE-3's draft reads the target's aux states (`draftalign.aux_states`): each `hidden` call leaves those of
        # the columns it fed in `aux` (B, n, len · H), column for column with its return value
        self.aux_layers, self.aux = aux_layers, None
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
            got: list = []
            h = self.lean.hidden(cache, ids, mask, positions, start, attn, self.aux_layers, got)
            self.aux = got[0] if self.aux_layers else None
            return h
        if attn is not None:  # HF takes a 4D additive mask over (cache + new) columns as it is
            allowed = attn[None, None] & mask.bool()[:, None, None]  # (B, 1, n, T)
            dtype = self.weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min)  # finite: a query without keys gives no NaN
        with recording(self.body, self.aux_layers or []) as got:
            out = self.body(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
                            past_key_values=cache, use_cache=True)
        self.aux = torch.cat(got, -1) if self.aux_layers else None
        return out.last_hidden_state

    def new_cache(self, batch: _Batch):
        """An empty KV cache for `batch` (the lean body's preallocated one, else HF's DynamicCache)."""
        if self.lean is not None:
            return self.lean.new_cache(batch.ids.shape[0], capacity=batch.length + 128)
        return DynamicCache()


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
