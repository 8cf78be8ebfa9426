"""γ chosen per round by expected goodput from each request's own acceptance (`serve.goodput`): the choice itself
on hand-built costs, and the engine staying lossless while γ changes between rounds (including γ = 0 rounds that
leave the draft's cache behind): greedy output equal to HF `generate` under a cycling policy and under the real
one, ragged batches equal single requests, χ² over three tokens (and over γ + 2 in tests/test_rejections.py)."""

from __future__ import annotations

import itertools

import pytest
from specdec_helpers import chi2_p, empirical, exact_three_token_dist, hf_greedy, random_prompts, small_lm

from draftalign.sampling import SamplingParams
from serve.acceptance import expected_block_efficiency
from serve.goodput import (
    AcceptanceEstimate,
    GoodputPolicy,
    RequestGoodput,
    StepCosts,
    best_gamma,
    best_round_gamma,
    round_goodput,
)
from serve.specdec import SpecDecoder

FLAT = StepCosts(target={1: 1.0, 64: 1.0}, draft={1: 0.05, 32: 0.05})  # memory-bound: rows are free
LINEAR = StepCosts(target={1: 1.0, 64: 64.0}, draft={1: 0.05, 32: 1.6})  # compute-bound: each row costs
# fp32 on 2 CPU cores (make run's target on the EPYC): a pass over γ + 1 = 4 tokens costs v ≈ 1.4 steps
CPU = StepCosts(target={1: 1.0, 2: 1.13, 3: 1.27, 4: 1.4}, draft={1: 0.08})


def test_best_gamma_follows_the_roofline():
    # memory-bound and a good draft: draft as far as allowed; a useless draft: do not draft
    assert best_gamma(0.8, 1, 5, FLAT) == 5
    assert best_gamma(0.0, 1, 5, FLAT) == 0
    # compute-bound: verifying γ + 1 rows per sequence costs γ + 1 steps, so drafting never pays
    assert best_gamma(0.9, 8, 5, LINEAR) == 0
    # the choice is the argmax of B·E[τ]/cost over the range, computed independently here
    costs = StepCosts(target={1: 1.0, 4: 1.1, 8: 1.6, 16: 3.0, 32: 6.0}, draft={1: 0.1, 8: 0.3})
    for alpha, batch in itertools.product([0.3, 0.6, 0.9], [1, 2, 4, 8]):
        rates = [batch * expected_block_efficiency(alpha, g) /
                 (costs.target_pass(batch * (g + 1)) + g * costs.draft_step(batch)) for g in range(4)]
        assert best_gamma(alpha, batch, 3, costs) == max(range(4), key=lambda g: rates[g])
    # bigger batches push γ down on a machine whose passes grow with rows
    assert best_gamma(0.6, 1, 3, costs) >= best_gamma(0.6, 8, 3, costs)


def test_step_costs_interpolate_between_and_beyond_measurements():
    c = StepCosts(target={1: 1.0, 4: 1.3, 8: 2.1}, draft={1: 0.1})
    assert c.target_pass(1) == 1.0 and c.target_pass(4) == pytest.approx(1.3)
    assert c.target_pass(6) == pytest.approx(1.7)  # between 4 and 8
    assert c.target_pass(12) == pytest.approx(2.9)  # the last slope, extended
    assert c.draft_step(4) == pytest.approx(0.4)  # one point: proportional to the batch
    assert c.round(2, 3) == pytest.approx(c.target_pass(8) + 3 * c.draft_step(2))


def test_acceptance_estimate_moves_from_its_prior_to_recent_rounds():
    est = AcceptanceEstimate(prior=0.5, weight=8, decay=0.9)
    assert est.alpha == 0.5
    for _ in range(100):
        est.update(accepted=3, rejected=1)  # α = 3 / 4
    assert est.alpha == pytest.approx(0.75, abs=1e-3)


def test_acceptance_estimate_takes_expected_counts_and_ages_while_idle():
    est = AcceptanceEstimate(prior=0.5, weight=2, decay=0.9)
    est.update(accepted=0.3, rejected=0.7)  # one tested position whose accept test passes with probability 0.3
    assert est.alpha == pytest.approx((0.9 + 0.3) / (1.8 + 1.0))
    alpha, evidence = est.alpha, est.evidence
    for _ in range(10):
        est.age()  # a round at γ = 0 tests nothing: α̂ stays, its evidence decays
    assert est.alpha == pytest.approx(alpha) and est.evidence == pytest.approx(evidence * 0.9 ** 10)
    est.update(accepted=1.0, rejected=0.0)  # so the next tested position (a probe) weighs more than it would have
    fresh = AcceptanceEstimate(prior=0.5, weight=2, decay=0.9)
    fresh.update(0.3, 0.7)
    fresh.update(1.0, 0.0)
    assert est.alpha - alpha > fresh.alpha - alpha > 0


def test_policy_probes_after_a_run_of_target_only_rounds_and_backs_off():
    policy = GoodputPolicy(LINEAR, gamma_max=3, probe_every=4, probe_max=8)
    call = policy.begin(8)
    choices = [call.choose([True] * 8) for _ in range(4 + 8 + 8)]
    # a probe after 4 rounds at γ = 0; it left the call at γ = 0 (drafting never pays here), so the wait doubles,
    # up to probe_max
    assert choices == [0, 0, 0, 1] + [0] * 7 + [1] + [0] * 7 + [1]
    policy = GoodputPolicy(CPU, gamma_max=3, probe_every=4, probe_max=64)
    call = policy.begin(1)
    call.estimates[0] = AcceptanceEstimate(prior=0.02, weight=8)
    assert [call.choose([True]) for _ in range(4)] == [0, 0, 0, 1] and call.wait == 8
    call.observe({0: (1.0, 0.0)})
    call.observe({0: (1.0, 0.0)})
    assert call.choose([True]) > 0 and call.wait == 4  # drafting again: the next idle run probes after 4


def test_round_goodput_sums_each_request_over_the_round_cost():
    """G(γ) = Σ_s E[τ](α̂_s, γ) / (t_T(B(γ + 1)) + γ t_D(B)), computed by hand on the CPU cost model."""
    alphas = [0.1, 0.8]
    for g in range(4):
        tokens = sum((1 - a ** (g + 1)) / (1 - a) for a in alphas)
        cost = {0: 1.0, 1: 1.27 + 1 * 0.08 * 2, 2: 1.66 + 2 * 0.16, 3: 2.05 + 3 * 0.16}[g]  # rows 2, 4, 6, 8
        costs = StepCosts(target={2: 1.0, 4: 1.27, 6: 1.66, 8: 2.05}, draft={1: 0.08, 2: 0.16})
        assert round_goodput(alphas, 2, g, costs) == pytest.approx(tokens / cost)
    # the per-request sum is not B · E[τ](mean α): E[τ] is convex in α, so a batch of a request the draft knows
    # and one it does not gains more from drafting than two average requests would (a batch α̂ misses it)
    assert best_round_gamma([0.0, 0.9], 2, 3, CPU) > best_gamma(0.45, 2, 3, CPU)
    assert best_round_gamma([], 4, 3, CPU) == 0


def test_request_the_draft_does_not_know_stops_drafting_and_one_it_knows_drafts_gamma_max():
    """On the fp32 CPU cost model: α ≈ 0 (make run's code task) → γ = 0 within a few rounds; α ≈ 0.9 → γ_max."""
    policy = GoodputPolicy(CPU, gamma_max=3)
    unknown, known = policy.begin(1), policy.begin(1)
    assert unknown.choose([True]) > 0  # the prior (0.5): speculate until the request says otherwise
    played = []
    for _ in range(6):  # every drafted round rejects its first token: (accepted, rejected) = (0, 1)
        g = unknown.choose([True])
        played.append(g)
        if g:
            unknown.observe({0: (0, 1)})
    assert played[-1] == 0 and unknown.estimates[0].alpha < 0.25, played  # five failed rounds suffice
    for _ in range(6):  # 9 of every 10 tested tokens accepted
        g = known.choose([True])
        known.observe({0: (3, 0)} if g else {})
        known.observe({0: (0, 1)} if g else {})
        known.observe({0: (6, 0)} if g else {})
    assert known.choose([True]) == 3 and known.estimates[0].alpha > 0.8
    # a finished sequence no longer counts; with none live the round drafts nothing
    call = policy.begin(2)
    call.estimates[1] = AcceptanceEstimate(prior=0.95, weight=50)
    assert call.choose([False, True]) == 3 and call.choose([False, False]) == 0


def test_a_request_at_gamma_zero_probes_and_gets_speculation_back_when_the_draft_agrees():
    policy = GoodputPolicy(CPU, gamma_max=3, probe_every=4)
    call = policy.begin(1)
    call.estimates[0] = AcceptanceEstimate(prior=0.02, weight=8, decay=0.9)
    played = []
    for _ in range(24):
        g = call.choose([True])
        played.append(g)
        if g:  # the draft now agrees with every token it proposes
            call.observe({0: (g, 0)})
    # three target steps, a probe; one accepted token is not yet enough against a prior of 0.02, so the next
    # probe waits twice as long, and its success (the evidence aged meanwhile) brings speculation back
    assert played[:12] == [0, 0, 0, 1] + [0] * 7 + [1], played
    assert played[-1] == 3 and 0 not in played[12:], played


def test_new_requests_start_from_the_engine_acceptance():
    policy = GoodputPolicy(CPU, gamma_max=3)
    call = policy.begin(1)
    for _ in range(50):
        call.observe({0: (0, 1)})
    assert policy.estimate.alpha < 0.1
    fresh = policy.begin(2)
    assert all(e.alpha == pytest.approx(policy.estimate.alpha) for e in fresh.estimates)
    assert fresh.choose([True, True]) == 0  # the draft has been failing on this traffic: start without it


class _Cycle(GoodputPolicy):
    """A policy whose every call plays a fixed cycle of γ values (0 included), to exercise every transition."""

    def __init__(self, cycle, gamma_max):
        super().__init__(FLAT, gamma_max)
        self._cycle = cycle

    def begin(self, batch: int) -> RequestGoodput:
        call = super().begin(batch)
        cycle = itertools.cycle(self._cycle)
        call.choose = lambda live: next(cycle)
        return call


class _Recorded(GoodputPolicy):
    """The real policy, every call's choices recorded (calls[i] = the γ of each round of call i)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: list[list[int]] = []

    def begin(self, batch: int) -> RequestGoodput:
        call, played = super().begin(batch), []
        self.calls.append(played)
        choose = call.choose
        call.choose = lambda live: played.append(choose(live)) or played[-1]
        return call


# A cost model whose γ* moves with α̂ across 0 … 3 (each extra verified token costs 0.3 steps), and a request
# estimate that follows its last rounds: γ changes mid-sequence under the real policy.
SWING = dict(costs=StepCosts(target={1: 1.0, 2: 1.3, 3: 1.6, 4: 1.9}, draft={1: 0.01}), gamma_max=3,
             request_weight=1.0, request_decay=0.5, probe_every=2)


def test_changing_gamma_between_rounds_is_lossless_greedy(partial_pair, target_tokenizer):
    target, ref, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3, policy=_Cycle([3, 0, 1, 0, 0, 2], 3))
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    target_only_rounds = 0
    for p in random_prompts(16, target.config.vocab_size, seed=7):
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        assert sum(got.accepted_histogram) + got.target_only_rounds == got.rounds
        target_only_rounds += got.target_only_rounds
    assert target_only_rounds > 0
    # a ragged batch under the same cycle emits what single requests do
    prompts = random_prompts(6, target.config.vocab_size, seed=8)
    engine.policy = _Cycle([2, 0, 3, 1], 3)
    batched = engine.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert b.token_ids == engine.generate_target_only([p], params)[0].token_ids


def test_the_real_policy_changes_gamma_mid_sequence_and_stays_lossless_greedy(partial_pair, target_tokenizer):
    target, ref, draft = partial_pair
    policy = _Recorded(**SWING)
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3, policy=policy)
    params = SamplingParams(max_new_tokens=24)
    eos = target_tokenizer.eos_token_id
    for p in random_prompts(12, target.config.vocab_size, seed=9):
        got = engine.generate([p], params)[0]
        assert got.token_ids == hf_greedy(ref, p, 24, eos)
        assert sum(got.accepted_histogram) + got.target_only_rounds == got.rounds
    changed = [c for c in policy.calls if len(set(c)) > 1]
    assert len(changed) >= len(policy.calls) // 2, policy.calls  # γ changed within most requests
    assert {0, 3} <= set().union(*policy.calls), policy.calls  # from target steps to γ_max
    # batched: the policy's choice covers the batch, the tokens are still each request's greedy ones
    prompts = random_prompts(5, target.config.vocab_size, seed=10)
    for p, b in zip(prompts, engine.generate(prompts, params)):
        assert b.token_ids == hf_greedy(ref, p, 24, eos)


def test_changing_gamma_between_rounds_samples_the_target():
    target, draft = small_lm(0, 60.0), small_lm(1, 60.0)
    prompt, params = [1, 5, 2], SamplingParams(temperature=1.0)
    exact = exact_three_token_dist(target, prompt, params)
    engine = SpecDecoder(target, draft, None, gamma=3, policy=_Cycle([1, 0, 2, 3, 0], 3))
    counts = empirical(engine, prompt, params, n=6000, batch=500, seed0=77, tokens=3)
    assert chi2_p(counts, exact) > 0.01


def test_measured_step_costs_drive_a_real_engine(partial_pair, target_tokenizer):
    target, _, draft = partial_pair
    engine = SpecDecoder(target, draft, target_tokenizer, gamma=3)
    costs = engine.measure_step_costs(batch_sizes=(1, 2), context=16, repeats=1)
    assert set(costs.target) == {1, 2, 3, 4, 6, 8} and set(costs.draft) == {1, 2}
    assert all(t > 0 for t in [*costs.target.values(), *costs.draft.values()])
    engine.policy = GoodputPolicy(costs, gamma_max=3)
    p = random_prompts(1, target.config.vocab_size, seed=3)[0]
    params = SamplingParams(max_new_tokens=12)
    assert engine.generate([p], params)[0].token_ids == engine.generate_target_only([p], params)[0].token_ids
    with pytest.raises(ValueError, match="no draft"):
        SpecDecoder(target, None, target_tokenizer).measure_step_costs()


class _Observed(GoodputPolicy):
    """The real policy, the expected (accepted, rejected) the engine feeds it recorded, and the counted ones."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen: list[tuple[float, float]] = []
        self.counted: list[tuple[int, int]] = []

    def begin(self, batch: int) -> RequestGoodput:
        call = super().begin(batch)
        observe = call.observe

        def record(outcomes, expected=None):
            self.seen.extend(expected.values())
            self.counted.extend(outcomes.values())
            observe(outcomes, expected)
        call.observe = record
        return call


def test_the_engine_feeds_the_policy_expected_acceptance():
    """At T > 0 the policy learns from Σ_i min(p_i, q_i) over the positions each round tested, not from the accept
    draws: the same tested positions, the same mean (E[1{accepted} | prefix] = Σ min(p, q)), non-integer counts; at
    T = 0 the two are the counted outcomes exactly (one-hot p and q)."""
    target = small_lm(0, 60.0)
    prompts = [[1, 5, 2], [3, 4], [7, 1, 1, 2]] * 40
    # T = 1: the target's weights, flatter (α ≈ 0.35 … 0.5); T = 0: another model's, agreeing now and then
    for params, draft in ((SamplingParams(temperature=1.0, max_new_tokens=12, seed=5), small_lm(0, 6.0)),
                          (SamplingParams(max_new_tokens=12), small_lm(1, 6.0))):
        policy = _Observed(FLAT, gamma_max=3)
        gens = SpecDecoder(target, draft, None, gamma=3, policy=policy).generate(prompts, params)
        accepted, rejected = sum(g.accepted for g in gens), sum(g.rejected for g in gens)
        soft = sum(a for a, _ in policy.seen)
        assert sum(a + r for a, r in policy.seen) == pytest.approx(accepted + rejected)  # the same positions
        assert [a + r for a, r in policy.seen] == pytest.approx([a + r for a, r in policy.counted])
        assert 0 < accepted < accepted + rejected
        if params.greedy:
            assert soft == accepted and all(a == int(a) for a, _ in policy.seen)
        else:
            assert any(a != int(a) for a, _ in policy.seen)
            tested = accepted + rejected  # accepted − soft: a sum of `tested` zero-mean terms, each |·| ≤ 1
            assert abs(accepted - soft) < 4 * (tested / 4) ** 0.5, (accepted, soft, tested)
