"""Decode-sized matrix products on CPU: y = (W xᵀ)ᵀ instead of x Wᵀ.

A decoding step multiplies a handful of rows x (M, k) — 1 token, or the γ + 1 tokens of a
verification pass — by every weight W (n, k) of the model. It is memory-bound: the cost should be
one read of W whatever M is. PyTorch's CPU `F.linear` (MKL) is not: for M ≥ 2 it takes a GEMM path
that packs W on every call. Measured on a 2-core AMD EPYC (AVX2, fp32, 2 threads) over the 120
distinct weights of SmolLM2-135M's 30 layers (420 MB, too large for the cache):

    rows M           1     2     4     8     16
    x Wᵀ  (F.linear) 30    49    55    50    65   ms
    (W xᵀ)ᵀ          31    21    24    36    44   ms

so a 4-token verification pass cost 1.8 single-token steps of weight reads, and the same
product computed as W xᵀ (W the left operand, no packing) costs 0.8. A single row is computed as
two (the two-row product is faster than MKL's matrix-vector kernel here) and the duplicate dropped.

MKL's kernel for W xᵀ also prefers some widths: the same 120 weights, W xᵀ with M columns,

    rows M   3    4    5    6    7    8    9    12   15   16   17   24   32   48   64
    ms       27   22   27   34   40   37   44   62   97   45   63   64   66   85   106
    F.linear                               47             56   61   66   77   98   119

(a tree pass of 7–15 nodes, or a batch of 8 sequences verifying 4 tokens each, lands on the slow widths),
so M is padded with zero rows to the next width in `_PAD` (3 → 4, 7 → 8, 9–15 → 16, 17–31 → 32, 33–63
→ 64; 5 and 6 are cheaper as they are) and the padding's outputs dropped, like vLLM padding a batch to a
captured CUDA-graph size. Up to 64 rows the padded W xᵀ beats F.linear.

`use_decode_matmul(model)` switches every `nn.Linear` of a model to this product for inputs of at
most `MAX_ROWS` rows (prefill and training shapes keep `F.linear`). Results equal `F.linear` up to
float rounding (a different summation order), like any change of BLAS kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 64  # above this, F.linear's GEMM is at least as fast


def _pad(rows: int) -> int:
    """The width a product of `rows` rows is computed at (the module docstring's table)."""
    if rows in (5, 6):
        return rows
    return max(2, 1 << (rows - 1).bit_length())  # 1 → 2, 3 → 4, 7 → 8, 9–16 → 16, …


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., k), weight (n, k), as (W xᵀ)ᵀ when x has few rows on CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or not 0 < rows <= MAX_ROWS or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    # x row-major, so that x2ᵀ is a transposed view: W times a column-major (k, M) operand is the
    # slow path again (70 ms in the table's setting)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()  # (M, k)
    width = _pad(rows)
    if width > rows:  # zero rows to a fast width (the module docstring)
        x2 = torch.cat([x2, x2.new_zeros(width - rows, x2.shape[1])])  # (width, k)
    y = (weight @ x2.T).T[:rows].contiguous()  # (M, n), row-major for the ops that follow
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def half_copy(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A `dtype` copy of a CPU float32 weight for `one_row_linear`, or None where it does not apply."""
    if dtype is None or weight.device.type != "cpu" or weight.dtype != torch.float32 or dtype == weight.dtype:
        return None
    return weight.detach().to(dtype).contiguous()


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, half: torch.Tensor | None) -> torch.Tensor:
    """decode_linear(x, weight), computed with `half` (a float16 copy of weight) when x is a single row.

    A draft's decoding step is one row times every weight: memory-bound, and a 6 × 384 draft's
    weights (55 MB in float32) do not stay in cache between steps. Read as float16 they are half the
    bytes, and PyTorch's CPU kernel for a float16 matrix-vector product (fp32 accumulation) is fast
    where wider float16 products are not. Measured on a 2-core AMD EPYC (AVX2, no native half
    arithmetic), the 25 products of one step of that draft, weights cycled out of cache:

        rows                    1      2      4
        float32 (best kernel)   3.2    3.4    4.0  ms
        float16 F.linear        1.7    3.0    5.3  ms

    so only single rows take this path. For a *draft* it is lossless: the verifier accepts against
    the q the draft actually computed, whatever its precision (the target keeps its own dtype).
    """
    if half is None or x.numel() != x.shape[-1]:
        return decode_linear(x, weight)
    return F.linear(x.to(half.dtype), half).to(x.dtype)


class DecodeLinear(torch.nn.Linear):
    """`nn.Linear` whose forward is `decode_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


class OneRowLinear(DecodeLinear):
    """`DecodeLinear` whose single-row products read `half`, a low-precision copy of the weight
    (`one_row_linear`): a draft's decoding step. Made by `use_one_row_dtype`."""

    half: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = one_row_linear(x, self.weight, self.half)
        return y if self.bias is None else y + self.bias


def use_one_row_dtype(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Switch every plain linear layer of a draft to `OneRowLinear` with a `dtype` copy of its weight, in
    place; dtype None switches them back to `nn.Linear`. The copies are snapshots: call again after the
    weights change."""
    for module in model.modules():
        if type(module) in (torch.nn.Linear, OneRowLinear):
            module.__class__ = OneRowLinear if dtype is not None else torch.nn.Linear
            module.half = half_copy(module.weight, dtype) if dtype is not None else None
    return model


def use_decode_matmul(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every `nn.Linear` of `model` to `DecodeLinear` in place (a no-op for GPU models)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = DecodeLinear
    return model
