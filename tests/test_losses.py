"""Invariants of learner/losses.py, each checked against a reference (float64, tiny vocabularies, seeded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from learner.losses import (
    BaselineState,
    TargetDist,
    bucketize,
    compute_loss,
    fkl,
    jsd,
    masked_mean,
    rkl,
    tvd,
    tvd_pp,
)

DIVERGENCES = {"fkl": fkl, "rkl": rkl, "jsd": jsd, "tvd": tvd}
MC_SAMPLES = 20_000
MC_Z = 5.0  # Monte-Carlo mean may sit at most MC_Z standard errors from the exact gradient


def _logits(n: int, v: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale  # (N, V)


def _target(log_p: torch.Tensor, k: int | None) -> TargetDist:
    """Full target (k None) or the top-k of a full log p, as vLLM would return it."""
    if k is None:
        return TargetDist(logprobs=log_p)
    lp, ids = log_p.topk(k, dim=-1)  # (N, k) each
    return TargetDist(logprobs=lp, ids=ids)


def _full_tvd(logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p.exp() - logits.softmax(-1)).abs().sum(-1)  # (N,)


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_divergence_zero_iff_draft_equals_target(name, k):
    log_p = F.log_softmax(_logits(4, 8, seed=0), -1)  # (N, V)
    target = _target(log_p, k)
    fn = DIVERGENCES[name]
    assert torch.allclose(fn(log_p.clone(), target), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    other = log_p + _logits(4, 8, seed=1, scale=0.5)  # moves the listed tokens' q as well
    assert (fn(other, target) > 1e-6).all()


def test_bucketed_divergence_blind_inside_tail():
    """Negative control for "iff" on buckets: reshuffling q inside the tail changes nothing."""
    log_p = F.log_softmax(_logits(1, 6, seed=2), -1)  # (1, V)
    target = _target(log_p, 2)
    tail_ids = [i for i in range(6) if i not in target.ids[0].tolist()]
    moved = log_p.clone()
    moved[0, tail_ids] = log_p[0, tail_ids].flip(0)  # permute the tail: same tail mass, different tokens
    assert not torch.allclose(moved, log_p)
    for fn in DIVERGENCES.values():
        assert fn(moved, target).abs().max() < 1e-12
    assert _full_tvd(moved, log_p).item() > 1e-3


@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("baseline", ["position", "batch", "none"])
def test_tvd_pp_exact_mean_only_gradient_equals_tvd_gradient(baseline, k):
    """-sum_b q_b (r_b - mu) grad log q_b = -sum_b r_b grad q_b = grad TVD, since sum_b grad q_b = 0."""
    log_p = F.log_softmax(_logits(5, 8, seed=3), -1)
    target = _target(log_p, k)
    ref = _logits(5, 8, seed=4).requires_grad_()
    tvd(ref, target).sum().backward()
    logits = ref.detach().clone().requires_grad_()
    loss, _ = tvd_pp(logits, target, form="exact", baseline=baseline, std_normalize=False)
    loss.sum().backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-12, rtol=0)


def test_tvd_pp_exact_std_rescales_gradient_per_position():
    log_p = F.log_softmax(_logits(5, 8, seed=5), -1)
    target = _target(log_p, None)
    ref = _logits(5, 8, seed=6).requires_grad_()
    tvd(ref, target).sum().backward()
    logits = ref.detach().clone().requires_grad_()
    loss, _ = tvd_pp(logits, target, form="exact", baseline="position", std_normalize=True)
    loss.sum().backward()
    q = ref.detach().softmax(-1)
    r = (log_p > q.log()).double()
    mu = (q * r).sum(-1, keepdim=True)
    sigma = (q * (r - mu) ** 2).sum(-1, keepdim=True).sqrt() + 1e-6  # STD_EPS
    assert torch.allclose(logits.grad, ref.grad / sigma, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_bucketed_divergence_lower_bounds_full_and_equals_at_k_eq_v(name):
    """Data-processing inequality: merging tokens into a tail bucket can only lower an f-divergence."""
    fn = DIVERGENCES[name]
    v = 10
    for seed in range(40):
        log_p = F.log_softmax(_logits(6, v, seed=100 + seed), -1)
        logits = _logits(6, v, seed=200 + seed)
        full = fn(logits, _target(log_p, None))
        k = 1 + seed % (v - 1)
        assert (fn(logits, _target(log_p, k)) <= full + 1e-12).all(), (seed, k)
        assert torch.allclose(fn(logits, _target(log_p, v)), full, atol=1e-10, rtol=0), seed
    if name == "tvd":  # and the full-target function is the textbook TVD
        assert torch.allclose(full, _full_tvd(logits, log_p), atol=1e-12)


def _per_sample_grads(base, log_p, k, tokens, **kw):
    """Per-sample gradients of the sampled surrogate, one row per sample x ~ q at the same position."""
    s = tokens.shape[0]
    logits = base.expand(s, -1).clone().requires_grad_()  # (S, V): rows are independent leaves
    loss, _ = tvd_pp(logits, _target(log_p.expand(s, -1), k), form="sampled", sampled_tokens=tokens, **kw)
    loss.sum().backward()
    return logits.grad  # (S, V)


def _exact_grad(base, log_p, k, **kw):
    logits = base.clone().requires_grad_()  # (1, V)
    loss, _ = tvd_pp(logits, _target(log_p, k), form="exact", **kw)
    loss.sum().backward()
    return logits.grad[0]  # (V,)


@pytest.mark.parametrize("k", [None, 4])
def test_sampled_estimator_unbiased_and_baseline_cuts_variance(k):
    base = _logits(1, 8, seed=7, scale=1.0)  # (1, V)
    log_p = F.log_softmax(_logits(1, 8, seed=8), -1)  # (1, V)
    g = torch.Generator().manual_seed(9)
    tokens = torch.multinomial(base.softmax(-1)[0], MC_SAMPLES, replacement=True, generator=g)  # (S,)
    variance, rel_variance = {}, {}
    settings = {"none": dict(baseline="none"),
                "mean": dict(baseline="position", std_normalize=False),
                "mean_std": dict(baseline="position", std_normalize=True)}
    for label, kw in settings.items():
        grads = _per_sample_grads(base, log_p, k, tokens, **kw)
        exact = _exact_grad(base, log_p, k, **kw)
        stderr = grads.std(0) / MC_SAMPLES**0.5
        assert ((grads.mean(0) - exact).abs() <= MC_Z * stderr + 1e-9).all(), label
        variance[label] = grads.var(0).sum().item()
        rel_variance[label] = variance[label] / exact.pow(2).sum().item()
    assert variance["mean"] < variance["none"], variance
    # sigma only rescales the gradient (by 1/sigma <= 2 at one position, so raw variance can rise);
    # the scale-free comparison is variance relative to the squared exact gradient
    assert rel_variance["mean_std"] < rel_variance["none"], rel_variance


@pytest.mark.parametrize("name", ["fkl", "tvd_pp"])
def test_masked_mean_global_count_makes_sharding_invisible(name):
    log_p = F.log_softmax(_logits(6, 8, seed=10), -1)
    target = _target(log_p, 3)
    mask = torch.tensor([True, False, False, True, True, True])
    logits = _logits(6, 8, seed=11).requires_grad_()
    full = masked_mean(compute_loss(name, logits, target, mask=mask)[0], mask)
    (full_grad,) = torch.autograd.grad(full, logits)
    shards, own = 0.0, 0.0
    for sl in (slice(0, 3), slice(3, 6)):  # 1 and 3 masked positions: uneven on purpose
        shard_target = TargetDist(logprobs=target.logprobs[sl], ids=target.ids[sl])
        per_pos, _ = compute_loss(name, logits[sl], shard_target, mask=mask[sl])
        shards = shards + masked_mean(per_pos, mask[sl], global_count=float(mask.sum()))
        own = own + masked_mean(per_pos, mask[sl]) / 2  # negative control: per-shard counts, DDP average
    (shard_grad,) = torch.autograd.grad(shards, logits)
    assert torch.allclose(shards, full, atol=1e-12)
    assert torch.allclose(shard_grad, full_grad, atol=1e-12)
    assert not torch.allclose(own, full, atol=1e-3)


def test_jsd_endpoints_and_limits():
    log_p = F.log_softmax(_logits(5, 8, seed=12), -1)
    logits = _logits(5, 8, seed=13)
    target = _target(log_p, 4)
    f, r = fkl(logits, target), rkl(logits, target)
    assert torch.allclose(jsd(logits, target, beta=0.0), f, atol=1e-12)
    assert torch.allclose(jsd(logits, target, beta=1.0), r, atol=1e-12)
    eps = 1e-5  # JSD_beta = beta * FKL + O(beta^2) near 0, (1 - beta) * RKL + O((1 - beta)^2) near 1
    assert torch.allclose(jsd(logits, target, beta=eps) / eps, f, rtol=1e-3)
    assert torch.allclose(jsd(logits, target, beta=1 - eps) / eps, r, rtol=1e-3)
    # beta = 0.5 is symmetric: swapping draft and target leaves it unchanged (full target, so no tail)
    log_q = F.log_softmax(logits, -1)
    swapped = jsd(log_p, TargetDist(logprobs=log_q), beta=0.5)
    assert torch.allclose(jsd(logits, TargetDist(logprobs=log_p), beta=0.5), swapped, atol=1e-12)


def test_ema_baseline_state_updates_in_place():
    log_p = F.log_softmax(_logits(6, 8, seed=14), -1)
    target = _target(log_p, None)
    state = BaselineState(decay=0.9)
    _, s1 = tvd_pp(_logits(6, 8, seed=15), target, baseline="ema", baseline_state=state)
    assert state.initialized and state.mean == pytest.approx(s1["reward_mean"])
    assert state.var == pytest.approx(s1["reward_std"] ** 2)
    before = (state.mean, state.var)
    logits = _logits(6, 8, seed=16)
    loss, s2 = tvd_pp(logits, target, baseline="ema", baseline_state=state)
    assert state.mean == pytest.approx(0.9 * before[0] + 0.1 * s2["reward_mean"])
    assert state.var == pytest.approx(0.9 * before[1] + 0.1 * s2["reward_std"] ** 2)
    # the baseline used was the state before this batch's update
    log_q, log_pb = bucketize(logits, target)
    adv = ((log_pb > log_q).double() - before[0]) / (before[1] ** 0.5 + 1e-6)
    assert torch.allclose(loss, -(log_q.exp() * adv * log_q).sum(-1), atol=1e-12)


def test_empty_tail_is_finite_and_bf16_is_upcast():
    log_p = F.log_softmax(_logits(3, 8, seed=17), -1)
    target = _target(log_p, 8)  # k = V: tail mass exactly 0 in both p and q
    logits = _logits(3, 8, seed=18).float().bfloat16().requires_grad_()
    for name in ("tvd_pp", "tvd", "fkl", "rkl", "jsd"):
        loss, stats = compute_loss(name, logits, target)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name
        assert stats["tail_mass"] == pytest.approx(0.0, abs=1e-6) and "tvd" in stats


def test_compute_loss_reports_tail_mass_and_zeroes_masked_positions():
    log_p = F.log_softmax(_logits(4, 8, seed=19), -1)
    target = _target(log_p, 2)
    mask = torch.tensor([True, True, False, True])
    loss, stats = compute_loss("rkl", _logits(4, 8, seed=20), target, mask=mask)
    expected = (1 - target.logprobs.exp().sum(-1))[mask].mean().item()
    assert stats["tail_mass"] == pytest.approx(expected, rel=1e-5)
    assert loss[2] == 0 and (loss[mask] > 0).all()
    with pytest.raises(ValueError, match="name"):
        compute_loss("kl", _logits(4, 8, seed=20), target)
