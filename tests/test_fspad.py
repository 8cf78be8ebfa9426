"""The FSPAD head (learner/fspad.py) on tiny random Llamas with the SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from draftalign.models import ModelError, load_causal_lm
from learner.fspad import FSPADHead, is_fspad_head, read_config


@pytest.fixture(scope="module")
def target(tiny_target_path):
    return load_causal_lm(tiny_target_path)


def _rows(n=3, seed=0, prompt=(4, 9), answer=(5, 12), k=None, target=None):
    """Random token rows in the distillation set's layout; with `target` and `k`, the answers carry the
    target's own top-k (what the set stores)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        P = int(torch.randint(*prompt, (1,), generator=g))
        R = int(torch.randint(*answer, (1,), generator=g))
        ids = torch.randint(100, 5000, (P + R,), generator=g).tolist()
        row = {"prompt_id": f"p{i}", "prompt_token_ids": ids[:P], "response_token_ids": ids[P:],
               "target_ids": None, "target_logprobs": None}
        if target is not None:
            with torch.no_grad():
                logp = torch.log_softmax(target(torch.tensor([ids])).logits[0, P - 1:P - 1 + R].float(), -1)
            top = torch.topk(logp, k, -1)
            row["target_ids"], row["target_logprobs"] = top.indices.numpy(), top.values.numpy()
        rows.append(row)
    return rows


def _features(target, ids):
    with torch.no_grad():
        return target.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (L, H)


# ------------------------------------------------------------------------------------ the head

def test_head_shapes_and_own_parameters(target):
    H, V = target.config.hidden_size, target.config.vocab_size
    head = FSPADHead.from_target(target, vocab=[1, 5, 7, 100])
    f = torch.randn(2, 6, H)
    ids = torch.randint(0, V, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    f_hat = head(f, ids, pos)  # (B, T, H)
    assert f_hat.shape == (2, 6, H)
    assert head.logits(f_hat).shape == (2, 6, 4)  # the draft vocabulary's rows
    assert FSPADHead.from_target(target).logits(f_hat).shape == (2, 6, V)
    own = {k for k, _ in head.named_parameters()}
    assert {"fc.weight", "fc.bias"} <= own and all(k.startswith(("fc.", "layer.")) for k in own)
    assert head.fc.weight.shape == (H, 2 * H)
    assert not any("input_layernorm" in k for k in own)  # EAGLE: the fused input enters attention un-normed
    with pytest.raises(ValueError, match="expected"):
        head(f[..., :-1], ids, pos)


def test_lm_head_on_the_feature_is_the_targets_next_token_distribution(target):
    """The feature is the LM head's input (post final norm): W f_t gives the target's own logits, so the head's
    logits(f̂) need no norm of their own."""
    ids = list(range(300, 310))
    head = FSPADHead.from_target(target)
    with torch.no_grad():
        ref = target(torch.tensor([ids])).logits[0]  # (L, V)
    torch.testing.assert_close(head.logits(_features(target, ids)), ref, rtol=1e-4, atol=1e-4)


def test_head_is_causal(target):
    H = target.config.hidden_size
    head = FSPADHead.from_target(target, seed=3)
    f, ids, pos = torch.randn(1, 7, H), torch.randint(0, 1000, (1, 7)), torch.arange(7)[None]
    with torch.no_grad():
        full = head(f, ids, pos)
        f2, ids2 = f.clone(), ids.clone()
        f2[0, 5:], ids2[0, 5:] = torch.randn(2, H), 3
        torch.testing.assert_close(head(f2, ids2, pos)[0, :5], full[0, :5])  # later inputs do not leak back


def test_save_load_round_trip(target, tmp_path):
    head = FSPADHead.from_target(target, vocab=[2, 9, 40, 41], fspad={"aligned_fraction": 0.5}, seed=1)
    with torch.no_grad():
        head.fc.bias.add_(0.1)
    d = head.save(tmp_path / "head")
    assert {p.name for p in d.iterdir()} == {"config.json", "model.safetensors", "draft_vocab.json"}
    cfg = read_config(d)
    assert cfg["kind"] == "fspad" and cfg["target"]["hidden_size"] == target.config.hidden_size
    assert cfg["fspad"] == {"aligned_fraction": 0.5} and cfg["draft_vocab_size"] == 4 and is_fspad_head(d)
    from safetensors.torch import load_file

    saved = load_file(str(d / "model.safetensors"))
    assert set(saved) == set(head.state_dict()) and not any("embed" in k or "head_weight" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == head.num_parameters()  # only the head's own weights
    again = FSPADHead.load(d, target)
    f, ids, pos = torch.randn(2, 5, target.config.hidden_size), torch.randint(0, 999, (2, 5)), torch.arange(5)[None]
    pos = pos.expand(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(again.logits(again(f, ids, pos)), head.logits(head(f, ids, pos)))
    assert again.vocab.ids.tolist() == [2, 9, 40, 41]


def test_load_refuses_another_target_and_bad_dirs(target, tmp_path, tiny_draft_path):
    d = FSPADHead.from_target(target).save(tmp_path / "head")
    with pytest.raises(ModelError, match="hidden_size=64.*this target has hidden_size=32"):
        FSPADHead.load(d, load_causal_lm(tiny_draft_path))
    with pytest.raises(ModelError, match="holds no config.json"):
        FSPADHead.load(tmp_path / "missing", target)
    with pytest.raises(ModelError, match="not an FSPAD head"):
        FSPADHead.load(tiny_draft_path, target)  # an HF-format Llama draft
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        FSPADHead.load(d, target)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ModelError, match="unknown format"):
        FSPADHead.load(d, target)


def test_an_fspad_head_is_not_loaded_as_a_llama_draft(target, tmp_path, target_tokenizer):
    from draftalign.models import load_draft

    d = FSPADHead.from_target(target).save(tmp_path / "head")
    with pytest.raises(ModelError, match="is an FSPAD head"):
        load_draft(str(d), target_tokenizer)
