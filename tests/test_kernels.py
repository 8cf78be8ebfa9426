"""serve.kernels: the decode-sized product equals F.linear; the module swap keeps parameters and state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve.kernels import MAX_ROWS, DecodeLinear, _pad, decode_linear, half_copy, one_row_linear, use_decode_matmul


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 23, MAX_ROWS - 1, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_linear(rows, bias):
    torch.manual_seed(rows)
    w, b = torch.randn(96, 48), (torch.randn(96) if bias else None)
    x = torch.randn(rows, 48)
    assert torch.allclose(decode_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    x3 = torch.randn(1, rows, 48)[:, :, :]  # (B, n, k), as a model feeds it
    assert decode_linear(x3, w, b).shape == (1, rows, 96)
    assert torch.allclose(decode_linear(x3, w, b), F.linear(x3, w, b), atol=1e-5, rtol=1e-5)
    xt = torch.randn(48, rows).T  # a column-major input (what silu(gate) * up can be)
    assert torch.allclose(decode_linear(xt, w, b), F.linear(xt, w, b), atol=1e-5, rtol=1e-5)
    assert decode_linear(xt, w, b).is_contiguous()


def test_rows_are_padded_to_the_measured_fast_widths():
    assert [_pad(m) for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 33, 64)] == [
        2, 2, 4, 4, 5, 6, 8, 8, 16, 16, 16, 32, 64, 64]


def test_use_decode_matmul_swaps_every_linear_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    before = model(x)
    use_decode_matmul(model)
    assert all(type(m) is DecodeLinear for m in model if isinstance(m, torch.nn.Linear))
    assert torch.allclose(model(x), before, atol=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_one_row_linear_uses_the_half_copy_for_single_rows_only():
    torch.manual_seed(0)
    w = torch.randn(96, 48)
    half = half_copy(w, torch.float16)
    assert half.dtype == torch.float16 and half_copy(w.half(), torch.float16) is None and half_copy(w, None) is None
    one = torch.randn(1, 1, 48)
    want = F.linear(one.half(), half).float()  # the float16 product, bit for bit
    assert torch.equal(one_row_linear(one, w, half), want) and one_row_linear(one, w, half).dtype == torch.float32
    assert torch.allclose(one_row_linear(one, w, half), F.linear(one, w), rtol=1e-2, atol=2e-2)
    many = torch.randn(1, 3, 48)  # several rows: the float32 product (float16 is slower there)
    assert torch.equal(one_row_linear(many, w, half), decode_linear(many, w))
    assert torch.equal(one_row_linear(one, w, None), decode_linear(one, w))
