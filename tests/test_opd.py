"""Target-assisted on-policy rollouts (`rollout.on_policy_mode: target_assisted`, actors/assisted.py; issue #38).

- the record → row conversion (`actors.traffic.drafted_rows`) on hand-written rounds;
- with real Ray actors and a real vLLM target: every round's record checked against an independent recomputation —
  the target's top-k at the proposed positions from transformers, the draft's log q(x) from transformers, and the
  accept test replayed by hand from the recorded probabilities and uniforms (the greedy rule at T = 0); at T = 0 the
  continuation is the target's own greedy continuation;
- a short stage-3 run in this mode with the Ray Train learner: it trains, reports held-out acceptance, throughput
  per actor and per engine and its bottleneck, and resumes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distill_helpers import TOP_K, distill_log, done, job_fixture, peaked_target_fixture  # noqa: F401 - fixtures

from actors.rollout import build_batch
from actors.traffic import drafted_rows, round_record
from learner.distill import batch_tensors

LP_ATOL = 2e-3  # fp32 vLLM vs fp32 transformers log-probs (measured ≈ 1e-5 in tests/test_target.py)


def _topk(ids, lps):
    return {"ids": np.asarray(ids, np.int64), "logprobs": np.log(np.asarray(lps, np.float32))}


def test_drafted_rows_train_at_the_proposals():
    """Two chained rounds (γ = 3) and a re-draft: the chained row is the committed text, its loss sits at the
    accepted proposals and the rejected one (labelled by the proposal, not the recovered token), never at the bonus
    position; the re-draft is its own row, trained at all γ proposals."""
    k = 2
    t1 = _topk([[11, 1], [12, 1], [99, 13], [1, 2]], [[.6, .2]] * 4)  # γ + 1 rows
    t2 = _topk([[14, 1], [15, 1], [16, 1], [17, 1]], [[.7, .1]] * 4)
    ctx = [5, 6, 7]
    r1 = round_record("a.0", ctx, [11, 12, 13], [-.1, -.2, -.3], t1["ids"], t1["logprobs"], [11, 12, 99], 2, 4, 1.0,
                      kind="round")
    r2 = round_record("a.0", ctx + [11, 12, 99], [14, 15, 16], [-.4, -.5, -.6], t2["ids"], t2["logprobs"],
                      [14, 15, 16, 17], 3, 4, 1.0, kind="round")
    rd = round_record("a.0.r0", ctx + [11, 12], [20, 21, 22], [-.7, -.8, -.9], t1["ids"], t1["logprobs"], [20], 0, 4,
                      1.0, kind="redraft", parent="a.0")
    rows = drafted_rows([r1, r2, rd])
    assert rows["requests"] == ["a.0", "a.0"] and rows["prompts"] == [ctx, ctx + [11, 12]]
    assert rows["responses"][0] == [11, 12, 99, 14, 15, 16, 17]  # the committed (target's) text
    assert rows["loss_masks"][0].tolist() == [True, True, True, True, True, True, False]  # no bonus position
    assert rows["sampled"][0][:6] == [11, 12, 13, 14, 15, 16]  # the rejected proposal 13, not the recovered 99
    np.testing.assert_allclose(rows["draft_logprobs"][0][:6], [-.1, -.2, -.3, -.4, -.5, -.6], rtol=1e-6)
    np.testing.assert_array_equal(rows["scores"][0]["ids"][:3], t1["ids"][:3])
    np.testing.assert_array_equal(rows["scores"][0]["ids"][3:], t2["ids"])
    assert rows["responses"][1] == [20, 21, 22] and rows["loss_masks"][1] is None
    np.testing.assert_array_equal(rows["scores"][1]["ids"], t1["ids"][:3])

    batch = build_batch(rows["prompts"], rows["responses"], rows["scores"], pad_id=0, on_policy=[True, True],
                        draft_logprobs=rows["draft_logprobs"], loss_masks=rows["loss_masks"], sampled=rows["sampled"])
    bt = batch_tensors(batch, "cpu")
    assert bt["tokens"].tolist() == [11, 12, 13, 14, 15, 16, 20, 21, 22]  # the sampled-form TVD++ labels
    assert batch.n_tokens == 9 and bt["target_ids"].shape == (9, k)


# ---------------------------------------------------------------------------------- Ray + vLLM

@pytest.fixture(scope="module")
def ray_local():
    from draftalign.runtime import configure_vllm_env, init_ray

    configure_vllm_env(1.0, threads=1)
    ray = init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


def calibrated_draft(target_path: str, prompts: list[list[int]], tok, dest, steps: int = 16) -> str:
    """A draft that agrees with the target on about half of the rollout's states, saved at `dest`.

    The peaked tiny target's greedy text is one token repeated (t*, every prompt: a random Llama's argmax barely
    depends on the context), so the draft is the target with an untied head whose row t* is scaled by c = the
    median over those states of max_{j ≠ t*} z_j / z_t*: the draft proposes t* on about half of them and another
    token on the rest, and at T = 0 and T = 1 both outcomes of the accept test occur."""
    from draftalign.models import load_causal_lm, save_pretrained_atomic

    lm = load_causal_lm(target_path)
    with torch.no_grad():
        path = prompts[0] + [int(lm(torch.tensor([prompts[0]])).logits[0, -1].argmax())] * steps
        star = path[-1]
        ratios = []
        for p in prompts:
            z = lm(torch.tensor([p + [star] * steps])).logits[0, len(p) - 1:].float()  # (steps + 1, V)
            assert (z.argmax(-1) == star).all(), "the target's greedy text is not one token repeated"
            other = z.clone()
            other[:, star] = float("-inf")
            ratios.append(other.max(-1).values / z[:, star])
        c = float(torch.cat(ratios).median())
        lm.config.tie_word_embeddings = False
        lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
        lm.lm_head.weight[star] *= c
    return str(save_pretrained_atomic(lm, tok, dest))


def _hf_topk(hf, seq: list[int], start: int, n: int, k: int):
    """transformers: the target's top-k (ids, log-probs) at the n positions predicting seq[start:start + n]."""
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)[start - 1: start - 1 + n]  # (n, V)
    return lp


def _check_records(records, hf_target, hf_draft, temperature: float, redraft_temperature: float, eos: int):
    """Every record against transformers and the accept rule replayed by hand; returns (accepted, rejections)."""
    acc = rej = 0
    for r in records:
        ctx, x = list(r["context"]), list(r["draft_tokens"])
        g = len(x)
        T = temperature if r["kind"] == "round" else redraft_temperature
        assert r["temperature"] == T
        # the target's top-k at the γ + 1 positions: c + x (+ a filler) through transformers
        lp = _hf_topk(hf_target, ctx + x + [0], len(ctx), g + 1, TOP_K)  # (γ+1, V)
        ids, lps = np.asarray(r["target_ids"]), np.asarray(r["target_logprobs"])
        assert ids.shape == (g + 1, TOP_K)
        np.testing.assert_allclose(lps, lp.gather(-1, torch.tensor(ids, dtype=torch.long)).numpy(), atol=LP_ATOL)
        kth = lp.topk(TOP_K + 1, -1).values.numpy()  # the recorded ids are a top-k: nothing else beats them
        assert (lps[:, -1] >= kth[:, TOP_K] - LP_ATOL).all()
        # the draft's log q(x_i) at the record's temperature (greedy: log 1 = 0)
        with torch.no_grad():
            z = hf_draft(torch.tensor([ctx + x])).logits[0, len(ctx) - 1: len(ctx) - 1 + g].float()  # (γ, V)
        if T == 0:  # (the argmax itself is not compared: the calibrated draft sits near ties by design)
            assert np.allclose(r["draft_logprobs"], 0)
        else:
            ref = torch.log_softmax(z / T, -1).gather(-1, torch.tensor(x)[:, None])[:, 0].numpy()
            np.testing.assert_allclose(r["draft_logprobs"], ref, atol=LP_ATOL)
        # the accept test, by hand
        kappa = r["num_accepted"]
        if T == 0:
            argmax = ids[np.arange(g + 1), lps.argmax(-1)]
            want = next((i for i in range(g) if x[i] != argmax[i]), g)
            assert kappa == want and list(r["committed"][:kappa + 1]) == (x[:kappa] + [int(argmax[kappa])])[
                :len(r["committed"])]
        else:
            w = np.exp(lps.astype(np.float64) / T)
            w /= w.sum(-1, keepdims=True)  # p̃: the top-k renormalised, tempered
            p_x = [float(w[i][ids[i] == x[i]].sum()) for i in range(g)]
            q_x = np.exp(np.asarray(r["draft_logprobs"], np.float64))
            u = np.asarray(r["uniforms"])
            accept = [u[i] * q_x[i] < p_x[i] for i in range(g)]
            want = next((i for i in range(g) if not accept[i]), g)
            assert kappa == want, (accept, u, q_x, p_x)
            assert list(r["committed"][:kappa]) == x[:kappa][:len(r["committed"])]
            if len(r["committed"]) > kappa:  # the recovered / bonus token lies where p̃ > 0
                assert int(r["committed"][kappa]) in set(ids[kappa].tolist())
        if r["kind"] == "round":
            acc += kappa
            rej += kappa < g
            assert eos not in list(r["committed"][:-1])
    return acc, rej


@pytest.mark.slow
def test_rounds_match_an_independent_recomputation(ray_local, job, peaked_target, target_tokenizer, tmp_path):
    """Real AssistedRolloutActor + real vLLM TargetActor, T = 0 and T = 1 on the same engine."""
    from transformers import AutoModelForCausalLM

    from actors.assisted import AssistedRolloutActor
    from actors.target import create_target_actors, shutdown_target_actors
    from learner.distill import load_split

    ray = ray_local
    cfg = job("records")
    rows, _ = load_split(cfg.run_path, cfg.target.max_model_len, 16)
    prompts = [r["prompt_token_ids"] for r in rows[:4]]
    close_draft = calibrated_draft(peaked_target, prompts, target_tokenizer, tmp_path / "draft")
    hf_target = AutoModelForCausalLM.from_pretrained(peaked_target, dtype=torch.float32).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(close_draft, dtype=torch.float32).eval()
    eos = target_tokenizer.eos_token_id
    [engine] = create_target_actors(cfg, peaked_target)
    try:
        for T in (0.0, 1.0):
            actor = AssistedRolloutActor.options(num_cpus=0).remote(
                0, close_draft, rows, [engine], None, None, on_policy_fraction=1.0, temperature=T, max_new_tokens=16,
                batch_size=4, top_k=TOP_K, seed=3, max_model_len=cfg.target.max_model_len, gamma=3,
                redrafts_per_sequence=2, redraft_temperature=1.0)
            new, records, target_s = ray.get(actor.rollout.remote(prompts, "t"))
            stats = ray.get(actor.stats.remote())
            ray.kill(actor)
            rounds = [r for r in records if r["kind"] == "round"]
            redrafts = [r for r in records if r["kind"] == "redraft"]
            acc, rej = _check_records(records, hf_target, hf_draft, T, 1.0, eos)
            assert acc > 0 and rej > 0, (T, acc, rej)  # both branches of the rule were exercised
            assert redrafts and stats["redrafts"] == len(redrafts) and stats["rounds"] > 0 and target_s > 0
            for s, p in enumerate(prompts):  # the rounds chain: each context = the previous + what it committed
                mine = [r for r in rounds if r["request"] == f"t.{s}"]
                assert list(mine[0]["context"]) == p
                for a, b in zip(mine, mine[1:]):
                    assert list(b["context"]) == list(a["context"]) + list(a["committed"])
                assert list(mine[-1]["context"]) + list(mine[-1]["committed"]) == p + new[s]
            for r in redrafts:  # from the rejection point: the parent's context + its accepted proposals
                parent = next(p for p in rounds if p["request"] == r["parent"] and
                              list(r["context"]) == list(p["context"]) + list(p["draft_tokens"][:p["num_accepted"]]))
                assert parent["num_accepted"] < 3
            if T == 0:  # the continuation is the target's own greedy continuation
                ref = ray.get(engine.generate.remote(prompts, temperature=0.0, max_tokens=16))
                assert new == [a[0]["token_ids"] for a in ref]
            print(f"T={T}: {len(rounds)} rounds, {acc} accepted, {rej} rejections, {len(redrafts)} re-drafts")
        _check_stored_greedy_rounds(ray, engine, prompts, rows, close_draft, hf_draft, eos, cfg)
    finally:
        shutdown_target_actors([engine])


def _check_stored_greedy_rounds(ray, engine, prompts, rows, draft, hf_draft, eos, cfg):
    """T = 0 on a greedy set with the target's top-k (`stored_greedy`): the rounds are read off the stored answers
    with no engine call (only the re-drafts are scored), and they decode what vLLM's greedy decoding does."""
    from actors.assisted import AssistedRolloutWorker

    answers = ray.get(engine.generate.remote(prompts, temperature=0.0, max_tokens=24, logprobs=TOP_K))
    stored = [{**r, "response_token_ids": a[0]["token_ids"], "target_ids": a[0]["target_ids"],
               "target_logprobs": a[0]["target_logprobs"]} for r, a in zip(rows[:len(prompts)], answers, strict=True)]
    worker = AssistedRolloutWorker(  # in this process (no actor start-up); the engine is the same actor
        0, draft, stored, [engine], None, None, on_policy_fraction=1.0, temperature=0.0, max_new_tokens=16,
        batch_size=4, top_k=TOP_K, seed=3, max_model_len=cfg.target.max_model_len, gamma=3,
        redrafts_per_sequence=2, redraft_temperature=1.0, stored_greedy=True)
    new, records, target_s = worker.rollout(prompts, "s", stored)
    stats = worker.stats()
    assert stats["rounds"] == 0 and stats["stored_rounds"] > 0 and stats["redrafts"] > 0 and target_s > 0, stats
    assert new == [a[0]["token_ids"][:16] for a in answers]  # vLLM's greedy continuation, as the engine path's
    for s, r in enumerate(stored):
        mine = [x for x in records if x["kind"] == "round" and x["request"] == f"s.{s}"]
        R = list(r["response_token_ids"])
        for x in mine:
            n, out, kappa, tested = len(x["context"]) - len(prompts[s]), list(x["committed"]), x["num_accepted"], \
                list(x["draft_tokens"])
            assert x["scored"] == "stored" and out == R[n:n + len(out)]
            np.testing.assert_array_equal(x["target_ids"], r["target_ids"][n:n + len(out)])
            assert tested[:kappa] == R[n:n + kappa] and (len(tested) == kappa or tested[kappa] != R[n + kappa])
            with torch.no_grad():  # each tested proposal is the draft's argmax there (up to float ties)
                z = hf_draft(torch.tensor([list(x["context"]) + tested])).logits[0, -len(tested) - 1:-1].float()
            picked = z.gather(-1, torch.tensor(tested)[:, None])[:, 0]
            assert (picked >= z.max(-1).values - 1e-3).all()
    for x in records:
        if x["kind"] == "redraft":  # the engine scored these: γ + 1 rows from a rejection point on the stored text
            assert np.asarray(x["target_ids"]).shape == (4, TOP_K)


@pytest.mark.slow
def test_target_assisted_distill_trains_and_reports(ray_local, job):
    """Stage 3 in target_assisted mode (3 of 4 picks on-policy, sampled TVD++) with the Ray Train learner. (Resume is
    the stage's, proven on state in tests/test_distill.py; a second run here cost the suite a minute.)"""
    from learner.distill import run_distill

    cfg = job("opd", rollout__on_policy_mode="target_assisted", rollout__on_policy_fraction=0.75,
              rollout__max_new_tokens=8, rollout__gamma=3, distill__form="sampled", learner__max_steps=6,
              learner__checkpoint_every=6)
    run_distill(cfg)
    d = done(cfg)
    assert d["steps"] == 6 and math.isfinite(d["loss"]) and d["heldout_acceptance"] is not None, d
    assert d["rollout_tokens_per_s_per_actor"]["actor_0"] > 0
    assert d["target_tokens_per_s_per_engine"]["engine_0"] > 0 and d["target_tokens_scored_for_rollouts"]
    assert d["bottleneck"] in ("rollout", "target", "learner") and "actor_0" in d["rollout_time_split"], d
    log = distill_log(cfg)
    assert any(r["on_policy_frac"] > 0 for r in log) and any("target_tokens_per_s/engine_0" in r for r in log)
    assert all(math.isfinite(r["loss"]) for r in log)



@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_cache_across_rounds_equals_drafting_from_scratch(tiny_draft_path, temperature):
    """`DraftCache` (one KV cache over a batch's rounds, rejected proposals masked as holes) proposes what `propose`
    (the whole context re-encoded every round) does: the same greedy tokens, q within float tolerance — over
    rounds with every outcome (κ = 0, a middle one, all γ plus the bonus) and rows finishing at different rounds."""
    from transformers import AutoModelForCausalLM

    from actors.assisted import DraftCache, propose
    from draftalign.sampling import SamplingParams

    draft = AutoModelForCausalLM.from_pretrained(tiny_draft_path, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    ctx = [rng.integers(5, 1000, n).tolist() for n in (7, 3, 12, 5)]
    params, g = SamplingParams(temperature=temperature), 3
    cache = DraftCache(draft, ctx, pad_id=0)
    live = [0, 1, 2, 3]
    for rnd in range(6):
        x, q, lq = cache.propose(live, g, params, None, torch.Generator().manual_seed(rnd))
        x0, q0, lq0 = propose(draft, [ctx[s] for s in live], g, params, 0, None, torch.Generator().manual_seed(rnd))
        assert torch.equal(x, x0), rnd
        torch.testing.assert_close(q, q0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lq, lq0, atol=1e-4, rtol=1e-4)
        kappas = [(rnd + j) % (g + 1) for j in range(len(live))]  # 0 … γ: every outcome
        committed = [x[j, :k].tolist() + [int(rng.integers(5, 1000))] for j, k in enumerate(kappas)]
        cache.commit(committed, kappas)
        for j, s in enumerate(live):
            ctx[s] += committed[j]
        live = [s for s in live if not (s == 1 and rnd == 1) and not (s == 3 and rnd == 3)]  # rows finish


def test_concurrent_score_requests_are_batched_into_one_engine_call():
    """`actors.target._Coalescer` (a target engine actor with max_concurrency > 1): requests that arrive while a call
    runs wait and then go as ONE call; each caller gets its own answer; an error reaches every caller of its call."""
    import threading
    import time

    from actors.target import _Coalescer

    calls: list[int] = []

    def engine(requests):  # stands in for the vLLM call's latency only; the answers are a pure function of the input
        calls.append(len(requests))
        time.sleep(0.3)
        if any(r == "bad" for r in requests):
            raise ValueError("bad request")
        return [r * 2 for r in requests]

    c = _Coalescer(engine)
    out: dict[int, object] = {}

    def call(i, r):
        try:
            out[i] = c.run(r)
        except ValueError as e:
            out[i] = e

    first = threading.Thread(target=call, args=(0, 1))
    first.start()
    time.sleep(0.1)  # the first call is running: the next three wait for it, then go together
    rest = [threading.Thread(target=call, args=(i, i + 1)) for i in range(1, 4)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join(10)
    assert out == {0: 2, 1: 4, 2: 6, 3: 8} and calls == [1, 3], (out, calls)

    calls.clear()
    ts = [threading.Thread(target=call, args=(i, r)) for i, r in ((10, "bad"), (11, 5))]
    ts[0].start()
    time.sleep(0.1)
    ts[1].start()
    for t in ts:
        t.join(10)
    assert isinstance(out[10], ValueError) and out[11] == 10 and calls == [1, 1]
