"""The FSPAD head (learner/fspad.py), its losses (learner/losses.py), the target's feature batches
(actors/features.py) and its training stage (learner/fspad_distill.py), on tiny random Llamas with the
SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from distill_helpers import peaked_target_fixture  # noqa: F401 - fixture

from actors.features import feature_batch, sample_from_topk
from draftalign.models import ModelError, load_causal_lm
from learner.fspad import FSPADHead, is_fspad_head, read_config
from learner.losses import TargetDist, compute_loss, feature_regression, partial_alignment_loss


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


# ---------------------------------------------------------------------------------- the losses

def test_feature_regression_hand_values():
    pred = torch.tensor([[0.0, 2.0, 0.5, 0.0], [1.0, 0.0, 0.0, -3.0]])
    zero = torch.zeros_like(pred)
    # SmoothL1 (β = 1): 0 → 0, 2 → 1.5, 0.5 → 0.125, 1 → 0.5, 3 → 2.5
    torch.testing.assert_close(feature_regression(pred, zero, 1.0), torch.tensor([1.625 / 4, 3.0 / 4]))
    torch.testing.assert_close(feature_regression(pred, zero, 0.5), torch.tensor([1.5 / 2, 0.5 / 2]))
    torch.testing.assert_close(feature_regression(pred, zero, 0.3), torch.tensor([1.5 / 2, 0.5 / 2]))  # ⌈1.2⌉ = 2
    torch.testing.assert_close(feature_regression(pred, zero, 0.25), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="aligned_fraction"):
        feature_regression(pred, zero, 0.0)
    with pytest.raises(ValueError, match="same"):
        feature_regression(pred, zero[:, :3])


def test_partial_alignment_loss_hand_values():
    pred = torch.tensor([[0.0, 2.0, 0.5, 0.0], [1.0, 0.0, 0.0, -3.0]])
    logit = torch.tensor([0.2, 1.0])
    loss, stats = partial_alignment_loss(pred, torch.zeros_like(pred), logit, aligned_fraction=0.5,
                                         feature_weight=2.0, logit_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor([2.0 * 0.75 + 0.5 * 0.2, 2.0 * 0.25 + 0.5 * 1.0]))
    assert stats["feature_loss"] == pytest.approx(0.5) and stats["logit_loss"] == pytest.approx(0.6)


def test_partial_alignment_regresses_only_the_aligned_slice():
    """The regression term's gradient reaches the first ⌈a·H⌉ feature dimensions only; the logit term (through
    the LM head) reaches all of them."""
    torch.manual_seed(0)
    H, m = 8, 3
    pred = torch.randn(5, H, requires_grad=True)
    feature_regression(pred, torch.randn(5, H), aligned_fraction=m / H).sum().backward()
    assert (pred.grad[:, :m].abs() > 0).all() and (pred.grad[:, m:] == 0).all()
    W = torch.randn(11, H)
    target = TargetDist(torch.log_softmax(torch.randn(5, 11), -1))
    pred.grad = None
    logit_loss, _ = compute_loss("fkl", pred @ W.T, target)
    loss, _ = partial_alignment_loss(pred, torch.randn(5, H), logit_loss, aligned_fraction=m / H, feature_weight=0.0,
                                     logit_weight=1.0)
    loss.sum().backward()
    assert (pred.grad[:, m:].abs() > 0).all()


# ------------------------------------------------------------------------------ feature batches

def test_feature_batch_layout_matches_the_target(target):
    """Without feature sampling: node d reads (f_d, s_{d+1}); loss nodes d ∈ [P−2, L−3] regress f_{d+1} and
    distil the stored top-k of s_{d+2}, one per answer token."""
    rows = _rows(3, seed=1, k=5, target=target)
    rows[1]["target_ids"] = rows[1]["target_logprobs"] = None  # this row's top-k comes from the target's features
    fb = feature_batch(target, rows, k=5)
    n = 0
    for b, r in enumerate(rows):
        P, s = len(r["prompt_token_ids"]), r["prompt_token_ids"] + r["response_token_ids"]
        L, R = len(s), len(r["response_token_ids"])
        F = _features(target, s)
        torch.testing.assert_close(fb.features[b, :L - 1], F[:L - 1], rtol=1e-4, atol=1e-4)
        assert fb.input_ids[b, :L - 1].tolist() == s[1:] and fb.position_ids[b, :L - 1].tolist() == list(range(L - 1))
        assert fb.loss_mask[b].nonzero()[:, 0].tolist() == list(range(P - 2, L - 2))
        torch.testing.assert_close(fb.target_features[n:n + R], F[P - 1:L - 1], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            want = torch.topk(torch.log_softmax(target(torch.tensor([s])).logits[0, P - 1:L - 1], -1), 5, -1)
        assert fb.target_ids[n:n + R].tolist() == want.indices.tolist()
        torch.testing.assert_close(fb.target_logprobs[n:n + R], want.values, rtol=1e-4, atol=1e-4)
        n += R
    assert fb.n_tokens == n and not fb.sampled.any()


def test_stored_top_k_is_used_as_stored(target):
    rows = _rows(1, seed=2)
    R = len(rows[0]["response_token_ids"])
    rows[0]["target_ids"] = torch.arange(7).repeat(R, 1).numpy() + 11
    rows[0]["target_logprobs"] = torch.full((R, 7), -3.0).numpy()
    fb = feature_batch(target, rows, k=4)
    assert fb.target_ids.tolist() == [[11, 12, 13, 14]] * R and (fb.target_logprobs == -3.0).all()


def test_sample_from_topk_follows_the_renormalised_top_k():
    ids = torch.tensor([[5, 9, 2]]).repeat(20000, 1)
    lps = torch.log(torch.tensor([[0.3, 0.1, 0.2]])).repeat(20000, 1)  # tail 0.4: dropped, the rest renormalised
    x = sample_from_topk(ids, lps, torch.Generator().manual_seed(0))
    freq = torch.stack([(x == t).float().mean() for t in (5, 9, 2)])
    torch.testing.assert_close(freq, torch.tensor([0.5, 1 / 6, 1 / 3]), atol=0.015, rtol=0)


def test_feature_sampling_targets_are_the_targets_own_continuation(target):
    """Re-drawn tokens: the node reads (f_d, x) at position d and sees only data nodes < d; its targets are the
    target's feature after s_≤d + x (one extra node of the target's tree pass) and the top-k of its softmax(W g)."""
    rows = _rows(3, seed=3, k=6, target=target)
    fb = feature_batch(target, rows, k=6, feature_sampling=True, generator=torch.Generator().manual_seed(0))
    assert fb.sampled.any(), "the random target's flat top-6 must re-draw some tokens"
    n = 0
    for b, r in enumerate(rows):
        P, s = len(r["prompt_token_ids"]), r["prompt_token_ids"] + r["response_token_ids"]
        L = len(s)
        loss_nodes = fb.loss_mask[b].nonzero()[:, 0].tolist()
        for i in loss_nodes:
            if i < L - 1:  # a data node: the data token was drawn
                assert not fb.sampled[n] and fb.input_ids[b, i] == s[i + 1]
            else:  # an extra node for a re-drawn token x at position d
                d, x = int(fb.position_ids[b, i]), int(fb.input_ids[b, i])
                assert fb.sampled[n] and x != s[d + 1] and d >= P - 1
                assert not fb.loss_mask[b, d]  # the data node it replaces carries no loss
                assert fb.allowed[b, i].nonzero()[:, 0].tolist() == [*range(d), i]
                torch.testing.assert_close(fb.features[b, i], _features(target, s)[d], rtol=1e-4, atol=1e-4)
                branch = s[:d + 1] + [x]
                torch.testing.assert_close(fb.target_features[n], _features(target, branch)[-1], rtol=1e-4, atol=1e-4)
                with torch.no_grad():
                    want = torch.topk(torch.log_softmax(target(torch.tensor([branch])).logits[0, -1], -1), 6)
                assert fb.target_ids[n].tolist() == want.indices.tolist()
            n += 1
        assert len(loss_nodes) == len(r["response_token_ids"])  # one loss position per answer token, as unsampled
    assert n == fb.n_tokens


def test_tree_nodes_of_the_head_equal_their_own_chains(target):
    """The head on a batch with extra nodes: each node's f̂ equals a plain causal forward of the chain it
    stands for (data nodes are unaffected by the extra nodes)."""
    rows = _rows(2, seed=4, k=6, target=target)
    fb = feature_batch(target, rows, k=6, feature_sampling=True, generator=torch.Generator().manual_seed(1))
    assert fb.sampled.any()
    head = FSPADHead.from_target(target, seed=5)
    with torch.no_grad():
        out = head(fb.features, fb.input_ids, fb.position_ids, fb.allowed)
        for b, r in enumerate(rows):
            L = len(r["prompt_token_ids"]) + len(r["response_token_ids"])
            chain = head(fb.features[b:b + 1, :L - 1], fb.input_ids[b:b + 1, :L - 1], fb.position_ids[b:b + 1, :L - 1])
            torch.testing.assert_close(out[b, :L - 1], chain[0], rtol=1e-4, atol=1e-5)
            for i in range(L - 1, fb.features.shape[1]):
                if not fb.loss_mask[b, i]:
                    continue  # padding
                d = int(fb.position_ids[b, i])
                feats = torch.cat([fb.features[b, :d], fb.features[b, i:i + 1]])[None]
                ids = torch.cat([fb.input_ids[b, :d], fb.input_ids[b, i:i + 1]])[None]
                alone = head(feats, ids, torch.arange(d + 1)[None])
                torch.testing.assert_close(out[b, i], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_unrolled_steps_are_the_decoded_chain(target):
    """Training-time test: chain step k of base node d equals a cache-free chain on the head's own f̂ — data nodes
    ≤ d with the target's features, then nodes (f̂^{j−1}, s_{d+j}) at positions d + j − 1 — with data node
    (d + k − 1)'s targets, at every loss position (rows of different prompt lengths, feature sampling on)."""
    from transformers import DynamicCache

    from draftalign.config import JobConfig
    from learner.fspad_distill import head_loss, unrolled_steps

    cfg = JobConfig.model_validate({"draft": {"kind": "fspad"}, "distill": {"loss": "fkl"}})
    rows = _rows(3, seed=4, prompt=(3, 9), k=6, target=target)
    fb = feature_batch(target, rows, k=6, feature_sampling=True, generator=torch.Generator().manual_seed(1))
    plain = feature_batch(target, rows, k=6)  # without re-drawn nodes, next_* are the step-1 targets
    assert torch.equal(plain.next_mask, plain.loss_mask)
    assert torch.equal(plain.next_ids[plain.next_mask], plain.target_ids)
    head = FSPADHead.from_target(target, seed=0).eval()
    with torch.no_grad():
        cache = DynamicCache()
        _, _, _, f_hat = head_loss(head, head, fb, cfg, None, cache)
        steps = unrolled_steps(head, fb, f_hat, cache, 3, cfg, None)
        assert [st.k for st in steps] == [2, 3]
        for st in steps:
            want_logits, want_ids = [], []
            for b in range(len(rows)):
                for d in range(fb.features.shape[1]):
                    if not (d + st.k - 1 < fb.features.shape[1] and fb.next_mask[b, d]
                            and fb.next_mask[b, d + st.k - 1]):
                        continue
                    feats, ids = fb.features[b, :d + 1], fb.input_ids[b, :d + 1]
                    for j in range(1, st.k + 1):  # j = 1: the data nodes; j ≥ 2: one more node on f̂^{j−1}
                        out = head(feats[None], ids[None], torch.arange(d + j)[None])[0, -1]
                        if j < st.k:
                            feats = torch.cat([feats, out[None]])
                            ids = torch.cat([ids, fb.input_ids[b, d + j:d + j + 1]])
                    want_logits.append(head.logits(out))
                    want_ids.append(fb.next_ids[b, d + st.k - 1])
            assert len(want_logits) == st.logits.shape[0] > 0
            torch.testing.assert_close(st.logits, torch.stack(want_logits), rtol=1e-4, atol=1e-4)
            assert torch.equal(st.target_ids, torch.stack(want_ids))
            assert st.loss.shape == (len(want_logits),) and torch.isfinite(st.loss).all()


def test_unroll_schedule_defaults_to_the_last_share_of_the_steps():
    """draft.fspad.unroll_from_step: unset = the last 12% of learner.max_steps (the measured curriculum), else as
    given; a negative step or an unroll of 0 is refused by name."""
    from draftalign.config import JobConfig

    fs = JobConfig.model_validate({"draft": {"kind": "fspad"}}).draft.fspad
    assert fs.unroll == 3 and fs.unroll_start(1530) == 1346 and fs.unroll_start(200) == 176
    fs = JobConfig.model_validate({"draft": {"kind": "fspad", "fspad": {"unroll_from_step": 1350}}}).draft.fspad
    assert fs.unroll_start(1530) == 1350
    for bad, field in (({"unroll_from_step": -1}, "unroll_from_step"), ({"unroll": 0}, "unroll")):
        with pytest.raises(Exception, match=field):
            JobConfig.model_validate({"draft": {"kind": "fspad", "fspad": bad}})


def test_a_few_steps_reduce_the_loss(peaked_target):
    """AdamW on one batch of a (peaked) tiny target's features: the partial-alignment loss (FKL logit term) falls,
    both its terms with it."""
    from draftalign.config import JobConfig
    from learner.fspad_distill import head_loss

    target = load_causal_lm(peaked_target)
    cfg = JobConfig.model_validate({"draft": {"kind": "fspad"}, "distill": {"loss": "fkl"}})
    rows = _rows(4, seed=6, k=8, target=target)
    fb = feature_batch(target, rows, k=8, feature_sampling=True, generator=torch.Generator().manual_seed(2))
    head = FSPADHead.from_target(target, seed=0)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    losses, terms = [], []
    for _ in range(12):
        per_pos, stats, _, _ = head_loss(head, head, fb, cfg, None)
        loss = per_pos.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        terms.append((stats["feature_loss"], stats["logit_loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert terms[-1][0] < terms[0][0] and terms[-1][1] < terms[0][1], terms
    assert head.embed_weight.grad is None and not head.embed_weight.requires_grad  # the target's weights stay frozen


def test_feature_actor_batches_are_a_pure_function_of_the_step(tiny_target_path, target):
    """What resume relies on: batch (step, rank) has the same rows and the same draws every time it is asked for."""
    from actors.features import TargetFeatures

    rows = _rows(6, seed=7, k=4, target=target)
    a = TargetFeatures(tiny_target_path, "float32", rows, batch_size=4, k=4, feature_sampling=True, seed=0)
    b = TargetFeatures(tiny_target_path, "float32", rows, batch_size=4, k=4, feature_sampling=True, seed=0)
    first, again, other = a.batch(3, 1, 2), b.batch(3, 1, 2), a.batch(4, 1, 2)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.target_ids, again.target_ids)
    assert first.features.shape[0] == 2  # rank 1 of 2 takes every other row of the step's 4
    assert not (first.input_ids.shape == other.input_ids.shape and torch.equal(first.input_ids, other.input_ids))


def test_store_fingerprint_names_the_dtype_the_features_were_computed_in():
    """bf16 features are not fp32 ones: a store built in one dtype is rebuilt for the other (an fp32 store keeps
    the fingerprint it had before the dtype was recorded)."""
    from actors.feature_store import fingerprint, store_dtype
    from draftalign.config import load_config

    rows = [{"prompt_id": "a", "prompt_token_ids": [1, 2], "response_token_ids": [3]}]
    fp32 = fingerprint("t", 20, 0, rows)
    assert fingerprint("t", 20, 0, rows, "float32") == fp32 != fingerprint("t", 20, 0, rows, "bfloat16")
    assert store_dtype(load_config(None, ["target.dtype=bfloat16"])) == "bfloat16"
    assert store_dtype(load_config(None, ["target.dtype=float32"])) == "float32"


def test_feature_store_serves_the_rows_the_target_computes(target, tmp_path):
    """A stored shard read back equals the target's own RowFeatures of each row (draws seeded per row, so a row's
    batch-mates and the shard's length-sorted passes change nothing; features to float16 precision); a sampled
    store also serves a job without feature sampling."""
    from safetensors.torch import save_file

    from actors.feature_store import META_FILE, FeatureStore, shard_name
    from actors.features import collate, compute_shard, row_features, row_seed

    rows = _rows(5, seed=8, k=6, target=target)
    save_file(compute_shard(target, rows, 0, k=6, feature_sampling=True, seed=3, pass_rows=2),
              str(tmp_path / shard_name(0)))
    (tmp_path / META_FILE).write_text(json.dumps({"num_rows": 5, "shard_rows": 5, "num_shards": 1}))
    store = FeatureStore(tmp_path)
    gens = [torch.Generator().manual_seed(row_seed(3, i)) for i in range(5)]
    want = row_features(target, rows, k=6, feature_sampling=True, generator=gens)
    assert sum(len(w.alts) for w in want) > 0, "the random target's flat top-6 must re-draw some tokens"
    for i, w in enumerate(want):
        got = store.row(i)
        assert got.alts == w.alts and torch.equal(got.ids, w.ids) and torch.equal(got.g_ids, w.g_ids)
        torch.testing.assert_close(got.F.float(), w.F, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got.G.float(), w.G, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got.lps, w.lps)
    fb, ref = collate(rows, [store.row(i) for i in range(5)]), collate(rows, want)
    assert torch.equal(fb.loss_mask, ref.loss_mask) and torch.equal(fb.allowed, ref.allowed)
    assert torch.equal(fb.target_ids, ref.target_ids) and fb.sampled.any()
    plain = collate(rows, [store.row(i, feature_sampling=False) for i in range(5)])
    ref = feature_batch(target, rows, k=6)
    assert torch.equal(plain.loss_mask, ref.loss_mask) and torch.equal(plain.target_ids, ref.target_ids)
    assert not plain.sampled.any()
    torch.testing.assert_close(plain.features, ref.features, rtol=2e-3, atol=2e-3)


def test_stored_features_actor_scores_chains_on_the_rows_of_its_batch(target, tiny_target_path, tmp_path):
    """On-policy training with a store: the StoredFeatures actor loads the target at the first request and scores
    the head's chains on the rows of batch (step, rank) — the rows `batch` serves — as `branch_features` does."""
    from safetensors.torch import save_file

    from actors.feature_store import META_FILE, StoredFeatures, shard_name
    from actors.features import branch_features, compute_shard

    rows = _rows(5, seed=9, k=6, target=target)
    save_file(compute_shard(target, rows, 0, k=6, feature_sampling=False, seed=3), str(tmp_path / shard_name(0)))
    (tmp_path / META_FILE).write_text(json.dumps({"num_rows": 5, "shard_rows": 5, "num_shards": 1, "k": 6}))
    threads = torch.get_num_threads()
    try:
        actor = StoredFeatures(str(tmp_path), rows, batch_size=3, feature_sampling=False, seed=3,
                               scoring=(tiny_target_path, "float32", threads))
        fb = actor.batch(1, 0, 1)
        picked = [rows[int(i)] for i in actor.sampler.indices(3, 3)]
        assert fb.input_ids[0, :4].tolist() == (picked[0]["prompt_token_ids"] + picked[0]["response_token_ids"])[1:5]
        branches = [[(2, [101, 102])], [], [(3, [7])]]
        got = actor.score_branches(1, 0, 1, branches)
    finally:
        torch.set_num_threads(threads)
    for (g, ids, lps), (wg, wids, wlps) in zip(got, branch_features(target, picked, branches, k=6), strict=True):
        assert torch.equal(ids, wids) and g.shape == wg.shape
        torch.testing.assert_close(g, wg, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lps, wlps, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="without a target"):
        StoredFeatures(str(tmp_path), rows, batch_size=3, feature_sampling=False, seed=3).score_branches(0, 0, 1, [])


# ------------------------------------------------------------------------------ the stage, on Ray

@pytest.fixture(scope="module")
def fspad_run(tmp_path_factory, tiny_target_path):
    """`draftalign run JOB --set draft.kind=fspad`, as a user runs it (a subprocess), then once more: the job, the
    run dir, both logs and the first run's summaries read at once (the stage test below resumes that run's fspad
    stage in place). Made before the Ray fixture below: the subprocess starts its own Ray. 6 steps, checkpoints
    at 3 and 6, chain steps 1 … 3 trained from the fifth step on."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import yaml

    root, tmp = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("fspad-run")
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "fspad-cli", "run_dir": str(tmp / "run"), "seed": 1,
        "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": 512, "cpus_per_engine": 0.5,
                   "top_k_logprobs": 8},
        "draft": {"fspad": {"unroll": 3, "unroll_from_step": 4}},
        "generate": {"num_prompts": 12, "shard_size": 6, "max_tokens": 12},
        "rollout": {"batch_size": 4},
        "learner": {"max_steps": 6, "checkpoint_every": 3, "warmup_steps": 1, "lr": 3e-3},
        "eval": {"tasks": ["chat"], "prompts_per_task": {"chat": 2}, "gamma": [2], "trees": [[2, 1]],
                 "max_new_tokens": 8},
        "cluster": {"nodes": [{"cpus": 2}]}}))
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run(name: str) -> str:
        log = tmp / name
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, "-m", "draftalign.cli", "run", str(job), "--set", "draft.kind=fspad"],
                                cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=540).returncode
        assert rc == 0, log.read_text()[-4000:]
        return log.read_text()

    rdir = tmp / "run"
    first = run("first.log")
    read = {"done": json.loads((rdir / "fspad_done.json").read_text()),
            "eval": json.loads((rdir / "eval_distilled.json").read_text()), "report": (rdir / "report.md").read_text()}
    return SimpleNamespace(job=job, run_dir=rdir, first=first, second=run("second.log"), **read)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_draftalign_run_kind_fspad_generates_then_trains_the_head(fspad_run, tiny_target_path):
    """The CLI, as a user runs it: `draftalign run JOB --set draft.kind=fspad` = generate (vLLM, the set stores
    the target's top-k) → no stage 1 → the fspad stage → eval with the head (chain and tree) → report; a rerun
    skips them all."""
    out, rdir, done, ev = fspad_run.first, fspad_run.run_dir, fspad_run.done, fspad_run.eval
    assert "[run] generate: done" in out  # the set was generated by this run, not found
    assert "pretrain: skipped for draft.kind=fspad" in out and not (rdir / "draft_pretrained").exists()
    assert done["steps"] == 6 and done["fspad"]["feature_sampling"] is True
    FSPADHead.load(rdir / "draft_fspad", load_causal_lm(tiny_target_path))
    assert ev["draft"] == str(rdir / "draft_fspad") and "tree:2-1" in ev["by_tree"]  # decoded with the head
    assert ev["lossless_greedy"]["mismatches"] == 0 and ev["lossless_greedy"]["checked"] > 0
    assert "fspad" in fspad_run.report
    assert "acceptance by chain step k" in fspad_run.report  # training-time test vs engine, by depth
    again = fspad_run.second
    assert "fspad: complete (fspad_done.json), skipped" in again and "eval: complete" in again


@pytest.fixture(scope="module")
def ray_local():
    from draftalign.runtime import init_ray

    ray = init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fspad_stage_trains_checkpoints_and_resumes(fspad_run, ray_local, target, tiny_target_path):
    """Real Ray: the fspad stage of `draftalign run` above — the feature store (a TargetFeatures actor runs the HF
    target over the generated set) feeding a one-worker TorchTrainer through a StoredFeatures actor; 6 steps with a
    checkpoint at 3 and 6 (chain steps 1 … 3 trained from the fifth step on) — then resumed here (`run_fspad`) to 8
    from the step-6 checkpoint with on-policy chains (the StoredFeatures actor loads the target and scores them).
    The resume is held to what an uninterrupted run does without running one: the restored head + optimizer hash
    to the digest saved at step 6, every step read the store's batch (step, rank) — a pure function of the step,
    so an uninterrupted run's batch —, the schedule went on from step 6, and step 7's logged loss is recomputed
    from the step-6 checkpoint on that batch and its chains."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from draftalign.config import load_config
    from learner.fspad_distill import run_fspad

    cfg = load_config(fspad_run.job, ["draft.kind=fspad"])  # the job as `draftalign run` read it
    done, out = fspad_run.done, cfg.run_path.resolve() / "draft_fspad"
    assert done["draft"] == str(out) and done["steps"] == 6 and done["resumed_from_step"] == 0
    head = FSPADHead.load(out, target)  # the exported head loads on its target
    assert head.vocab.ids is not None  # the job's draft vocabulary travelled with it
    assert done["heldout_positions"] > 0
    assert done["sampled_frac"] > 0  # feature sampling is on by default and re-drew tokens
    assert json.loads((cfg.run_path / "fspad_features" / "meta.json").read_text())["num_rows"] > 0  # the store
    from actors.feature_store import load_heldout  # the held-out batch is kept with the store: no target on resume

    saved = torch.load(cfg.run_path / "fspad_features" / "heldout.pt", weights_only=False)
    assert saved["batch"].n_tokens == done["heldout_positions"]
    assert load_heldout(cfg.run_path / "fspad_features", saved["fingerprint"]) is not None
    assert load_heldout(cfg.run_path / "fspad_features", "other rows") is None
    log = [json.loads(line) for line in (cfg.run_path / "fspad_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [("unrolled_acceptance" in r) for r in log] == [False] * 4 + [True] * 2  # the training-time test's steps
    # the reported held-out figures are what the exported head gives on the stored held-out batch, recomputed here
    from learner.fspad_distill import evaluate_heldout

    recomputed = evaluate_heldout(head, saved["batch"], cfg, torch.device("cpu"))
    for key in ("heldout_acceptance", "heldout_greedy_acceptance", "heldout_acceptance_2",
                "heldout_greedy_acceptance_2", "heldout_acceptance_3", "heldout_greedy_acceptance_3"):
        assert math.isclose(recomputed[key], done[key], abs_tol=1e-5), (key, recomputed[key], done[key])
    assert log[-1]["feature_loss"] < log[0]["feature_loss"], [r["feature_loss"] for r in log]
    acc = EventAccumulator(str(cfg.run_path / "tensorboard" / "fspad"))
    acc.Reload()
    assert {"train/loss", "train/feature_loss", "train/logit_loss", "train/acceptance",
            "heldout/heldout_acceptance"} <= set(acc.Tags()["scalars"])

    cfg.draft.fspad.on_policy, cfg.learner.max_steps = True, 8  # on-policy chains, scored by the stored actor's target
    run_fspad(cfg, resume=True)
    again = json.loads((cfg.run_path / "fspad_done.json").read_text())
    assert again["resumed_from_step"] == 6 and again["steps"] == 8 and again["fspad"]["on_policy"] is True
    log = [json.loads(line) for line in (cfg.run_path / "fspad_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))  # continued after step 6, nothing repeated
    assert all(0 < r["rollout_frac"] < 1 and "unrolled_acceptance" in r for r in log[6:]), log[6:]
    assert not any("rollout_frac" in r for r in log[:6])
    from learner.trainer import STATE_FILE, lr_factor

    ckpt = next((cfg.run_path / "ray_results" / "fspad").glob("checkpoint_step_00000006_*"))
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert log[6]["restored_digest"] == state["state_digest"] == log[5]["state_digest"]  # the state at step 6, exactly
    assert "restored_digest" not in log[7]
    # the schedule went on from step 6, no new warm-up: step 7 at the restored optimizer's lr, step 8 at the
    # 8-step schedule's step 7 (the scheduler's restored count + 1)
    lc = cfg.learner
    assert log[6]["lr"] == state["optimizer"]["param_groups"][0]["lr"]
    assert math.isclose(log[7]["lr"], lc.lr * lr_factor(7, lc.warmup_steps, 8, lc.min_lr_ratio), rel_tol=1e-9)

    # what an uninterrupted run reads: batch (step, rank) of the store, recomputed here from the same store and rows
    from transformers import DynamicCache

    from actors.feature_store import StoredFeatures
    from actors.features import batch_seed
    from learner.distill import load_split
    from learner.fspad_distill import head_loss, sample_chains, unrolled_steps
    from learner.losses import BaselineState
    from learner.trainer import BatchDigest

    threads = torch.get_num_threads()
    try:
        rows = load_split(cfg.run_path, cfg.target.max_model_len, 0)[0]
        store = StoredFeatures(str(cfg.run_path / "fspad_features"), rows, cfg.rollout.batch_size,
                               cfg.draft.fspad.feature_sampling, cfg.seed,
                               scoring=(tiny_target_path, cfg.target.dtype, threads))
        want = []
        for s in range(8):
            d = BatchDigest()
            d.update(store.batch(s, 0, 1).input_ids.numpy())
            want.append(d.take(1))
        assert [r["batch_digest"] for r in log] == want  # the same rows, the same re-drawn tokens, in step order
        # step 7 as the worker ran it: the step-6 head draws its chains (seeded by the step), the store's target
        # scores them, and the loss of chain steps 1 … 3 on them (with the checkpoint's TVD++ baseline state)
        fb = store.batch(6, 0, 1)
        restored = FSPADHead.load(ckpt, target)
        gen = torch.Generator().manual_seed(batch_seed(cfg.seed + 1, 6, 0))
        chains = sample_chains(restored, fb, 3, cfg.rollout.temperature, gen)
        assert chains.valid.any()
        chains = chains.scored(store.score_branches(6, 0, 1, chains.requests()))
        baseline = BaselineState(**state["baseline_state"])
        with torch.no_grad():
            cache = DynamicCache()
            per_pos, _, _, f_hat = head_loss(restored, restored, fb, cfg, baseline, cache)
            deep = unrolled_steps(restored, fb, f_hat, cache, 3, cfg, baseline, chains)
    finally:
        torch.set_num_threads(threads)
    all_pos = torch.cat([per_pos] + [st.loss for st in deep])
    assert [st.k for st in deep] == [2, 3]
    assert math.isclose(float(all_pos.sum()) / all_pos.shape[0], log[6]["loss"], rel_tol=1e-5), (
        float(all_pos.sum()) / all_pos.shape[0], log[6]["loss"])


# ------------------------------------------------------------------------------ on-policy chains

def test_branch_features_are_the_targets_own_chains(target):
    """The target's side of on-policy chains: chain (c, [x_1 … x_m]) of a row gives, for each x_i, the feature of
    a cache-free forward of s_≤c + x_1 … x_i and the top-k of its next token — ragged rows, rows without chains,
    several chains per row in one tree pass."""
    from actors.features import branch_features

    rows = _rows(3, seed=11, k=5, target=target)
    seqs = [r["prompt_token_ids"] + r["response_token_ids"] for r in rows]
    branches = [[(2, [101, 102]), (len(seqs[0]) - 1, [103, 104])], [], [(len(rows[2]["prompt_token_ids"]), [105, 7])]]
    out = branch_features(target, rows, branches, k=5)
    for s, row, (g, ids, lps) in zip(seqs, branches, out, strict=True):
        assert g.shape[0] == ids.shape[0] == lps.shape[0] == sum(len(xs) for _, xs in row)
        n = 0
        for c, xs in row:
            for i in range(1, len(xs) + 1):
                branch = s[:c + 1] + xs[:i]
                torch.testing.assert_close(g[n], _features(target, branch)[-1], rtol=1e-4, atol=1e-4)
                with torch.no_grad():
                    want = torch.topk(torch.log_softmax(target(torch.tensor([branch])).logits[0, -1].float(), -1), 5)
                assert ids[n].tolist() == want.indices.tolist()
                torch.testing.assert_close(lps[n], want.values, rtol=1e-4, atol=1e-4)
                n += 1
    with pytest.raises(ValueError, match="length"):
        branch_features(target, rows, [[(len(seqs[0]), [5])], [], []], k=5)


def test_greedy_chains_are_the_proposers_chains(target):
    """sample_chains at T = 0 drafts from every base node d exactly as the engine's proposer
    (`serve.fspad_proposer.draft_chain`, an independent cache-per-prompt implementation) drafts after s_≤d + s_{d+1}."""
    from learner.fspad_distill import sample_chains
    from serve.fspad_proposer import draft_chain

    rows = _rows(2, seed=12, prompt=(3, 7), k=6, target=target)
    fb = feature_batch(target, rows, k=6, feature_sampling=True, generator=torch.Generator().manual_seed(2))
    head = FSPADHead.from_target(target, seed=3).eval()
    chains = sample_chains(head, fb, 3, temperature=0.0)
    assert chains.tokens.shape[-1] == 2 and chains.valid.any()
    for b, r in enumerate(rows):
        s = r["prompt_token_ids"] + r["response_token_ids"]
        F = _features(target, s)
        for j in chains.valid[b].nonzero()[:, 0].tolist():
            d = chains.lo + j
            ids, _ = draft_chain(head, F[:d + 1], s[:d + 1], s[d + 1], 2)
            assert chains.tokens[b, j].tolist() == ids.tolist(), (b, d)
    drawn = sample_chains(head, fb, 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    again = sample_chains(head, fb, 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn.tokens, again.tokens) and not torch.equal(drawn.tokens, chains.tokens)


def test_on_policy_unrolled_steps_read_the_heads_tokens_and_the_targets_scores(target):
    """On-policy training-time test: step k of base d equals a cache-free chain — data nodes ≤ d, then nodes
    (f̂^{j−1}, x_{j−1}) on the head's own tokens — and its targets are the target's on that chain: the feature
    after x_{k−1} and the top-k of the token after it (a cache-free target forward over s_≤d+1 + x_1 … x_{k−1})."""
    from transformers import DynamicCache

    from actors.features import branch_features
    from draftalign.config import JobConfig
    from learner.fspad_distill import head_loss, sample_chains, unrolled_steps

    cfg = JobConfig.model_validate({"draft": {"kind": "fspad", "fspad": {"on_policy": True}},
                                    "distill": {"loss": "fkl"}})
    rows = _rows(2, seed=13, prompt=(3, 7), k=6, target=target)
    fb = feature_batch(target, rows, k=6)
    head = FSPADHead.from_target(target, seed=4).eval()
    chains = sample_chains(head, fb, 3, temperature=1.0, generator=torch.Generator().manual_seed(5))
    chains = chains.scored(branch_features(target, rows, chains.requests(), k=6))
    with torch.no_grad():
        cache = DynamicCache()
        _, _, _, f_hat = head_loss(head, head, fb, cfg, None, cache)
        steps = unrolled_steps(head, fb, f_hat, cache, 3, cfg, None, chains)
    assert [st.k for st in steps] == [2, 3]
    for st in steps:
        want_logits, want_ids = [], []
        for b, r in enumerate(rows):
            s = r["prompt_token_ids"] + r["response_token_ids"]
            for j in chains.valid[b].nonzero()[:, 0].tolist():
                d, xs = chains.lo + j, chains.tokens[b, j].tolist()
                feats, ids = fb.features[b, :d + 1], fb.input_ids[b, :d + 1]
                with torch.no_grad():
                    for i in range(1, st.k + 1):
                        out = head(feats[None], ids[None], torch.arange(d + i)[None])[0, -1]
                        if i < st.k:
                            feats, ids = torch.cat([feats, out[None]]), torch.cat([ids, torch.tensor([xs[i - 1]])])
                    want_logits.append(head.logits(out))
                    branch = s[:d + 2] + xs[:st.k - 1]
                    want_ids.append(torch.topk(target(torch.tensor([branch])).logits[0, -1], 6).indices)
        assert len(want_logits) == st.logits.shape[0] == int(chains.valid.sum()) > 0
        torch.testing.assert_close(st.logits, torch.stack(want_logits), rtol=1e-4, atol=1e-4)
        assert torch.equal(st.target_ids, torch.stack(want_ids))
        assert torch.isfinite(st.loss).all()
    with pytest.raises(Exception, match="unroll"):
        JobConfig.model_validate({"draft": {"kind": "fspad", "fspad": {"on_policy": True, "unroll": 1}}})


def test_feature_store_auto_stores_only_under_the_size_cap():
    """draft.fspad.feature_store=auto (the default): the store's estimated size 2·W·T + 8·k·A decides — stored at
    or below draft.fspad.max_store_gib, streamed above; true / false are obeyed whatever the size."""
    from actors.feature_store import store_bytes, use_store
    from draftalign.config import load_config

    rows = [{"prompt_token_ids": [1] * 30, "response_token_ids": [2] * 70}] * 4  # T = 400, A = 280
    assert store_bytes(400, 280, 576, 20) == 2 * 576 * 400 + 8 * 20 * 280
    size = store_bytes(400, 280, 3 * 576, 20)  # EAGLE-3: three fused layers
    for mode, cap_gib, stored in (("auto", size / 2**30, True), ("auto", 0.99 * size / 2**30, False),
                                  ("true", 1e-9, True), ("false", 1e3, False)):
        cfg = load_config(None, [f"draft.fspad.feature_store={mode}", f"draft.fspad.max_store_gib={cap_gib}",
                                 "target.top_k_logprobs=20"])
        assert use_store(cfg, rows, 3 * 576) == (stored, size), (mode, cap_gib)
    assert load_config(None, []).draft.fspad.feature_store == "auto"
