"""γ chosen per round by expected goodput (`serve.goodput`): the choice itself on hand-built costs, and the
engine staying lossless while γ changes between rounds (including γ = 0 rounds that leave the draft's cache
behind): greedy output equal to HF `generate`, ragged batches equal single requests, χ² over three tokens."""

from __future__ import annotations

import itertools

import pytest
from specdec_helpers import chi2_p, empirical, exact_three_token_dist, hf_greedy, random_prompts, small_lm

from draftalign.sampling import SamplingParams
from serve.acceptance import expected_block_efficiency
from serve.goodput import AcceptanceEstimate, GoodputPolicy, StepCosts, best_gamma
from serve.specdec import SpecDecoder

FLAT = StepCosts(target={1: 1.0, 64: 1.0}, draft={1: 0.05, 32: 0.05})  # memory-bound: rows are free
LINEAR = StepCosts(target={1: 1.0, 64: 64.0}, draft={1: 0.05, 32: 1.6})  # compute-bound: each row costs


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


def test_policy_probes_after_a_run_of_target_only_rounds():
    policy = GoodputPolicy(LINEAR, gamma_max=3, probe_every=4)
    choices = [policy.choose(8) for _ in range(8)]
    assert choices == [0, 0, 0, 1, 0, 0, 0, 1]


class _Cycle(GoodputPolicy):
    """A policy that plays a fixed cycle of γ values (0 included), to exercise every transition."""

    def __init__(self, cycle, gamma_max):
        super().__init__(FLAT, gamma_max)
        self._cycle = itertools.cycle(cycle)

    def choose(self, batch: int) -> int:
        return next(self._cycle)


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
