"""An FSPAD head as the engine's draft (`serve.specdec.SpecDecoder` with a `learner.fspad.FSPADHead`).

Plumbing: every round's greedy proposals equal `serve.fspad_proposer.draft_chain` run from scratch on the
target's features of that round's context (the proposer is tested against a cache-free loop) — so the
head's cache holds exactly the verified nodes, re-fed with the target's real features — alone and in
ragged batches. Greedy: token-for-token equality with HF `generate` of the target alone, with a head
trained briefly on the target's own features so that rounds accept every k of 0 … γ. Sampling: a χ² test
of the first three tokens against the target's exact law, on a small-vocabulary target with a random
head, and a broken acceptance rule as the negative control.
"""

from __future__ import annotations

import pytest
import torch
from specdec_helpers import (
    chi2_p,
    empirical,
    exact_three_token_dist,
    hf_greedy,
    random_prompts,
    small_lm,
    train_head,
)

from draftalign.sampling import SamplingParams, sample
from draftalign.tree_shapes import DynamicTree
from learner.fspad import FSPADHead
from serve.fspad_proposer import draft_chain
from serve.specdec import SpecDecoder

P_MIN = 0.01  # χ² p-value above which the empirical distribution is accepted as the target's


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = random_prompts(24, 49152, seed=100)  # the prompts the trained head is tested on (it memorises them)


@pytest.fixture(scope="module")
def trained(target):
    return train_head(target, PROMPTS)


def _record_proposals(engine) -> list:
    views = []
    engine.observer = views.append
    return views


def _check_against_proposer(target, head, views, gamma):
    checked = 0
    for v in views:
        for s, live in enumerate(v.live):
            if not live:
                continue
            ctx = v.ids[s][v.mask[s] == 1].tolist()  # verified tokens ++ x, the token the target emitted last
            with torch.no_grad():
                feats = target.get_decoder()(input_ids=torch.tensor([ctx[:-1]])).last_hidden_state[0]  # (L, H)
            ids, _ = draft_chain(head, feats, ctx[:-1], ctx[-1], gamma)
            assert v.draft_tokens[s].tolist() == ids.tolist()
            checked += 1
    return checked


@pytest.mark.parametrize("vocab", [None, list(range(0, 49152, 3))], ids=["full-vocab", "draft-vocab-1-of-3"])
def test_proposals_equal_the_proposer_from_scratch(target, vocab):
    head = FSPADHead.from_target(target, vocab=vocab, seed=4)
    engine = SpecDecoder(target, head, None, gamma=3)
    views = _record_proposals(engine)
    params = SamplingParams(max_new_tokens=12)
    for p in random_prompts(4, target.config.vocab_size, seed=5):
        engine.generate([p], params)
    assert _check_against_proposer(target, head, views, 3) >= 4 * 3


def test_ragged_batch_proposals_equal_the_proposer(target, trained):
    """Sequences advance by their own k + 1 (masked columns inside the grid): each row still drafts from
    its own verified features."""
    engine = SpecDecoder(target, trained, None, gamma=3)
    views = _record_proposals(engine)
    gens = engine.generate(PROMPTS[:6], SamplingParams(max_new_tokens=16))
    assert len({tuple(g.accepted_histogram) for g in gens}) > 1  # the rows advanced raggedly
    assert _check_against_proposer(target, trained, views, 3) > 6


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_equals_hf_generate_with_partial_acceptance(target, ref, trained, target_tokenizer, gamma):
    engine = SpecDecoder(target, trained, target_tokenizer, gamma=gamma)
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    hist, rounds, target_only = [0] * (gamma + 1), 0, 0
    for p in PROMPTS:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
        rounds, target_only = rounds + got.rounds, target_only + got.target_only_rounds
    assert hist[0] > 0 and hist[gamma] > 0, hist  # rejected and fully accepted rounds
    assert all(h > 0 for h in hist[1:gamma]), hist  # every partial acceptance 0 < k < γ (and its rollback)
    assert target_only == len(PROMPTS) and sum(hist) == rounds - target_only  # one feature-less first round per request


def test_float16_head_steps_stay_lossless(target, ref, trained, target_tokenizer):
    """draft.step_dtype for a head: its layer's and LM-head rows' single-row products in float16 change q,
    never the output (greedy == HF generate, rounds both rejected and fully accepted)."""
    import copy

    from serve.kernels import OneRowLinear

    head = copy.deepcopy(trained)  # the module fixture stays float32
    engine = SpecDecoder(target, head, target_tokenizer, gamma=3, draft_step_dtype=torch.float16)
    assert type(head.layer.mlp.down_proj) is OneRowLinear and head.layer.mlp.down_proj.half.dtype == torch.float16
    assert engine._f.half is not None and engine._f.half.dtype == torch.float16
    params, eos, hist = SamplingParams(max_new_tokens=24), target_tokenizer.eos_token_id, [0] * 4
    for p in PROMPTS:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
    assert hist[0] > 0 and hist[3] > 0, hist
    SpecDecoder(target, head, target_tokenizer, gamma=3)  # None switches the head back
    assert type(head.layer.mlp.down_proj) is torch.nn.Linear


def test_ragged_batch_equals_single(target, trained):
    engine = SpecDecoder(target, trained, None, gamma=3)
    params = SamplingParams(max_new_tokens=20)
    prompts = PROMPTS[8:16]
    for p, b in zip(prompts, engine.generate(prompts, params)):
        single = engine.generate([p], params)[0]
        assert b.token_ids == single.token_ids
        assert (b.rounds, b.accepted, b.rejected) == (single.rounds, single.accepted, single.rejected)


def test_restricted_head_vocabulary_stays_lossless(target, ref, trained, target_tokenizer):
    """The trained head's weights on half the vocabulary (FR-Spec): q = 0 outside it, proposals inside it."""
    vocab = sorted(set(range(0, target.config.vocab_size, 2)) | {target_tokenizer.eos_token_id})
    head = FSPADHead.from_target(target, vocab=vocab)
    head.load_state_dict(trained.state_dict())
    engine = SpecDecoder(target, head, target_tokenizer, gamma=3)
    views = _record_proposals(engine)
    params = SamplingParams(max_new_tokens=16)
    accepted = 0
    for p in PROMPTS[:12]:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 16, target_tokenizer.eos_token_id)
        accepted += got.accepted
    assert accepted > 0 and set(torch.cat([v.draft_tokens[0] for v in views]).tolist()) <= set(vocab)


def test_bad_configuration_is_named(target):
    head = FSPADHead.from_target(target, seed=0)
    with pytest.raises(ValueError, match="own draft vocabulary"):
        SpecDecoder(target, head, draft_vocab=[0, 1, 2])
    engine = SpecDecoder(target, head)
    with pytest.raises(ValueError, match="Llama draft"):
        engine.refresh_draft(1)


# ---------------------------------------------------------------- sampling: χ² losslessness


def _always_accept(draft_tokens, draft_probs, target_probs, generator=None):
    """Broken rule (negative control): accept every draft token, then a bonus token from p."""
    B, gamma = draft_tokens.shape
    return torch.full((B,), gamma), sample(target_probs[:, gamma], generator)


@pytest.mark.parametrize("vocab", [None, [0, 1, 2, 4, 6]], ids=["full-vocab", "draft-vocab-5-of-8"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_three_token_sampling_matches_target_distribution(gamma, vocab):
    """T = 1: the first token comes from the feature-less first round, the 2nd and 3rd from drafted rounds
    (after rejections and rollbacks too: batches of 500 identical prompts advance raggedly)."""
    target = small_lm(0, 60.0)
    head = FSPADHead.from_target(target, vocab=vocab, seed=1)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, head, None, gamma=gamma)
    counts = empirical(engine, prompt, params, n=8000, batch=500, seed0=1000 * gamma, gamma=gamma, tokens=3)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) > P_MIN


def test_three_token_sampling_with_float16_head_steps_matches_target_distribution():
    target = small_lm(0, 60.0)
    head = FSPADHead.from_target(target, seed=1)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, head, None, gamma=3, draft_step_dtype=torch.float16)
    counts = empirical(engine, prompt, params, n=8000, batch=500, seed0=5000, gamma=3, tokens=3)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) > P_MIN


def test_broken_acceptance_rule_fails_the_same_test():
    target = small_lm(0, 60.0)
    head = FSPADHead.from_target(target, seed=1)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, head, None, gamma=3, verifier=_always_accept)
    counts = empirical(engine, prompt, params, n=8000, batch=500, seed0=3000, gamma=3, tokens=3)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) < P_MIN


# ---------------------------------------------------------------- token trees


@pytest.mark.parametrize("branching", [[2, 2, 1], [3, 1]], ids=["2x2x1", "3x1"])
def test_greedy_tree_equals_hf_generate(target, ref, trained, target_tokenizer, branching):
    engine = SpecDecoder(target, trained, target_tokenizer, tree=branching)
    D, N = len(branching), engine.tree.num_nodes
    params = SamplingParams(max_new_tokens=24)
    hist, siblings = [0] * (D + 1), 0
    for p in PROMPTS[:16]:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, target_tokenizer.eos_token_id)
        assert (got.proposed, got.tree_nodes) == (D * (got.rounds - 1), N * (got.rounds - 1))  # round 1: target step
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
        siblings += got.accepted_siblings
    assert hist[0] > 0 and all(h > 0 for h in hist[1:D]), hist  # partial paths accepted
    assert siblings > 0  # a path through the head's non-first choice was accepted


def test_chain_tree_equals_chain_path(target, trained):
    params = SamplingParams(max_new_tokens=20)
    for gamma in (1, 3):
        chain = SpecDecoder(target, trained, None, gamma=gamma)
        tree = SpecDecoder(target, trained, None, tree=[1] * gamma)
        for p in PROMPTS[5 * gamma: 5 * gamma + 5]:
            a, b = chain.generate([p], params)[0], tree.generate([p], params)[0]
            assert b.token_ids == a.token_ids
            assert (b.rounds, b.accepted, b.rejected, b.accepted_histogram) == (
                a.rounds, a.accepted, a.rejected, a.accepted_histogram)


def test_ragged_batch_of_trees_equals_single(target, trained):
    engine = SpecDecoder(target, trained, None, tree=[2, 2, 1])
    params = SamplingParams(max_new_tokens=20)
    prompts = PROMPTS[16:24]
    batched = engine.generate(prompts, params)
    assert len({tuple(g.accepted_histogram) for g in batched}) > 1  # sequences advanced by different k
    for p, b in zip(prompts, batched):
        single = engine.generate([p], params)[0]
        assert b.token_ids == single.token_ids
        assert (b.rounds, b.accepted, b.rejected, b.accepted_siblings) == (
            single.rounds, single.accepted, single.rejected, single.accepted_siblings)


@pytest.mark.parametrize("branching, drafting", [([2, 2, 1], "topk"), ([2, 2], "with_replacement")],
                         ids=["2x2x1-topk", "2x2-iid"])
def test_tree_sampling_matches_target_distribution(branching, drafting):
    target = small_lm(0, 60.0)
    head = FSPADHead.from_target(target, seed=1)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, head, None, tree=branching, drafting=drafting)
    counts = empirical(engine, prompt, params, n=6000, batch=500, tokens=3, seed0=7000)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) > P_MIN


# ---------------------------------------------------------------- dynamic trees (EAGLE-2)


@pytest.mark.parametrize("spec", [DynamicTree(4, 3, 8), DynamicTree(5, 2, 6)], ids=["d4k3n8", "d5k2n6"])
def test_greedy_dynamic_tree_equals_hf_generate(target, ref, trained, target_tokenizer, spec):
    engine = SpecDecoder(target, trained, target_tokenizer, tree=spec)
    params = SamplingParams(max_new_tokens=24)
    hist, siblings, nodes = [0] * (spec.depth + 1), 0, 0
    for p in PROMPTS[:12]:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, target_tokenizer.eos_token_id)
        assert got.proposed == spec.depth * (got.rounds - 1)
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
        siblings, nodes = siblings + got.accepted_siblings, nodes + got.tree_nodes
    assert hist[0] > 0 and sum(hist[2:]) > 0, hist  # rejections and deep paths
    assert siblings > 0  # a path through the head's non-first choice was accepted
    assert 0 < nodes <= spec.nodes * sum(hist)  # never more than `nodes` per round


def test_dynamic_tree_of_width_one_is_the_chain(target, trained):
    """topk 1: the candidates form one chain and the head feeds exactly the chain's nodes (same columns,
    features, positions), so rounds equal the chain engine's, whose proposals are tested against the proposer."""
    params = SamplingParams(max_new_tokens=20)
    chain = SpecDecoder(target, trained, None, gamma=3)
    dyn = SpecDecoder(target, trained, None, tree=DynamicTree(3, 1, 3))
    for p in PROMPTS[:6]:
        a, b = chain.generate([p], params)[0], dyn.generate([p], params)[0]
        assert b.token_ids == a.token_ids
        assert (b.rounds, b.accepted, b.rejected, b.accepted_histogram) == (
            a.rounds, a.accepted, a.rejected, a.accepted_histogram)


def test_full_dynamic_tree_of_depth_two_is_the_static_tree(target, trained):
    """depth 2, topk k, all k + k² candidates kept: the static tree [k, k], drafted through the beam code."""
    params = SamplingParams(max_new_tokens=20)
    static = SpecDecoder(target, trained, None, tree=[2, 2])
    dyn = SpecDecoder(target, trained, None, tree=DynamicTree(2, 2, 6))
    for p in PROMPTS[6:12]:
        a, b = static.generate([p], params)[0], dyn.generate([p], params)[0]
        assert b.token_ids == a.token_ids
        assert (b.rounds, b.accepted_histogram, b.accepted_siblings, b.tree_nodes) == (
            a.rounds, a.accepted_histogram, a.accepted_siblings, a.tree_nodes)


def test_ragged_batch_of_dynamic_trees_equals_target(target, ref, trained, target_tokenizer):
    """One tree shape per round for the batch (values summed over sequences): still each sequence's own
    greedy continuation."""
    engine = SpecDecoder(target, trained, target_tokenizer, tree=DynamicTree(4, 3, 8))
    params = SamplingParams(max_new_tokens=20)
    prompts = PROMPTS[12:20]
    batched = engine.generate(prompts, params)
    assert len({tuple(g.accepted_histogram) for g in batched}) > 1
    for p, b in zip(prompts, batched):
        assert b.token_ids == hf_greedy(ref, p, 20, target_tokenizer.eos_token_id)


def test_dynamic_tree_sampling_matches_target_distribution():
    target = small_lm(0, 60.0)
    head = FSPADHead.from_target(target, seed=1)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    engine = SpecDecoder(target, head, None, tree=DynamicTree(3, 2, 5))
    counts = empirical(engine, prompt, params, n=6000, batch=500, tokens=3, seed0=9000)
    assert chi2_p(counts, exact_three_token_dist(target, prompt, params)) > P_MIN


def test_dynamic_tree_needs_an_fspad_head(target):
    with pytest.raises(ValueError, match="dynamic trees are drafted by an FSPAD head"):
        SpecDecoder(target, target, None, tree=DynamicTree(3, 2, 5))


# ---------------------------------------------------------------- from a checkpoint: eval and the replica engine


def test_eval_and_native_engine_load_an_fspad_checkpoint(tmp_path, tiny_target_path, trained):
    from draftalign.config import load_config
    from draftalign.evaluate import run_eval
    from serve.engines import NativeEngine, ReplicaSettings

    path = str(trained.save(tmp_path / "head"))
    cfg = load_config(None, [f"target.model={tiny_target_path}", f"run_dir={tmp_path / 'run'}", "eval.tasks=[chat]",
                             "eval.prompts_per_task=2", "eval.max_new_tokens=8", "target.max_model_len=512",
                             "eval.trees=[[2, 1], {depth: 3, topk: 2, nodes: 4}]"])
    res = run_eval(cfg, {"fspad": path}, threads=1)["fspad"]
    assert res["interleaved_with"] == ["fspad@3", "fspad@tree:2-1", "fspad@dtree:3-2-4"]
    assert res["lossless_greedy"] == {"checked": 6, "mismatches": 0}
    assert res["overall"]["draft_step_ms"] > 0 and sum(res["overall"]["accepted_histogram"]) > 0
    dyn = res["by_tree"]["dtree:3-2-4"]
    assert dyn["tree"] == {"depth": 3, "topk": 2, "nodes": 4} and dyn["overall"]["block_efficiency"] >= 1

    engine = NativeEngine(tiny_target_path, path, ReplicaSettings(gamma=3, gamma_policy="goodput"), context=512)
    assert engine.features and engine.decoder.policy is None  # a fixed γ: the policy measures Llama drafts
    params = SamplingParams(max_new_tokens=12)
    prompt = PROMPTS[0]
    got = engine.generate([prompt], params)[0]
    assert got.token_ids == engine.decoder.generate_target_only([prompt], params)[0].token_ids
    streamed = [tok for new, _ in engine.stream(prompt, params) for tok in new]
    assert streamed == got.token_ids

    from draftalign.tree_shapes import (
        tree_spec,  # serve.tree as configured: a dynamic tree reaches the replica's engine
    )

    tree = tree_spec(cfg.eval.trees[1])
    engine = NativeEngine(tiny_target_path, path, ReplicaSettings(gamma=3, tree=tree), context=512)
    assert engine.decoder.dynamic == tree and engine.decoder.gamma == 3
    assert engine.generate([prompt], params)[0].token_ids == got.token_ids


def test_serve_checks_an_fspad_checkpoint_before_deploying(tmp_path, tiny_target_path, trained):
    """`draftalign serve --draft <head>`: the app's pre-deploy check reads the head's kind and target shape."""
    from draftalign.models import ModelError
    from serve.app import _check_draft, context_window

    path = str(trained.save(tmp_path / "head"))
    _check_draft(tiny_target_path, path)
    assert context_window(tiny_target_path, path, 512) == 512  # the head has rotary at any position
    other = str(FSPADHead.from_target(small_lm(0, 1.0)).save(tmp_path / "other"))
    with pytest.raises(ModelError, match="only runs on the target it was trained on"):
        _check_draft(tiny_target_path, other)
