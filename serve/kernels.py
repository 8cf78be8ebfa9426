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

`use_decode_matmul(model)` switches every `nn.Linear` of a model to this product for inputs of at
most `MAX_ROWS` rows (prefill and training shapes keep `F.linear`). Results equal `F.linear` up to
float rounding (a different summation order), like any change of BLAS kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # above this, F.linear's GEMM is at least as fast (measured up to 32 rows)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., k), weight (n, k), as (W xᵀ)ᵀ when x has few rows on CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or not 0 < rows <= MAX_ROWS or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    # x row-major, so that x2ᵀ is a transposed view: W times a column-major (k, M) operand is the
    # slow path again (70 ms in the table's setting)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()  # (M, k)
    if rows == 1:
        x2 = torch.cat([x2, x2])  # (2, k): see the module docstring
    y = (weight @ x2.T).T[:rows].contiguous()  # (M, n), row-major for the ops that follow
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class DecodeLinear(torch.nn.Linear):
    """`nn.Linear` whose forward is `decode_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


def use_decode_matmul(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every `nn.Linear` of `model` to `DecodeLinear` in place (a no-op for GPU models)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = DecodeLinear
    return model
