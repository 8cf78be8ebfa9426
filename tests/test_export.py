"""`draftalign export` (serve/export.py): exact or refused; and the exports decoded by vLLM's own speculative decoding
give the target's greedy output with acceptance > 0, at the engine's τ (bench/parity.py's measurement)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from draftalign.vocab import save_draft_vocab
from serve.export import ExportRefused, export_draft, full_vocab_head, read_export

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there"]
GAMMA = 3
NEW_TOKENS = 24


def _vocab(V: int) -> list[int]:
    """Two of every three ids (token 0 included): a reduced draft vocabulary with gaps everywhere."""
    return [i for i in range(V) if i % 3 != 1]


# ----------------------------------------------------------------------------------------- the math, no models
def test_full_vocab_head_argmax_is_the_draft_vocabulary_argmax():
    """argmax over all V rows of the exported head = the draft's argmax over its vocabulary rows, ties to the lowest
    id, on random features and on features built so that a row outside the vocabulary would win."""
    g = torch.Generator().manual_seed(0)
    V, H = 300, 16
    W = torch.randn(V, H, generator=g)
    vocab = _vocab(V)
    head = full_vocab_head(W, vocab)
    ids = torch.tensor(vocab)
    h = torch.cat([torch.randn(2000, H, generator=g), W[1::3] * 5, W[0:1]])  # (N, H); W[3k+1] are outside rows
    assert torch.equal((h @ head.T).argmax(-1), ids[(h @ W[ids].T).argmax(-1)])
    assert torch.equal(head[ids], W[ids])  # the vocabulary's rows are untouched
    assert torch.equal(full_vocab_head(W, list(range(V))), W)  # a full vocabulary exports as it is


def test_full_vocab_head_refuses_when_a_row_outside_is_below_the_smallest_id():
    with pytest.raises(ExportRefused, match="token 0 is outside the draft vocabulary"):
        full_vocab_head(torch.randn(10, 4), [1, 2, 5])


# ----------------------------------------------------------------------------------------- exports on disk
@pytest.fixture(scope="module")
def reduced_draft(tiny_target_path, tmp_path_factory):
    """The tiny target itself as a draft with a reduced vocabulary: it agrees with the target exactly where the
    target's argmax lies in the vocabulary (acceptance > 0 by construction, < 1 because of the gaps)."""
    d = tmp_path_factory.mktemp("drafts") / "reduced"
    shutil.copytree(tiny_target_path, d)
    from transformers import AutoConfig

    save_draft_vocab(d, _vocab(AutoConfig.from_pretrained(tiny_target_path).vocab_size), source="test")
    return str(d)


@pytest.fixture(scope="module")
def eagle_head(tiny_target_path, tmp_path_factory):
    """An FSPAD head with EAGLE-1's layout (fc without bias, full vocabulary). Its fusion passes the feature through
    (fc = [0 | I]) and its layer is damped (attention and MLP outputs × 0.1): f̂ ≈ f, so it drafts the target's last
    token again — accepted wherever the target repeats itself (acceptance > 0 by construction), while the layer, its
    rotary positions and the fed-back f̂ still change what it drafts."""
    from draftalign.models import load_causal_lm
    from learner.fspad import FSPADHead

    target = load_causal_lm(tiny_target_path)
    head = FSPADHead.from_target(target, seed=3)
    H = head.shape["hidden_size"]
    with torch.no_grad():
        head.fc.weight.copy_(torch.cat([torch.zeros(H, H), torch.eye(H)], 1))
        head.fc.bias.zero_()
        head.layer.self_attn.o_proj.weight.mul_(0.1)
        head.layer.mlp.down_proj.weight.mul_(0.1)
    return str(head.save(tmp_path_factory.mktemp("heads") / "eagle_like")), target


def test_hf_export_is_a_plain_untied_checkpoint(reduced_draft, tiny_target_path, tmp_path):
    from draftalign.models import load_causal_lm

    out = export_draft(reduced_draft, tmp_path / "hf", "hf", tiny_target_path)
    exported, source = load_causal_lm(str(out)), load_causal_lm(reduced_draft)
    assert not (out / "draft_vocab.json").exists() and read_export(out)["method"] == "draft_model"
    assert exported.config.tie_word_embeddings is False
    assert torch.equal(exported.get_input_embeddings().weight, source.get_input_embeddings().weight)
    assert torch.equal(exported.lm_head.weight[1], exported.lm_head.weight[0])  # id 1 is outside: row 0's copy


def test_eagle_export_refuses_an_fc_bias_and_a_reduced_vocabulary(tiny_target_path, tmp_path):
    from draftalign.models import load_causal_lm
    from learner.fspad import FSPADHead

    target = load_causal_lm(tiny_target_path)
    biased = FSPADHead.from_target(target, seed=0).save(tmp_path / "biased")
    with pytest.raises(ExportRefused, match="fusion fc has a bias"):
        export_draft(biased, tmp_path / "x", "eagle", tiny_target_path)
    reduced = FSPADHead.from_target(target, vocab=_vocab(target.config.vocab_size), seed=0)
    with torch.no_grad():
        reduced.fc.bias.zero_()
    with pytest.raises(ExportRefused, match="reduced vocabulary"):
        export_draft(reduced.save(tmp_path / "reduced"), tmp_path / "x", "eagle", tiny_target_path)
    with pytest.raises(ExportRefused, match="--format eagle"):
        export_draft(biased, tmp_path / "x", "hf", tiny_target_path)
    with pytest.raises(ExportRefused, match="not EAGLE-3's architecture"):
        export_draft(biased, tmp_path / "x", "eagle3", tiny_target_path)
    assert not (tmp_path / "x").exists()


def test_eagle_export_writes_eagle1_names(eagle_head, tiny_target_path, tmp_path):
    from safetensors.torch import load_file

    path, _ = eagle_head
    out = export_draft(path, tmp_path / "eagle", "eagle", tiny_target_path)
    w, own = load_file(str(out / "model.safetensors")), load_file(f"{path}/model.safetensors")
    assert "fc.bias" not in w and not any(k.startswith(("embed_tokens", "lm_head", "norm")) for k in w)
    assert torch.equal(w["fc.weight"], own["fc.weight"])
    assert {k.removeprefix("layers.0.") for k in w if k != "fc.weight"} == {
        k.removeprefix("layer.") for k in own if k.startswith("layer.")}


# ----------------------------------------------------------------------------------------- in vLLM
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DRAFTALIGN_SKIP_VLLM_SERVE") == "1",
                    reason="DRAFTALIGN_SKIP_VLLM_SERVE=1 (it starts vLLM three times: ~1 GiB, ~1 min)")
@pytest.mark.timeout(1800)
def test_exports_in_vllm_equal_target_greedy(tiny_target_path, reduced_draft, eagle_head, target_tokenizer):
    """export → vLLM loads it (draft_model / eagle) → greedy output = vLLM's target alone = HF generate → acceptance
    > 0 from vLLM's counters, and τ = 1 + accepted / drafts as in draftalign's engine with the draft as trained."""
    from specdec_helpers import hf_greedy

    from bench.parity import engine_run, vllm_run
    from draftalign.models import load_causal_lm
    from serve.drafts import load_engine_draft

    target = load_causal_lm(tiny_target_path)
    prompts = [target_tokenizer(p)["input_ids"] for p in PROMPTS]
    hf = [hf_greedy(target, p, NEW_TOKENS, eos=target_tokenizer.eos_token_id) for p in prompts]
    alone = vllm_run(tiny_target_path, None, prompts, GAMMA, NEW_TOKENS, context=256)
    assert alone["outputs"] == hf and alone["drafts"] == 0
    for path, method in ((reduced_draft, "draft_model"), (eagle_head[0], "eagle")):
        served = vllm_run(tiny_target_path, path, prompts, GAMMA, NEW_TOKENS, context=256)
        assert served["speculative_config"]["method"] == method
        assert served["outputs"] == hf, method
        assert served["accepted"] > 0 and served["drafts"] > 0, method
        draft, vocab = load_engine_draft(path, target, target_tokenizer)
        ours = engine_run(target, draft, vocab, target_tokenizer, prompts, GAMMA, NEW_TOKENS)
        assert ours["outputs"] == hf, method
        assert served["tau"] == pytest.approx(ours["tau"], rel=0.05), (method, served, ours)
