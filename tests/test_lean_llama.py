"""serve.lean_llama.LeanLlama equals HF's Llama decoder body (tiny random model, no downloads)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from serve.lean_llama import LeanLlama

ATOL = 1e-5


def _config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
                pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, 128, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def _hf(model, ids, mask):
    """HF's body on the whole grid in one forward, with a cache (as the engine calls it)."""
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                              past_key_values=DynamicCache(config=model.config), use_cache=True)
    return out.last_hidden_state


def test_prefill_left_padded(model):
    ids, mask = _left_padded([7, 3, 5])
    lean = LeanLlama(model)
    cache = lean.new_cache(3, capacity=4)  # grows
    h = lean.hidden(cache, ids, mask, _positions(mask), 0)
    assert cache.get_seq_length() == 7 and cache.capacity >= 7
    assert not h.isnan().any()
    torch.testing.assert_close(h, _hf(model, ids, mask), atol=ATOL, rtol=0)


def test_chunked_feeds_and_crop(model):
    g = torch.Generator().manual_seed(2)
    ids, mask = _left_padded([6, 2, 4])
    lean = LeanLlama(model)
    cache = lean.new_cache(3, capacity=8)
    outs = [lean.hidden(cache, ids, mask, _positions(mask), 0)]
    for n, crop in ((1, 0), (4, 2), (3, 0)):  # prefill, +1, +4 then crop back 2, +3
        new = torch.randint(1, 128, (3, n), generator=g)
        start = ids.shape[1]
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        outs.append(lean.hidden(cache, ids, mask, _positions(mask), start))
        assert cache.get_seq_length() == ids.shape[1]
        if crop:
            ids, mask = ids[:, :-crop], mask[:, :-crop]
            outs[-1] = outs[-1][:, :-crop]
            cache.crop(ids.shape[1])
            assert cache.get_seq_length() == ids.shape[1]
    assert ids.shape[1] == 6 + 1 + 2 + 3 and cache.capacity >= 12
    torch.testing.assert_close(torch.cat(outs, 1), _hf(model, ids, mask), atol=ATOL, rtol=0)


def test_masked_middle_columns(model):
    ids, mask = _left_padded([5, 3, 5], seed=3)
    g = torch.Generator().manual_seed(4)
    ids = torch.cat([ids, torch.randint(1, 128, (3, 4), generator=g)], 1)  # (3, 9)
    mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    mask[0, 5:7] = 0  # row 0: two masked columns in the middle of the grid
    mask[1, 8] = 0  # row 1: a masked last column
    expected = _hf(model, ids, mask)
    lean = LeanLlama(model)
    cache = lean.new_cache(3)
    h = torch.cat([lean.hidden(cache, ids[:, :6], mask[:, :6], _positions(mask)[:, :6], 0),
                   lean.hidden(cache, ids, mask, _positions(mask), 6)], 1)
    torch.testing.assert_close(h, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw, reason", [
    (dict(attention_bias=True), "attention bias"),
    (dict(mlp_bias=True), "MLP bias"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope scaling"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported(kw, reason):
    bad = LlamaForCausalLM(_config(num_hidden_layers=1, **kw)).eval()
    assert not LeanLlama.supports(bad)
    with pytest.raises(ValueError, match=reason):
        LeanLlama(bad)


def test_supports(model):
    assert LeanLlama.supports(model)
    assert not LeanLlama.supports(torch.nn.Linear(2, 2))
