"""Token-level distillation losses for draft models: FKL, RKL, generalized JSD, TVD and the TVD++ surrogate.

p = target distribution, q = draft distribution (softmax of draft_logits), at N positions, vocabulary V.
A target comes either full, (N, V) log-probs, or as top-k ids + log-probs (what vLLM returns cheaply).
A top-k target is read as k+1 buckets: the k listed tokens plus one tail bucket holding the remaining
mass; the draft is aggregated into the same buckets. Every divergence here is computed on the buckets,
so by the data-processing inequality it is a lower bound of the full-vocabulary divergence;
compute_loss reports the tail mass.

Pure functions (no I/O, no Ray), math in log space, float32 at least (bf16 logits are upcast, float64 stays
float64). Per-position losses are (N,) and zero at masked-out positions; reduce them with
masked_mean(..., global_count) so that data-parallel sharding does not change the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Stands in for log 0: exp() of it is exactly 0 in float32/64, yet unlike -inf it keeps 0 * (log a - log b)
# and the backward pass of logsumexp finite when a bucket (typically the tail) is empty.
LOG_FLOOR = -1e4
STD_EPS = 1e-6  # added to sigma in the TVD++ advantage
LOSS_NAMES = ("tvd_pp", "tvd", "fkl", "rkl", "jsd")
FORMS = ("exact", "sampled")
BASELINES = ("position", "batch", "ema", "none")


@dataclass
class TargetDist:
    """Target distribution at N positions: top-k (ids (N,k) long + logprobs (N,k) float) with an
    implicit tail bucket holding the remaining mass 1 - sum(exp(logprobs));
    or full (ids None, logprobs (N,V))."""

    logprobs: torch.Tensor
    ids: torch.Tensor | None = None

    def __post_init__(self):
        if self.logprobs.dim() != 2:
            raise ValueError(f"logprobs: expected (N, k) or (N, V), got shape {tuple(self.logprobs.shape)}")
        if self.ids is not None and self.ids.shape != self.logprobs.shape:
            raise ValueError(f"ids: shape {tuple(self.ids.shape)} != logprobs {tuple(self.logprobs.shape)}")

    @property
    def is_full(self) -> bool:
        return self.ids is None


@dataclass
class BaselineState:
    """Running reward statistics for baseline="ema": mean/var <- decay * old + (1 - decay) * batch.
    The first update (initialized False) copies the batch statistics instead of blending with the defaults."""

    decay: float = 0.9
    mean: float = 0.5
    var: float = 0.25
    initialized: bool = False


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012: switch at -log 2)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bucketize(draft_logits: torch.Tensor, target: TargetDist) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log_q_b, log_p_b), each (N, k+1): draft and target log-probs over the k listed tokens plus
    one tail bucket (for a full target: (N, V) both, no tail). Empty buckets hold LOG_FLOOR, not -inf.

    log q_tail = logsumexp of log q over the unlisted ids (not log(1 - sum q_top): no cancellation as
    q_tail -> 0); log p_tail = log1mexp(logsumexp(target.logprobs)), floored when the listed mass is 1."""
    dtype = torch.float64 if draft_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(draft_logits.to(dtype), dim=-1)  # (N, V)
    log_p = target.logprobs.to(device=log_q.device, dtype=dtype)  # (N, k) or (N, V)
    if log_p.shape[0] != log_q.shape[0]:
        raise ValueError(f"target: {log_p.shape[0]} positions, draft_logits: {log_q.shape[0]}")
    if target.is_full:
        if log_p.shape != log_q.shape:
            raise ValueError(f"target.logprobs: shape {tuple(log_p.shape)} != draft {tuple(log_q.shape)}")
        return log_q.clamp_min(LOG_FLOOR), log_p.clamp_min(LOG_FLOOR)
    ids = target.ids.to(device=log_q.device, dtype=torch.long)  # (N, k)
    log_q_top = log_q.gather(-1, ids)  # (N, k)
    log_q_tail = log_q.scatter(-1, ids, LOG_FLOOR).logsumexp(-1, keepdim=True)  # (N, 1)
    log_p_tail = _log1mexp(log_p.logsumexp(-1, keepdim=True))  # (N, 1)
    log_q_b = torch.cat([log_q_top, log_q_tail], dim=-1).clamp_min(LOG_FLOOR)  # (N, k+1)
    log_p_b = torch.cat([log_p, log_p_tail], dim=-1).clamp_min(LOG_FLOOR)  # (N, k+1)
    return log_q_b, log_p_b


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_x a log(a/b) over the last dim: (N, B) -> (N,). Empty a-buckets contribute exactly 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _jsd_buckets(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # (N, B)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _tvd_buckets(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _divergence(name: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    if name == "fkl":
        return _kl(log_p, log_q)
    if name == "rkl":
        return _kl(log_q, log_p)
    if name == "jsd":
        return _jsd_buckets(log_q, log_p, beta)
    return _tvd_buckets(log_q, log_p)


def _bool_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if mask.shape != (n,):
        raise ValueError(f"mask: expected shape ({n},), got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _apply_mask(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return loss if mask is None else torch.where(_bool_mask(mask, loss.shape[0], loss.device), loss, 0.0)


def fkl(draft_logits, target: TargetDist, mask=None) -> torch.Tensor:
    """Forward KL per position on the buckets: sum_b p_b log(p_b / q_b). (N, V), target -> (N,)."""
    return _apply_mask(_kl(*reversed(bucketize(draft_logits, target))), mask)


def rkl(draft_logits, target: TargetDist, mask=None) -> torch.Tensor:
    """Reverse KL per position on the buckets: sum_b q_b log(q_b / p_b). (N, V), target -> (N,).
    Where p_b = 0 < q_b the true RKL is +inf; here it is large but finite (log p_b floored at LOG_FLOOR)."""
    return _apply_mask(_kl(*bucketize(draft_logits, target)), mask)


def jsd(draft_logits, target: TargetDist, beta: float = 0.5, mask=None) -> torch.Tensor:
    """Generalized JSD on the buckets, in the convention of TRL's GKDTrainer.generalized_jsd_loss
    (Agarwal et al. 2024, Eq. 1), p = target (teacher), q = draft (student):
        m = beta * p + (1 - beta) * q,   JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m).
    As in TRL the endpoints are special-cased: beta = 0 -> KL(p || q) = fkl, beta = 1 -> KL(q || p) = rkl.
    The formula itself vanishes at both ends (JSD_beta / beta -> fkl as beta -> 0, JSD_beta / (1 - beta)
    -> rkl as beta -> 1), so the loss jumps in scale at 0 and 1. beta = 0.5 is the symmetric JSD."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: must be in [0, 1], got {beta}")
    return _apply_mask(_jsd_buckets(*bucketize(draft_logits, target), beta), mask)


def tvd(draft_logits, target: TargetDist, mask=None) -> torch.Tensor:
    """Total variation per position on the buckets: 0.5 * sum_b |p_b - q_b| = sum_b max(0, p_b - q_b). (N,).
    Differentiable: its gradient is -sum_b 1{p_b > q_b} grad q_b (ties have measure zero)."""
    return _apply_mask(_tvd_buckets(*bucketize(draft_logits, target)), mask)


def _bucket_index(sampled_tokens: torch.Tensor, target: TargetDist, n: int, device) -> torch.Tensor:
    """Bucket of each sampled id, (N,): the id (full target), its slot in target.ids, or k (tail)."""
    x = sampled_tokens.to(device=device, dtype=torch.long).reshape(-1)  # (N,)
    if x.shape[0] != n:
        raise ValueError(f"sampled_tokens: expected {n} tokens, got {x.shape[0]}")
    if target.is_full:
        return x
    hit = target.ids.to(device) == x[:, None]  # (N, k)
    return torch.where(hit.any(-1), hit.int().argmax(-1), hit.shape[-1])  # (N,)


def _ema_baseline(state: BaselineState, mean: float, var: float) -> tuple[float, float]:
    """Return the baseline (mean, var) to use now, then fold this batch into `state` (in place).
    The baseline is the state *before* the update, so it does not depend on the current samples;
    the first call (state not initialized) uses the batch statistics themselves."""
    if not state.initialized:
        state.mean, state.var, state.initialized = mean, var, True
        return mean, var
    used = (state.mean, state.var)
    state.mean = state.decay * state.mean + (1.0 - state.decay) * mean
    state.var = state.decay * state.var + (1.0 - state.decay) * var
    return used


def _tvd_pp_buckets(log_q, log_p, bucket, *, baseline, std_normalize, baseline_state, mask):
    n = log_q.shape[0]
    m = _bool_mask(mask, n, log_q.device)  # (N,)
    with torch.no_grad():
        q = log_q.exp()  # (N, B)
        reward = (log_p > log_q).to(q.dtype)  # (N, B)   r(x) = 1{p(x) > q(x)}
        tvd_n = _tvd_buckets(log_q, log_p)  # (N,)
    if bucket is None:  # exact: expectation over the draft's buckets
        w, r, log_q_x = q, reward, log_q  # (N, B) each
    else:  # sampled: one draft sample per position
        w = torch.ones(n, 1, dtype=q.dtype, device=q.device)  # (N, 1)
        r = reward.gather(-1, bucket[:, None])  # (N, 1)
        log_q_x = log_q.gather(-1, bucket[:, None])  # (N, 1)
    # batch statistics of r over masked positions (under q for the exact form, over the samples otherwise)
    count = m.sum().clamp_min(1)
    mw = w * m[:, None]  # (N, B) or (N, 1)
    r_mean = (mw * r).sum() / count
    r_var = (mw * (r - r_mean) ** 2).sum() / count
    if baseline == "position":  # E_q[r] and Var_q[r] at each position, exact in both forms
        mu = (q * reward).sum(-1, keepdim=True)  # (N, 1)
        var = (q * (reward - mu) ** 2).sum(-1, keepdim=True)  # (N, 1)
    elif baseline == "batch":
        mu, var = r_mean, r_var
    elif baseline == "ema":
        if baseline_state is None:
            raise ValueError('baseline_state: required when baseline="ema"')
        mu, var = _ema_baseline(baseline_state, float(r_mean), float(r_var))
    else:  # "none": the plain REINFORCE estimator of grad TVD
        mu, var = 0.0, None
    sigma = 1.0
    if std_normalize and var is not None:
        sigma = torch.as_tensor(var, dtype=q.dtype).sqrt() + STD_EPS
    adv = ((r - mu) / sigma).detach()  # (N, B) or (N, 1)
    loss = torch.where(m, -(w * adv * log_q_x).sum(-1), 0.0)  # (N,)
    stats = {"reward_mean": float(r_mean), "reward_std": float(r_var.sqrt()),
             "tvd": float((tvd_n * m).sum() / count)}
    return loss, stats


def _check_tvd_pp_args(form, baseline, sampled_tokens) -> None:
    if form not in FORMS:
        raise ValueError(f"form: must be one of {FORMS}, got {form!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline: must be one of {BASELINES}, got {baseline!r}")
    if form == "sampled" and sampled_tokens is None:
        raise ValueError('sampled_tokens: required when form="sampled"')


def tvd_pp(draft_logits, target: TargetDist, *, form="exact", sampled_tokens=None, baseline="position",
           std_normalize=True, baseline_state: BaselineState | None = None,
           mask=None) -> tuple[torch.Tensor, dict]:
    """TVD++ surrogate (Goel et al. 2024). Reward r(x) = 1{p(x) > q(x)} (stop-gradient),
    advantage A = (r - mu) / sigma.
      exact:   L_n = -sum_b sg(q_b) sg(A_b) log q_b         (grad = -sum_b A_b grad q_b)
      sampled: L_n = -sg(A(x_n)) log q(x_n), x_n = sampled_tokens[n] ~ q (policy gradient);
               ids outside the target's top-k count as the tail bucket (its p and q).
    With mu only (sigma = 1), both have expected gradient grad TVD, since sum_b q_b grad log q_b = 0.
    baseline: "position" mu = sum_b q_b r_b, sigma = sqrt(sum_b q_b (r_b - mu)^2) at each position;
              "batch" mean/std of r over masked positions (under q for exact, over the samples for sampled);
              "ema" running mean/var in baseline_state (see _ema_baseline); "none" mu = 0, sigma = 1.
    std_normalize False -> sigma = 1; otherwise sigma gets + STD_EPS.
    Returns per-position loss (N,) and floats {"reward_mean", "reward_std", "tvd" (bucketed, masked mean)}."""
    _check_tvd_pp_args(form, baseline, sampled_tokens)
    log_q, log_p = bucketize(draft_logits, target)  # (N, B) each
    bucket = None if form == "exact" else _bucket_index(sampled_tokens, target, log_q.shape[0], log_q.device)
    return _tvd_pp_buckets(log_q, log_p, bucket, baseline=baseline, std_normalize=std_normalize,
                           baseline_state=baseline_state, mask=mask)


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None, global_count: float | None = None):
    """sum(per_position * mask) / global_count, global_count = the number of masked positions across all
    data-parallel workers (default: this shard's count). With the global count the shard values sum to the
    full-batch mean, so the DDP-averaged gradient is (full-batch gradient) / world_size whatever the split;
    with per-shard counts, shards with few positions would be over-weighted."""
    m = _bool_mask(mask, per_position.shape[0], per_position.device)  # (N,)
    total = torch.where(m, per_position, 0.0).sum()
    count = m.sum().clamp_min(1) if global_count is None else global_count
    return total / count


def _tail_mass(target: TargetDist, n: int, device) -> torch.Tensor:
    if target.is_full:
        return torch.zeros(n, device=device)
    lp = target.logprobs.to(device=device, dtype=torch.float32)  # (N, k)
    return (1.0 - lp.exp().sum(-1)).clamp_min(0.0)  # (N,)


def compute_loss(name: str, draft_logits, target: TargetDist, *, sampled_tokens=None, form="exact", beta=0.5,
                 baseline="position", std_normalize=True, baseline_state=None, mask=None):
    """Dispatch by name in LOSS_NAMES. Returns (per-position loss (N,), stats): stats holds at least "tvd"
    (bucketed TVD, masked mean) and "tail_mass" (masked mean of the target's tail mass, 0 if full);
    tvd_pp adds "reward_mean" and "reward_std". Buckets are computed once."""
    if name not in LOSS_NAMES:
        raise ValueError(f"name: must be one of {LOSS_NAMES}, got {name!r}")
    if name == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: must be in [0, 1], got {beta}")
    if name == "tvd_pp":
        _check_tvd_pp_args(form, baseline, sampled_tokens)
    log_q, log_p = bucketize(draft_logits, target)  # (N, B) each
    n = log_q.shape[0]
    m = _bool_mask(mask, n, log_q.device)  # (N,)
    if name == "tvd_pp":
        bucket = None if form == "exact" else _bucket_index(sampled_tokens, target, n, log_q.device)
        loss, stats = _tvd_pp_buckets(log_q, log_p, bucket, baseline=baseline, std_normalize=std_normalize,
                                      baseline_state=baseline_state, mask=m)
    else:
        loss = torch.where(m, _divergence(name, log_q, log_p, beta), 0.0)  # (N,)
        with torch.no_grad():
            tvd_n = _tvd_buckets(log_q, log_p)  # (N,)
        stats = {"tvd": float(masked_mean(tvd_n, m))}
    stats["tail_mass"] = float(masked_mean(_tail_mass(target, n, log_q.device), m))
    return loss, stats


def temper(target: TargetDist, temperature: float) -> TargetDist:
    """p_T ∝ p^(1/T) on the buckets. A top-k target's tail bucket is tempered as one token, so for T < 1
    its tempered mass is an upper bound of the true one (the listed tokens' share a lower bound)."""
    if temperature == 1.0:
        return target
    lp = target.logprobs.float() if target.logprobs.dtype != torch.float64 else target.logprobs
    if target.is_full:
        return TargetDist(torch.log_softmax(lp / temperature, -1))
    tail = _log1mexp(lp.logsumexp(-1, keepdim=True)).clamp_min(LOG_FLOOR)  # (N, 1)
    z = torch.cat([lp, tail], -1) / temperature  # (N, k+1)
    return TargetDist(lp / temperature - z.logsumexp(-1, keepdim=True), target.ids)


def aligned_dims(hidden_size: int, fraction: float) -> int:
    """m = ceil(fraction · H), at least 1: the feature dimensions partial alignment regresses."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"aligned_fraction: must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * hidden_size - 1e-9))


def feature_regression(pred: torch.Tensor, target: torch.Tensor, aligned_fraction: float = 1.0,
                       beta: float = 1.0, mask=None) -> torch.Tensor:
    """EAGLE's feature regression, restricted to the first m = ceil(a · H) dimensions (FSPAD's partial alignment):
        L_feat(n) = (1/m) Σ_{d<m} SmoothL1_β(f̂_{n,d} − f_{n,d}),
        SmoothL1_β(x) = x² / (2β) if |x| < β else |x| − β/2.
    pred, target (N, H) → (N,). a = 1 is EAGLE's L_reg (mean over all H dimensions); the dimensions d ≥ m get no
    gradient from this term, so they are shaped by the logit term alone."""
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)}: expected the same (N, H)")
    m = aligned_dims(pred.shape[-1], aligned_fraction)
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    loss = F.smooth_l1_loss(pred[:, :m].to(dtype), target[:, :m].to(device=pred.device, dtype=dtype),
                            reduction="none", beta=beta).mean(-1)  # (N,)
    return _apply_mask(loss, mask)


def partial_alignment_loss(pred_features: torch.Tensor, target_features: torch.Tensor, logit_loss: torch.Tensor, *,
                           aligned_fraction: float = 0.5, feature_weight: float = 1.0, logit_weight: float = 0.1,
                           beta: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Partial alignment distillation (FSPAD): feature alignment on part of the feature, logit distillation on the
    token distribution the whole predicted feature gives, so the two stop competing for the same coordinates:
        L_n = w_f · L_feat(n; first m dims) + w_l · D_n(p ‖ q),   q = softmax(W f̂_n)
    (EAGLE: L = L_reg + w_cls L_cls with w_cls = 0.1, a = 1, D = cross-entropy ≡ FKL + const.)
    logit_loss (N,) is D_n from this module's divergences (compute_loss on the target's top-k buckets).
    Returns per-position loss (N,) and floats {"feature_loss", "logit_loss"} (means over the N positions)."""
    n = pred_features.shape[0]
    if logit_loss.shape != (n,):
        raise ValueError(f"logit_loss: expected shape ({n},), got {tuple(logit_loss.shape)}")
    feat = feature_regression(pred_features, target_features, aligned_fraction, beta)  # (N,)
    loss = feature_weight * feat + logit_weight * logit_loss.to(feat.dtype)  # (N,)
    stats = {"feature_loss": float(feat.detach().mean()) if n else 0.0,
             "logit_loss": float(logit_loss.detach().mean()) if n else 0.0}
    return loss, stats
