"""Stage 3 (distill): rollout actors, weight sync, bounded queue, and end-to-end runs with real Ray,
a real vLLM TargetActor and a real Ray Train learner on tiny models.

The stand-in target (a peaked tiny Llama), the distillation set and the job config come from
tests/distill_helpers.py, shared with tests/test_faults.py.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch
from distill_helpers import TOP_K, distill_log, job_fixture, peaked_target_fixture  # noqa: F401 - fixtures
from distill_helpers import done as _done

from actors.rollout import RolloutBatch, TargetPool, WeightStore, build_batch
from draftalign.weights import check_and_load_weights
from learner.distill import ResponseLogits, batch_tensors, distill_loss
from learner.heldout import split_heldout

# ------------------------------------------------------------------------------ pure functions

def _scores(responses, k=TOP_K, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for r in responses:
        lp = np.log(rng.dirichlet(np.ones(k + 1), size=len(r))[:, :k]).astype(np.float32)
        out.append({"ids": np.stack([rng.choice(1000, k, replace=False) for _ in r]), "logprobs": lp})
    return out


def test_build_batch_aligns_target_rows_with_response_positions():
    prompts, responses = [[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 11, 12, 2]]
    scores = _scores(responses)
    b = build_batch(prompts, responses, scores, pad_id=2, on_policy=[True, False],
                    draft_logprobs=[[-1.0, -2.0, -3.0], None], policy_version=3, actor_id=1)
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 10, 11, 12, 2]]
    assert b.loss_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert b.n_tokens == 7 and b.policy_version == 3 and b.on_policy.tolist() == [True, False]
    np.testing.assert_array_equal(b.target_ids[0, 3:], scores[0]["ids"])  # row t predicts token t
    np.testing.assert_array_equal(b.target_logprobs[1, 2:], scores[1]["logprobs"])
    assert b.draft_logprobs[0, 3:].tolist() == [-1.0, -2.0, -3.0] and not b.draft_logprobs[1].any()
    # an engine listing more entries for one row: every row keeps the common top columns
    wide = [dict(scores[0]), {"ids": np.concatenate([scores[1]["ids"]] * 2, 1),
                              "logprobs": np.concatenate([scores[1]["logprobs"]] * 2, 1)}]
    assert build_batch(prompts, responses, wide, pad_id=2).target_ids.shape == (2, 6, TOP_K)


def test_response_logits_are_the_shifted_full_logits(tiny_draft_path):
    from draftalign.models import load_causal_lm

    lm = load_causal_lm(tiny_draft_path)
    b = build_batch([[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 11, 12, 2]], _scores([[0] * 3, [0] * 4]), pad_id=2)
    bt = batch_tensors(b, "cpu")
    with torch.no_grad():
        got = ResponseLogits(lm)(bt["input_ids"], bt["attention_mask"], bt["loss_mask"])  # (N, V)
        full = lm(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits  # (B, T, V)
    assert got.shape[0] == b.n_tokens
    torch.testing.assert_close(got, full[:, :-1][bt["loss_mask"][:, 1:]])


def test_sampled_form_applies_to_on_policy_rows_only():
    from draftalign.config import DistillConfig
    from learner.losses import TargetDist, compute_loss

    torch.manual_seed(0)
    b = build_batch([[1, 5], [1, 7]], [[8, 9, 2], [10, 11, 2]], _scores([[0] * 3, [0] * 3]), pad_id=2,
                    on_policy=[True, False])
    bt = batch_tensors(b, "cpu")
    logits = torch.randn(b.n_tokens, 1000)
    dc = DistillConfig(loss="tvd_pp", form="sampled", baseline="position")
    per_pos, _ = distill_loss(logits, bt, dc, None)
    on = bt["on_policy"]
    for sel, form in ((on, "sampled"), (~on, "exact")):
        target = TargetDist(bt["target_logprobs"][sel], bt["target_ids"][sel])
        ref, _ = compute_loss("tvd_pp", logits[sel], target, sampled_tokens=bt["tokens"][sel], form=form,
                              baseline="position")
        torch.testing.assert_close(per_pos[sel], ref)


def test_replayed_rows_use_the_cached_target_distribution():
    """Rows whose distillation-set entry carries the target's top-k are not scored again; rows
    without one (or with fewer than k columns, or in full-vocabulary mode) are, in one call."""
    from actors.rollout import cached_score, score_rows

    class CountingPool:
        calls: list = []

        def score(self, seqs, starts, k):
            self.calls.append(len(seqs))
            return _scores([s[st:] for s, st in zip(seqs, starts, strict=True)], k)

    responses = [[7, 8, 2], [9, 2], [4, 5, 6, 2]]
    prompts = [[1, 3], [1, 4], [1, 5]]
    cache = _scores(responses, k=TOP_K + 2, seed=1)
    rows = [{"target_ids": cache[0]["ids"], "target_logprobs": cache[0]["logprobs"]},
            {"target_ids": None, "target_logprobs": None},
            {"target_ids": cache[2]["ids"][:, :2], "target_logprobs": cache[2]["logprobs"][:, :2]}]
    assert cached_score(rows[0], -1) is None and cached_score(rows[1], TOP_K) is None
    assert cached_score(rows[2], TOP_K) is None  # only 2 columns cached
    pool = CountingPool()
    scores, n = score_rows(pool, prompts, responses, [cached_score(r, TOP_K) for r in rows], TOP_K)
    assert n == 2 and pool.calls == [2]
    np.testing.assert_array_equal(scores[0]["ids"], cache[0]["ids"][:, :TOP_K])
    np.testing.assert_array_equal(scores[0]["logprobs"], cache[0]["logprobs"][:, :TOP_K])
    assert [s["logprobs"].shape for s in scores] == [(3, TOP_K), (2, TOP_K), (4, TOP_K)]
    build_batch(prompts, responses, scores, pad_id=0)  # well-formed for the learner


def test_heldout_split_is_stable_and_disjoint():
    rows = [{"prompt_id": f"p{i}", "prompt_token_ids": [1], "response_token_ids": [2]} for i in range(50)]
    rows += [{"prompt_id": f"p{i}", "prompt_token_ids": [1], "response_token_ids": [3]} for i in range(50)]
    train, held = split_heldout(rows)
    held_ids = {r["prompt_id"] for r in held}
    assert len(held_ids) == 5 and len(held) == 10  # 10% of the prompts, every response of each
    assert held_ids.isdisjoint({r["prompt_id"] for r in train}) and len(train) + len(held) == len(rows)
    assert {r["prompt_id"] for r in split_heldout(rows[::-1])[1]} == held_ids


def test_weights_are_checked_on_receipt(tiny_draft_path):
    from draftalign.models import load_causal_lm

    lm = load_causal_lm(tiny_draft_path)
    w = {k: v.detach().numpy() + 1.0 for k, v in lm.state_dict().items()}
    check_and_load_weights(lm, w)
    name = next(iter(w))
    assert torch.equal(lm.state_dict()[name], torch.from_numpy(w[name]))
    with pytest.raises(ValueError, match="shape"):
        check_and_load_weights(lm, {**w, name: w[name][:1]})
    with pytest.raises(ValueError, match="missing"):
        check_and_load_weights(lm, {k: v for k, v in w.items() if k != name})
    with pytest.raises(ValueError, match="floating"):
        check_and_load_weights(lm, {**w, name: w[name].astype(np.int64)})


# ---------------------------------------------------------------------------------- Ray fixtures

@pytest.fixture(scope="module")
def ray_local():
    from draftalign.runtime import configure_vllm_env, init_ray

    configure_vllm_env(1.0, threads=1)
    ray = init_ray(None, num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stubs below run in workers
    yield ray
    ray.shutdown()


class _StubTarget:
    """Stands in for a TargetActor in the mechanics tests: random but well-formed top-k scores."""

    def score(self, seqs, starts, k):
        return _scores([s[st:] for s, st in zip(seqs, starts, strict=True)], k)


def test_target_pool_fails_over_to_a_live_engine(ray_local):
    ray = ray_local
    dead, live = (ray.remote(num_cpus=0)(_StubTarget).remote() for _ in range(2))
    ray.kill(dead)
    pool = TargetPool([dead, live])
    out = pool.score([[1, 2, 3]], [1], TOP_K)
    assert out[0]["logprobs"].shape == (2, TOP_K) and pool.failures >= 1
    ray.kill(live)


def test_queue_is_bounded_and_weights_flow_through_the_store(ray_local, tiny_draft_path):
    """A producer without a consumer fills the queue to maxsize and then blocks (back-pressure);
    it waits for the first published weights and picks up every newer version between batches."""
    from ray.util.queue import Queue

    from actors.rollout import RolloutActor
    from draftalign.models import load_causal_lm

    ray = ray_local
    stub = ray.remote(num_cpus=0)(_StubTarget).remote()
    queue = Queue(maxsize=2, actor_options={"num_cpus": 0})
    store = WeightStore.remote()
    rows = [{"prompt_id": f"p{i}", "prompt_token_ids": [1, 5 + i], "response_token_ids": [7, 8, 2]}
            for i in range(4)]
    actor = RolloutActor.options(num_cpus=0).remote(
        0, tiny_draft_path, rows, [stub], queue, store, on_policy_fraction=0.5, temperature=1.0,
        max_new_tokens=4, batch_size=2, top_k=TOP_K, seed=0)
    run = actor.run.remote()
    try:
        time.sleep(1.0)
        assert queue.qsize() == 0, "no batch may be produced before the learner publishes weights"
        lm = load_causal_lm(tiny_draft_path)
        weights = {k: v.detach().numpy() for k, v in lm.state_dict().items()}
        ray.get(store.publish.remote(0, weights))
        with pytest.raises(ray.exceptions.RayTaskError, match="does not increase"):
            ray.get(store.publish.remote(0, weights))
        deadline = time.time() + 60
        while queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3.0)
        assert queue.qsize() == 2, "the queue must never exceed maxsize"
        stats = ray.get(actor.stats.remote())
        assert stats["batches"] == 2 and stats["put_wait_s"] > 1.0, stats  # blocked on the full queue
        batch = queue.get(timeout=10)
        assert isinstance(batch, RolloutBatch) and batch.policy_version == 0
        ray.get(store.publish.remote(1, {k: v + 0.01 for k, v in weights.items()}))
        deadline = time.time() + 60
        while time.time() < deadline:
            b = queue.get(timeout=30)
            if b.policy_version == 1:
                break
        assert b.policy_version == 1 and ray.get(actor.stats.remote())["version"] == 1
    finally:
        ray.get(actor.stop.remote())
        ray.get(run, timeout=30)
        for h in (actor, store, stub):
            ray.kill(h)
        queue.shutdown(force=True)


# ----------------------------------------------------------------------------- end-to-end runs

@pytest.mark.slow
def test_distill_run_lowers_heldout_tvd(ray_local, job, target_tokenizer):
    from draftalign.models import load_draft
    from learner.distill import run_distill

    cfg = job("e2e")
    out = run_distill(cfg)
    done = _done(cfg)
    assert out == cfg.run_path.resolve() / "draft_distilled"
    load_draft(str(out), target_tokenizer)  # HF format, same tokenizer
    assert done["steps"] == 30 and done["consumed_batches"] == 30 and done["heldout_positions"] > 0
    assert done["heldout_acceptance"] > done["heldout_acceptance_start"] + 0.02, done
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cfg.run_path / "tensorboard" / "distill"))
    acc.Reload()
    assert {"train/loss", "train/acceptance", "heldout/heldout_acceptance", "system/learner_idle_frac",
            "system/queue_depth", "system/rollout_tokens_per_s", "system/dropped_batches"} <= set(
        acc.Tags()["scalars"])
    log = [json.loads(line) for line in (cfg.run_path / "distill_log.jsonl").read_text().splitlines()]
    assert {"loss", "tvd", "acceptance", "tail_mass", "reward_mean", "reward_std", "policy_lag",
            "dropped_batches", "queue_depth", "rollout_tokens_per_s", "learner_tokens_per_s",
            "learner_idle_frac"} <= set(log[-1])
    assert max(r["queue_depth"] for r in log) <= cfg.rollout.queue_size



@pytest.mark.slow
def test_branch_rollouts_train_on_short_draft_branches(ray_local, job):
    """rollout.on_policy_mode=branch end to end: every row is a draft branch of 2–4 tokens after a
    prefix of a target answer, scored by the vLLM target on the branch only, so a step trains on
    batch_size..4·batch_size on-policy tokens; the rows' draft log-probs sit on the branch positions
    (at step 1 the learner's weights are the sampling ones: policy_drift ≈ 0)."""
    from learner.distill import run_distill

    cfg = job("branch", rollout__on_policy_mode="branch", rollout__branch_tokens=[2, 4],
              rollout__on_policy_fraction=1.0, distill__form="sampled", learner__max_steps=8,
              learner__checkpoint_every=100)
    run_distill(cfg)
    assert _done(cfg)["steps"] == 8
    log = distill_log(cfg)
    assert all(r["on_policy_frac"] == 1.0 for r in log)
    per_step = np.diff([0] + [r["trained_tokens"] for r in log])
    B = cfg.rollout.batch_size
    assert ((per_step >= B) & (per_step <= 4 * B)).all(), per_step
    assert log[0]["policy_lag"] == 0 and log[0]["policy_drift"] < 0.02, log[0]
