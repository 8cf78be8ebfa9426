"""The EAGLE-3 head (`learner.eagle3`, draft.kind=eagle3) in the engine, and its speculators checkpoint.

Features: the engine's lean target pass leaves the same aux states as HF's forward read by hooks
(`draftalign.aux_states.recording`, the feature actors' reading). Plumbing: every round's greedy proposals equal
`serve.fspad_proposer.draft_chain` run from scratch on that round's aux states. Lossless: greedy equals HF
`generate` of the target alone, chain and dynamic tree, with a head trained briefly (cross-entropy on the
target's own tokens, two steps: the tiny target repeats a token, which a longer run learns exactly) so that
rounds accept every k of 0 … γ. Export: `--format eagle3` written and read back
(`EAGLE3Head.from_speculators`) gives the same head, bit for bit, and the speculators fields vLLM reads.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from specdec_helpers import hf_greedy, random_prompts

from draftalign.aux_states import check_aux_layers, default_aux_layers, recording
from draftalign.models import load_causal_lm
from draftalign.sampling import SamplingParams
from draftalign.tree_shapes import DynamicTree
from learner.eagle3 import EAGLE3Head
from serve.fspad_proposer import draft_chain
from serve.specdec import SpecDecoder

V = 49152
VOCAB = [i for i in range(V) if i % 3 != 1]  # a reduced draft vocabulary with gaps everywhere (token 0 in it)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = random_prompts(16, V, seed=100)


def aux_states(target, ids: list[int], layers: list[int]) -> torch.Tensor:
    """(L, len · H): the aux states of `ids` read off HF's forward (the feature actors' way)."""
    with torch.no_grad(), recording(target.get_decoder(), layers) as got:
        target.get_decoder()(input_ids=torch.tensor([ids]))
    return torch.cat(got, -1)[0]


def train_head(target, prompts, steps: int = 2, seed: int = 0, lr: float = 1e-3) -> EAGLE3Head:
    """Teacher-forced cross-entropy of q_{t+2} on the target's own greedy continuations of `prompts` (EAGLE-3
    trains on tokens only): a head that agrees with the target on them often, not always."""
    engine = SpecDecoder(target, None, None)
    seqs = [p + g.token_ids for p, g in zip(prompts, engine.generate(prompts, SamplingParams(max_new_tokens=30)))]
    head = EAGLE3Head.from_target(target, vocab=VOCAB, seed=seed)
    T = max(len(q) for q in seqs)
    ids = torch.tensor([q + [0] * (T - len(q)) for q in seqs])  # (B, T) right-padded
    with torch.no_grad(), recording(target.get_decoder(), head.aux_layers) as got:
        target.get_decoder()(input_ids=ids)
    a = torch.cat(got, -1)  # (B, T, 3H)
    row = torch.full((V,), -100, dtype=torch.long)
    row[torch.tensor(VOCAB)] = torch.arange(len(VOCAB))
    labels = row[ids[:, 2:]]  # (B, T−2): node d predicts s_{d+2}, as a draft row (−100 outside the vocabulary)
    labels[torch.tensor([[j + 2 >= len(q) for j in range(T - 2)] for q in seqs])] = -100
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    pos = torch.arange(T - 2)[None].expand(len(seqs), -1)
    for _ in range(steps):
        logits = head.logits(head(a[:, :-2], ids[:, 1:-1], pos))  # (B, T−2, n_d)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@pytest.fixture(scope="module")
def trained(target):
    return train_head(target, PROMPTS)


# ------------------------------------------------------------------------------------------ layer ids
def test_aux_layer_ids_default_and_checks():
    assert default_aux_layers(32) == [2, 16, 29]  # vLLM's (2, N // 2, N − 3)
    assert default_aux_layers(2) == [0, 1, 2]  # shallow: embedding, middle, last pre-norm state
    assert default_aux_layers(6) == [0, 3, 6]  # vLLM's would repeat 3
    for bad, why in (([1], "at least 2"), ([2, 1, 3], "ascending"), ([0, 1, 3], r"\[0, 2\]")):
        with pytest.raises(ValueError, match=why):
            check_aux_layers(bad, 2)


def test_engine_aux_states_equal_hf_hooks(target):
    """The lean target pass's aux states (what the engine's head reads) = HF's forward read by hooks (what the head
    trained on), for the columns of a ragged, left-padded batch fed in two passes on one cache."""
    from serve.batch_state import _Batch
    from serve.heads import _Head

    layers = [0, 1, 2]
    t = _Head(target, aux_layers=layers)
    prompts = random_prompts(3, V, seed=7)
    batch = _Batch([p[:5 + 2 * s] for s, p in enumerate(prompts)], 0, "cpu")  # ragged: left padding
    cache = t.new_cache(batch)
    t.hidden(cache, batch, 0)
    first = t.aux  # (B, L, 3H)
    batch.append(torch.tensor([[11], [12], [13]]))
    t.hidden(cache, batch, batch.length - 1)
    got = torch.cat([first, t.aux], 1)  # (B, L + 1, 3H)
    assert t.lean is not None  # the engine's own forward, not HF's
    for s in range(3):
        cols = batch.mask[s].bool()
        assert torch.allclose(got[s][cols], aux_states(target, batch.ids[s][cols].tolist(), layers), atol=1e-5)


# ------------------------------------------------------------------------------------------ the engine
def _check_against_proposer(target, head, views, gamma):
    checked = 0
    for v in views:
        for s, live in enumerate(v.live):
            if not live:
                continue
            ctx = v.ids[s][v.mask[s] == 1].tolist()  # verified tokens ++ x, the token the target emitted last
            ids, _ = draft_chain(head, aux_states(target, ctx[:-1], head.aux_layers), ctx[:-1], ctx[-1], gamma)
            assert v.draft_tokens[s].tolist() == ids.tolist()
            checked += 1
    return checked


def test_eval_and_serving_treat_an_eagle3_head_as_a_feature_head(target, trained):
    """Eval's arms (dynamic trees, no adaptive arm) and the serving engine (fixed γ, no online capture) decide by
    `is_head`: an EAGLE-3 head is one, as the FSPAD head is (eval silently dropped its dynamic trees before)."""
    from learner.feature_heads import is_head
    from learner.fspad import FSPADHead

    assert is_head(trained) and is_head(FSPADHead.from_target(target)) and not is_head(target)


def test_proposals_equal_the_proposer_from_scratch(target, trained):
    """Ragged batches: every row's proposals are the reference chain on its own verified aux states, so the head's
    cache holds exactly the verified nodes, re-fed with the target's real aux states."""
    engine = SpecDecoder(target, trained, None, gamma=3)
    views = []
    engine.observer = views.append
    gens = engine.generate(PROMPTS[:6], SamplingParams(max_new_tokens=16))
    assert len({tuple(g.accepted_histogram) for g in gens}) > 1  # the rows advanced raggedly
    assert _check_against_proposer(target, trained, views, 3) > 6


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_equals_hf_generate_with_partial_acceptance(target, ref, trained, target_tokenizer, gamma):
    engine = SpecDecoder(target, trained, target_tokenizer, gamma=gamma)
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    hist = [0] * (gamma + 1)
    for p in PROMPTS:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        hist = [a + b for a, b in zip(hist, got.accepted_histogram)]
    assert hist[0] > 0 and hist[gamma] > 0, hist  # rejected and fully accepted rounds
    assert all(h > 0 for h in hist[1:gamma]), hist  # every partial acceptance 0 < k < γ (and its rollback)


def test_greedy_dynamic_tree_equals_hf_generate(target, ref, trained, target_tokenizer):
    engine = SpecDecoder(target, trained, target_tokenizer, tree=DynamicTree(depth=3, topk=2, nodes=6))
    params = SamplingParams(max_new_tokens=20)
    accepted = 0
    for p in PROMPTS[:6]:
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 20, target_tokenizer.eos_token_id)
        accepted += sum(k * n for k, n in enumerate(got.accepted_histogram))
    assert accepted > 0


# ------------------------------------------------------------------------------------------ export, round trip
@pytest.fixture(scope="module")
def exported(trained, tiny_target_path, tmp_path_factory):
    from serve.export import export_draft

    d = tmp_path_factory.mktemp("eagle3")
    head = trained.save(d / "head")
    return head, export_draft(head, d / "speculators", "eagle3", tiny_target_path)


def test_eagle3_export_writes_the_speculators_fields(exported, target):
    from safetensors.torch import load_file

    from draftalign.vocab import load_draft_vocab

    head, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["draft_vocab_size"] == len(VOCAB)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2] and cfg["norm_before_residual"] is False
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 1
    assert cfg["speculators_config"]["verifier"]["name_or_path"]
    w = load_file(str(out / "model.safetensors"))
    H = target.config.hidden_size
    assert w["fc.weight"].shape == (H, 3 * H) and w["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * H
    assert w["lm_head.weight"].shape == (len(VOCAB), H) and "embed_tokens.weight" not in w
    assert {"norm.weight", "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight"} <= set(w)
    d2t, t2d = w["d2t"], w["t2d"]  # vLLM: draft row j is target id j + d2t[j]
    assert d2t.dtype == torch.int64 and (torch.arange(len(VOCAB)) + d2t).tolist() == VOCAB
    assert t2d.dtype == torch.bool and t2d.nonzero()[:, 0].tolist() == VOCAB == load_draft_vocab(head, V)


def test_speculators_checkpoint_loads_back_exactly(exported, target, trained):
    """The export read as a starting point (`EAGLE3Head.from_speculators`, and through the engine's loader) is the
    head: same weights, vocabulary, layer ids, and the same logits on the same aux states."""
    from serve.drafts import load_engine_draft

    _, out = exported
    back, vocab = load_engine_draft(str(out), target, None)
    assert vocab is None and back.aux_layers == trained.aux_layers and back.vocab.ids.tolist() == VOCAB
    assert back.norm_before_residual == trained.norm_before_residual
    for k, v in trained.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    a = aux_states(target, PROMPTS[0], trained.aux_layers)[None]
    ids, pos = torch.tensor([PROMPTS[0][1:] + [5]]), torch.arange(len(PROMPTS[0]))[None]
    with torch.no_grad():
        assert torch.equal(back.logits(back(a, ids, pos)), trained.logits(trained(a, ids, pos)))


def test_speculators_checkpoint_refusals(exported, target, tmp_path):
    import shutil

    from draftalign.models import ModelError

    _, out = exported
    for field, value, why in (("norm_before_fc", True, "norm_before_fc"),
                              ("eagle_aux_hidden_state_layer_ids", [0, 1, 5], r"\[0, 2\]"),
                              ("target_hidden_size", 4096, "target_hidden_size")):
        d = tmp_path / field
        shutil.copytree(out, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises((ModelError, ValueError), match=why):
            EAGLE3Head.from_speculators(d, target)


def test_other_formats_refuse_an_eagle3_head(exported, tiny_target_path, tmp_path):
    from serve.export import ExportRefused, export_draft

    head, _ = exported
    with pytest.raises(ExportRefused, match="--format eagle3"):
        export_draft(head, tmp_path / "x", "eagle", tiny_target_path)
    with pytest.raises(ExportRefused, match="--format eagle3"):
        export_draft(head, tmp_path / "x", "hf", tiny_target_path)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ the stage, on Ray
from distill_helpers import job_fixture, peaked_target_fixture  # noqa: E402, F401 - fixtures


@pytest.fixture(scope="module")
def ray_local():
    from draftalign.runtime import init_ray

    ray = init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_eagle3_stage_trains_restores_decodes_and_restarts_from_its_export(ray_local, job, peaked_target,
                                                                           target_tokenizer, tmp_path):
    """The FSPAD head's stage with draft.kind=eagle3 (real Ray: feature store of aux states, Ray Train, training-time
    test from step 3): 6 steps, checkpoints at 2, 4, 6; a checkpoint restores as the worker restores it on resume
    (the stage's resume itself is the FSPAD head's, tests/test_fspad.py: one code path for both kinds); the exported
    head is an EAGLE-3 head whose held-out figures recompute; the engine decodes with it losslessly; its speculators
    export, read as draft.eagle3.init_from reads it, has exactly its held-out acceptance."""
    import math

    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from learner.feature_heads import load_head
    from learner.fspad_distill import evaluate_heldout, run_fspad
    from learner.trainer import STATE_FILE, adamw, check_restored, param_groups
    from serve.export import export_draft

    over = dict(draft__kind="eagle3", learner__max_steps=6, learner__checkpoint_every=2, learner__lr=3e-3,
                rollout__batch_size=4, draft__fspad__unroll=2, draft__fspad__unroll_from_step=2)
    cfg = job("eagle3", **over)
    out = run_fspad(cfg)
    target = load_causal_lm(peaked_target)
    head = load_head(out, target).eval()
    H = target.config.hidden_size
    assert isinstance(head, EAGLE3Head) and head.aux_layers == [0, 1, 2] and head.vocab.ids is not None
    shard = load_file(str(cfg.run_path / "fspad_features" / "shard-00000.safetensors"))
    assert shard["F"].shape[-1] == 3 * H  # the store holds the aux states, not the last feature
    log = [json.loads(line) for line in (cfg.run_path / "fspad_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(r["feature_loss"] == 0 for r in log)
    assert [("unrolled_acceptance" in r) for r in log] == [False, False, True, True, True, True]
    acc = EventAccumulator(str(cfg.run_path / "tensorboard" / "fspad"))
    acc.Reload()
    assert {"train/loss", "train/logit_loss", "heldout/heldout_acceptance"} <= set(acc.Tags()["scalars"])
    done = json.loads((cfg.run_path / "fspad_done.json").read_text())
    assert done["resumed_from_step"] == 0 and done["steps"] == 6 and done["heldout_positions"] > 0

    # what a resume from step 4 restores (`train_loop_per_worker`): the checkpoint's head (`load_head`) and its
    # optimizer state, refused unless the pair hashes to the digest saved with it — and logged at step 4
    ckpt = next((cfg.run_path / "ray_results" / "fspad").glob("checkpoint_step_00000004_*"))
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    back = load_head(ckpt, target).train()
    assert isinstance(back, EAGLE3Head) and back.aux_layers == head.aux_layers
    opt = adamw(param_groups(back, cfg.learner.weight_decay), lr=cfg.learner.lr)
    opt.load_state_dict(state["optimizer"])
    assert state["step"] == 4 and check_restored(back, opt, state, ckpt) == log[3]["state_digest"]

    saved = torch.load(cfg.run_path / "fspad_features" / "heldout.pt", weights_only=False)["batch"]
    assert saved.features.shape[-1] == 3 * H
    recomputed = evaluate_heldout(head, saved, cfg, torch.device("cpu"))
    for key in ("heldout_acceptance", "heldout_greedy_acceptance", "heldout_acceptance_2", "heldout_acceptance_3"):
        assert math.isclose(recomputed[key], done[key], abs_tol=1e-5), (key, recomputed[key], done[key])

    engine = SpecDecoder(load_causal_lm(peaked_target), head, target_tokenizer, gamma=3)
    for p in random_prompts(3, V, seed=9):
        assert engine.generate([p], SamplingParams(max_new_tokens=12))[0].token_ids == hf_greedy(
            target, p, 12, target_tokenizer.eos_token_id)

    # draft.eagle3.init_from: the stage's builder reads a speculators checkpoint with from_speculators; from this
    # head's export it starts at exactly its held-out figures (no second stage run: the loader is what is new)
    spec = export_draft(out, tmp_path / "speculators", "eagle3", peaked_target)
    start = evaluate_heldout(EAGLE3Head.from_speculators(spec, target, cfg.draft.fspad.model_dump()).eval(), saved,
                             cfg, torch.device("cpu"))
    assert math.isclose(start["heldout_acceptance"], done["heldout_acceptance"], abs_tol=1e-5)


# ------------------------------------------------------------------------------------------ in vLLM
@pytest.mark.slow
@pytest.mark.skipif(__import__("os").environ.get("DRAFTALIGN_SKIP_VLLM_SERVE") == "1",
                    reason="DRAFTALIGN_SKIP_VLLM_SERVE=1 (it starts vLLM once: ~1 GiB, ~1 min)")
@pytest.mark.timeout(1800)
def test_eagle3_export_in_vllm_equals_target_greedy_at_the_engines_tau(exported, tiny_target_path, ref, trained,
                                                                        target_tokenizer):
    """export → vLLM loads it (method eagle3, its speculators config) → greedy output = HF generate → acceptance
    > 0 from vLLM's counters, and τ = 1 + accepted / drafts within 5% of draftalign's engine with the same head."""
    from bench.parity import engine_run, vllm_run

    _, out = exported
    prompts = PROMPTS[:6]
    hf = [hf_greedy(ref, p, 24, eos=target_tokenizer.eos_token_id) for p in prompts]
    served = vllm_run(tiny_target_path, str(out), prompts, 3, 24, context=256)
    assert served["speculative_config"]["method"] == "eagle3"
    assert served["outputs"] == hf
    assert served["accepted"] > 0 and served["drafts"] > 0
    ours = engine_run(ref, trained, None, target_tokenizer, prompts, 3, 24)
    assert ours["outputs"] == hf
    assert served["tau"] == pytest.approx(ours["tau"], rel=0.05), (served, ours)
