"""A lean, decode-oriented forward pass for Hugging Face Llama models, on a preallocated KV cache.

`LeanLlama(model).hidden(cache, ids, mask, positions, start)` computes what
`model.get_decoder()(ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
past_key_values=cache)` returns (the hidden states after the final RMSNorm), without HF's per-call
machinery. On SmolLM2-135M (30 layers) on a 2-core CPU, a decoding forward of 1-4 tokens spent
~20 ms in HF's Python overhead (4D mask building, DynamicCache concatenations, many small ops per
layer), about as much as its matrix products (~22-28 ms). Here:

- the weights are fused once (q|k|v into one matrix, gate|up into another; copies of the layers'
  weights, a snapshot taken at construction) and every product goes through
  `serve.kernels.decode_linear` (the fast few-row path on CPU);
- `KVCache` preallocates keys and values per layer and grows by doubling; `crop` moves a pointer;
- the attention mask and RoPE cos/sin are built once per forward, not per layer.

Token trees (`serve.tree`): `hidden(..., attn=rows)` replaces the causal rule by explicit rows of
which columns each new query sees, and `positions` are per token, so one pass scores every node of a
tree on top of the cache (node i at position prefix_len + depth(i) − 1, seeing the prefix and its
ancestors); `KVCache.keep(index)` then compacts the cache to prefix ++ accepted path.

Measured there (`use_decode_matmul`, 200-token context, batch 1, median): feeding 1 column 42 → 31 ms,
4 columns 48 → 34 ms (HF body with DynamicCache → LeanLlama); the per-forward overhead left is ~9 ms,
mostly the dispatch of ~30 small ops per layer.

Supported: `LlamaForCausalLM` with default RoPE (no scaling), no attention/MLP bias, SiLU MLP, GQA,
any float dtype. RMSNorm (in float32), RoPE (HF's inv_freq buffer, rotate_half convention) and the
attention scale follow `transformers.models.llama.modeling_llama`; queries that see no key (left
padding) output zeros from attention, like HF with SDPA. Results equal HF's up to float rounding
(a different summation order in the fused products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.kernels import half_copy, one_row_linear


def _unsupported(model) -> str | None:
    """Why `LeanLlama` cannot run `model`, or None."""
    from transformers import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a LlamaForCausalLM"
    c = model.config
    if getattr(c, "model_type", None) != "llama":
        return f"model_type {getattr(c, 'model_type', None)!r} is not 'llama'"
    if not getattr(c, "is_causal", True):
        return "non-causal (bidirectional) attention"
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        return f"rope scaling {rope_type!r} (only default RoPE is supported)"
    if getattr(model.model.rotary_emb, "attention_scaling", 1.0) != 1.0:
        return "RoPE attention scaling != 1"
    if getattr(c, "attention_bias", False):
        return "attention bias (attention_bias=True)"
    if getattr(c, "mlp_bias", False):
        return "MLP bias (mlp_bias=True)"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"hidden_act {c.hidden_act!r} (only silu is supported)"
    if getattr(c, "sliding_window", None):
        return "sliding-window attention"
    for i, layer in enumerate(model.model.layers[: c.num_hidden_layers]):
        a, m = layer.self_attn, layer.mlp
        for name, lin in (("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj), ("o_proj", a.o_proj),
                          ("gate_proj", m.gate_proj), ("up_proj", m.up_proj), ("down_proj", m.down_proj)):
            if not isinstance(lin, torch.nn.Linear) or lin.bias is not None:
                return f"layer {i} {name} is not a bias-free nn.Linear ({type(lin).__name__})"
            if not lin.weight.dtype.is_floating_point:
                return f"layer {i} {name} has non-float weights ({lin.weight.dtype})"
    return None


class KVCache:
    """Keys and values of every layer: k[l], v[l] (B, KV, capacity, D); columns [0, length) are valid."""

    def __init__(self, layers: int, batch_size: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device):
        shape = (batch_size, kv_heads, max(capacity, 1), head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]  # (B, KV, C, D) each
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]  # (B, KV, C, D) each
        self.batch_size = batch_size
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """Keep the first `length` columns (a negative length drops that many, like DynamicCache.crop)."""
        if length < 0:
            length = self.length + length
        self.length = max(0, min(length, self.length))

    @torch.inference_mode()
    def keep(self, index: torch.Tensor) -> None:
        """Keep the columns `index` (m,) or (B, m) (per sequence), in that order, as columns [0, m).

        After a tree pass `serve.tree.kv_keep_index` (the prefix, then the accepted path) compacts the
        cache to the accepted path. The identity head of the index (the prefix) stays in place; only the
        tail is gathered, like `crop` moving a pointer when the tail is the identity too.
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.k[0].device)
        index = index[None].expand(self.batch_size, -1) if index.dim() == 1 else index  # (B, m)
        m = index.shape[1]
        if index.shape[0] != self.batch_size or m and not 0 <= int(index.min()) <= int(index.max()) < self.length:
            raise ValueError(f"keep index {tuple(index.shape)} out of range for {self.batch_size} sequences "
                             f"of {self.length} columns")
        same = (index == torch.arange(m, device=index.device)).all(0)  # (m,)
        lo = m if bool(same.all()) else int((~same).int().argmax())  # first column that moves
        if lo < m:
            tail = index[:, lo:]  # (B, m - lo)
            for buf in (self.k, self.v):
                for t in buf:  # (B, KV, C, D)
                    B, KV, _, D = t.shape
                    t[:, :, lo:m] = t.gather(2, tail[:, None, :, None].expand(B, KV, m - lo, D))
        self.length = m

    def reserve(self, length: int) -> None:
        """Make room for `length` columns (doubling the capacity), keeping the valid ones."""
        if length <= self.capacity:
            return
        cap = max(length, 2 * self.capacity)
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = old.new_empty(*old.shape[:2], cap, old.shape[3])  # (B, KV, cap, D)
                new[:, :, : self.length] = old[:, :, : self.length]
                buf[i] = new


class LeanLlama:
    """Decoder body of an HF `LlamaForCausalLM` (eval) for decoding: `hidden` → final-norm hidden states.

    Holds references to the model's embedding and norm weights and fused copies of each layer's
    projections; the LM head is left to the caller. one_row_dtype (e.g. torch.float16, for a draft):
    also keep copies of the fused weights in that dtype for single-row forwards
    (`serve.kernels.one_row_linear`); None = every product in the model's dtype.
    """

    def __init__(self, model, one_row_dtype: torch.dtype | None = None):
        reason = _unsupported(model)
        if reason is not None:
            raise ValueError(f"LeanLlama cannot run this model: {reason}")
        c, body = model.config, model.model
        self.num_heads = c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim ** -0.5  # as LlamaAttention.scaling
        self.eps = c.rms_norm_eps
        self.intermediate = c.intermediate_size
        self.embed = body.embed_tokens.weight.detach()  # (V, H), a reference
        self.norm = body.norm.weight.detach()  # (H,)
        self.inv_freq = body.rotary_emb.inv_freq.detach().float()  # (D/2,), HF's buffer
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.layers = []
        with torch.no_grad():
            for layer in body.layers[: c.num_hidden_layers]:
                a, m = layer.self_attn, layer.mlp
                self.layers.append((
                    layer.input_layernorm.weight.detach(),  # (H,)
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),  # ((NH+2KV)·D, H)
                    a.o_proj.weight.detach(),  # (H, NH·D)
                    layer.post_attention_layernorm.weight.detach(),  # (H,)
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),  # (2I, H)
                    m.down_proj.weight.detach(),  # (H, I)
                ))
        # the same fused products in one_row_dtype (None each where it does not apply)
        self.half = [tuple(half_copy(w, one_row_dtype) if w.dim() == 2 else None for w in ws) for ws in self.layers]

    @staticmethod
    def supports(model) -> bool:
        return _unsupported(model) is None

    def new_cache(self, batch_size: int, capacity: int = 256) -> KVCache:
        return KVCache(len(self.layers), batch_size, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm: normalise in float32, scale in the model's dtype."""
        if x.dtype == torch.float32:  # one fused op, the same arithmetic (bitwise equal in our tests)
            return torch.rms_norm(x, weight.shape, weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @torch.inference_mode()
    def hidden(self, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               start: int, attn: torch.Tensor | None = None, aux_layers: list[int] | None = None,
               aux_out: list | None = None) -> torch.Tensor:
        """ids (B, T_total) long, mask (B, T_total) long/bool, positions (B, T_total) long; cache holds
        columns [0, start). Feeds columns [start, T_total): appends their keys/values to the cache, returns
        hidden (B, T_total - start, H) after the final RMSNorm.

        attn (n, T_total) or (B, n, T_total) bool, n = T_total − start: query i (column start + i) sees
        column j iff attn[..., i, j] and mask[b, j] — a tree pass's rows (`serve.tree.tree_attention_mask`).
        Default: the causal rule j <= start + i.

        aux_layers (ascending, `draftalign.aux_states`): aux_out gets [(B, n, len · H)], EAGLE-3's aux states of the
        fed columns — the residual stream entering each listed layer (0 = the embedding)."""
        B, T = ids.shape
        n = T - start
        if cache.length != start:
            raise ValueError(f"the cache holds {cache.length} columns, not start={start}")
        if cache.batch_size != B:
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, not {B}")
        if n < 1 or mask.shape != ids.shape or positions.shape != ids.shape:
            raise ValueError(f"nothing to feed or mismatched shapes: ids {tuple(ids.shape)}, mask "
                             f"{tuple(mask.shape)}, positions {tuple(positions.shape)}, start {start}")
        if attn is not None and (attn.dim() not in (2, 3) or tuple(attn.shape[-2:]) != (n, T)
                                 or attn.dim() == 3 and attn.shape[0] not in (1, B)):
            raise ValueError(f"attn must be (n, T) or (B, n, T) = ({B}, {n}, {T}), got {tuple(attn.shape)}")
        cache.reserve(T)
        NH, KV, D, FF = self.num_heads, self.kv_heads, self.head_dim, self.intermediate

        # RoPE as LlamaRotaryEmbedding: angles in float32, cos/sin cast to the model's dtype
        freqs = positions[:, start:, None].float() * self.inv_freq  # (B, n, D/2)
        emb = torch.cat((freqs, freqs), -1)  # (B, n, D)
        cos = emb.cos().to(self.dtype)[:, :, None]  # (B, n, 1, D)
        sin = emb.sin().to(self.dtype)[:, :, None]  # (B, n, 1, D)
        half = D // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)  # rotate_half's sign moved onto sin (exact)

        # query i (column start + i) sees column j iff j <= start + i (or attn[..., i, j]) and mask[b, j]
        if attn is None:
            cols = torch.arange(T, device=ids.device)  # (T,)
            allowed = (cols[None] <= cols[start:, None])[None, None] & mask.bool()[:, None, None]  # (B, 1, n, T)
        else:
            rows = attn.bool() if attn.dim() == 3 else attn.bool()[None]  # (B or 1, n, T)
            allowed = rows[:, None] & mask.bool()[:, None, None]  # (B, 1, n, T)
        dead = ~allowed.any(-1, keepdim=True).transpose(1, 2)  # (B, n, 1, 1): queries that see no key
        dead = dead if bool(dead.any()) else None
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=ids.device).masked_fill_(
            ~allowed, float("-inf"))  # (B, 1, n, T): additive, SDPA's own conversion of a boolean mask

        x = F.embedding(ids[:, start:], self.embed)  # (B, n, H)
        aux = [x] if aux_layers and aux_layers[0] == 0 else []
        for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w) in enumerate(self.layers):
            _, qkv_h, o_h, _, gu_h, down_h = self.half[i]
            h = self._rms_norm(x, ln1)  # (B, n, H)
            qkv = one_row_linear(h, qkv_w, qkv_h).view(B, n, NH + 2 * KV, D)  # (B, n, NH+2KV, D)
            qk = qkv[:, :, : NH + KV]  # (B, n, NH+KV, D): RoPE on q and k at once
            rot = torch.cat((qk[..., half:], qk[..., :half]), -1)  # rotate_half(qk) up to the sign in sin
            qk = (qk * cos) + (rot * sin)  # (B, n, NH+KV, D)
            k_cache, v_cache = cache.k[i], cache.v[i]  # (B, KV, C, D)
            k_cache[:, :, start:T] = qk[:, :, NH:].transpose(1, 2)
            v_cache[:, :, start:T] = qkv[:, :, NH + KV:].transpose(1, 2)
            y = F.scaled_dot_product_attention(
                qk[:, :, :NH].transpose(1, 2), k_cache[:, :, :T], v_cache[:, :, :T],  # (B, NH, n, D), (B, KV, T, D) x2
                attn_mask=bias, scale=self.scale, enable_gqa=True)  # (B, NH, n, D)
            y = y.transpose(1, 2)  # (B, n, NH, D)
            if dead is not None:
                y = y.masked_fill(dead, 0)  # HF/SDPA: a query with no key attends to nothing
            x = x + one_row_linear(y.reshape(B, n, NH * D), o_w, o_h)  # (B, n, H)
            h = self._rms_norm(x, ln2)  # (B, n, H)
            gu = one_row_linear(h, gu_w, gu_h)  # (B, n, 2I)
            x = x + one_row_linear(F.silu(gu[..., :FF]) * gu[..., FF:], down_w, down_h)  # (B, n, H)
            if aux_layers and i + 1 in aux_layers:
                aux.append(x)
        if aux_layers:
            aux_out[:] = [torch.cat(aux, -1)]  # (B, n, len · H)
        cache.length = T
        return self._rms_norm(x, self.norm)  # (B, n, H)
