"""Served answers against an implementation other than our own (issue #37): greedy completions from the Ray Serve
endpoint, on contexts of ≥ 256 tokens, equal Hugging Face `generate` of the target alone, token for token — with a
draft that agrees with the target often but not always (accepted tokens asserted), in chain and token-tree mode."""

from __future__ import annotations

import pytest
from cluster_helpers import free_port, serving
from specdec_helpers import hf_greedy, partial_draft

GAMMA, NEW = 3, 24
TEXT = ("The committee met on a grey morning to settle the budget for the coming year, and the discussion ran long. "
        "Each department argued for its share, the engineers for new machines, the teachers for books, and the "
        "gardeners for seeds and tools. ")


@pytest.fixture(scope="module")
def endpoint(tiny_target_path, target_tokenizer, tmp_path_factory):
    """The tiny target served with a partly agreeing draft (the target's first layer, its final norm perturbed:
    `partial_pair`'s recipe, saved), chain at γ = 3; yields (root URL, draft path, config)."""
    from draftalign.config import JobConfig
    from draftalign.models import save_pretrained_atomic

    draft = partial_draft(tiny_target_path)
    path = save_pretrained_atomic(draft, target_tokenizer, tmp_path_factory.mktemp("models") / "partial-draft")
    cfg = JobConfig.model_validate({
        "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 512},
        "serve": {"port": free_port(), "gamma": GAMMA, "gamma_policy": "fixed", "cpus_per_replica": 1,
                  "model_name": "draftalign"}})
    with serving(cfg, str(path)) as url:
        yield url.removesuffix("/v1"), str(path), cfg


def _long_prompts(tokenizer, n: int = 4) -> list[list[int]]:
    base = tokenizer(TEXT, add_special_tokens=False).input_ids
    out = []
    for i in range(n):
        ids = (base * 8)[i * 7:]
        out.append(ids[: 256 + 13 * i])
    assert all(len(p) >= 256 for p in out)
    return out


def _check(client, prompts, tokenizer, target) -> int:
    accepted = 0
    eos = tokenizer.eos_token_id
    for p in prompts:
        r = client.completions.create(model="draftalign", prompt=p, max_tokens=NEW, temperature=0)
        want = hf_greedy(target, p, NEW, eos)
        assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True), (len(p), want)
        assert r.usage.completion_tokens == len(want)
        accepted += r.model_extra["spec_decoding"]["accepted"]
    return accepted


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_chain_and_tree_equal_hf_generate_on_long_contexts(endpoint, tiny_target_path, target_tokenizer):
    from openai import OpenAI
    from ray import serve

    from draftalign.models import load_causal_lm
    from serve.app import build_app

    root, draft, cfg = endpoint
    target = load_causal_lm(tiny_target_path)  # HF's own model and `generate`: the independent implementation
    prompts = _long_prompts(target_tokenizer)
    chain = OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=120)
    assert _check(chain, prompts, target_tokenizer, target) > 0  # the draft was right at least sometimes

    tree_cfg = cfg.model_copy(deep=True)
    tree_cfg.serve.tree = [2, 1, 1]
    serve.run(build_app(tree_cfg, tiny_target_path, draft), name="tree", route_prefix="/tree")
    try:
        tree = OpenAI(base_url=f"{root}/tree/v1", api_key="unused", max_retries=0, timeout=120)
        assert _check(tree, prompts, target_tokenizer, target) > 0
    finally:
        serve.delete("tree")
