"""The target's features for the FSPAD head, computed where the target runs and streamed batch by batch.

Why Hugging Face, not vLLM. vLLM 0.32 on CPU hands its caller tokens and log-probs, never hidden
states: the last layer's output stays inside the model runner, with no API to return it. The
features therefore come from the Hugging Face model of the same checkpoint (the one the engine and
the lossless eval load), in a Ray actor, `TargetFeatures`, sized like a target engine
(`target.cpus_per_engine`, `target.resources`).

Why streamed. A batch's features are B · T · H floats (16 rows × 300 positions × 576 ≈ 11 MB in
fp32); the whole set's would be GBs (SpecForge #426: offline teacher features blow up storage). None
is written: the learner asks for batch `step + 1` while it trains on batch `step`, and every batch
is a pure function of (job seed, step, rank) — its rows (`draftalign.batching.BatchSampler`)
and its feature-sampling draws — so a resumed run sees exactly the batches it would have seen.

Layout. A row is prompt (P tokens) + answer (R tokens) = s_0 … s_{L−1}, with the target's features
F_0 … F_{L−1} (post final norm, `learner/fspad.py`) and its top-k distribution of each answer token
r_j (the set's stored row j, else the top-k of softmax(W F_{P−1+j})). Draft node d = 0 … L−2 reads
(F_d, s_{d+1}) at rotary position d and predicts F_{d+1}; it carries a loss for d ∈ [P−2, L−3]:
regress F_{d+1}, distil the distribution of s_{d+2} = r_j, j = d + 2 − P.

Feature sampling (FSPAD). For d ∈ [P−1, L−3] (the entering token is an answer token, one the
target drew) x ~ p(· | s_≤d) is drawn from the top-k of answer row d + 1 − P, renormalised over the
k listed tokens. Where x = s_{d+1} nothing changes. Where x ≠ s_{d+1}, the target computes its
feature after x — one extra node at position d + 1 that sees s_≤d and itself, in a second pass on the
first pass's KV cache — and the draft gets an extra node (F_d, x) at position d that sees the data
nodes < d and itself; that node carries the loss (regress the extra node's feature g, distil the
top-k of softmax(W g)) and data node d carries none. Every loss position's entering token is then a
draw from the target, and every target is the target's own continuation of what the draft was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from draftalign.aux_states import recording, resolve_aux_layers

TOPK_CHUNK = 256  # rows of W·g at a time when the top-k is computed from features (V floats each)


@dataclass
class FeatureBatch:
    """One learner batch in the draft's coordinates: B rows × T draft nodes, N loss positions (row-major)."""

    features: torch.Tensor  # (B, T, H) float32: the target feature f_d each node reads
    input_ids: torch.Tensor  # (B, T) int64: the token entering with it
    position_ids: torch.Tensor  # (B, T) int64: rotary position d
    allowed: torch.Tensor  # (B, T, T) bool: the nodes each node attends to
    loss_mask: torch.Tensor  # (B, T) bool
    target_features: torch.Tensor  # (N, H) float32: the target's next feature
    target_ids: torch.Tensor  # (N, k) int64: the target's top-k of the token after it
    target_logprobs: torch.Tensor  # (N, k) float32
    sampled: torch.Tensor  # (N,) bool: the position's token was re-drawn (an extra node)
    # the data's own continuation of every data node d (training-time test, `learner.fspad_distill.unrolled_steps`):
    # the top-k of s_{d+2} (the feature target F_{d+1} is `features[:, d + 1]`), whether d's token was re-drawn or not
    next_ids: torch.Tensor  # (B, T, k) int64
    next_lps: torch.Tensor  # (B, T, k) float32
    next_mask: torch.Tensor  # (B, T) bool: d ∈ [P − 2, L − 3], the data nodes with an answer token two ahead

    @property
    def n_tokens(self) -> int:
        return int(self.target_features.shape[0])


def sample_from_topk(ids: torch.Tensor, logprobs: torch.Tensor, generator: torch.Generator | None = None):
    """(M, k) top-k ids and log-probs → (M,) one draw each from the k listed tokens, renormalised."""
    if ids.shape != logprobs.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)}: expected the same (M, k)")
    if ids.shape[0] == 0:
        return ids.new_zeros(0)
    probs = torch.softmax(logprobs.float(), -1)  # (M, k)
    slot = torch.multinomial(probs, 1, generator=generator)  # (M, 1)
    return ids.gather(-1, slot).squeeze(-1)


@torch.no_grad()
def topk_from_features(target, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, H) features → the target's top-k (ids (M, k), log-probs (M, k)) of softmax(W g)."""
    head = target.get_output_embeddings()
    ids, lps = [], []
    for i in range(0, g.shape[0], TOPK_CHUNK):
        logp = torch.log_softmax(head(g[i:i + TOPK_CHUNK].to(head.weight.dtype)).float(), -1)  # (m, V)
        top = torch.topk(logp, k, dim=-1)
        ids.append(top.indices)
        lps.append(top.values)
    if not ids:
        return g.new_zeros(0, k, dtype=torch.long), g.new_zeros(0, k)
    return torch.cat(ids), torch.cat(lps)


def _answer_dists(target, row: dict, F_row: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k of every answer token r_j, (R, k) each: stored in the set, else from F_{P−1+j}."""
    P, R = len(row["prompt_token_ids"]), len(row["response_token_ids"])
    ids, lps = row.get("target_ids"), row.get("target_logprobs")
    if ids is not None and lps is not None and np.shape(ids)[0] == R and np.shape(ids)[1] >= k:
        return torch.as_tensor(np.asarray(ids)[:, :k], dtype=torch.long), \
            torch.as_tensor(np.asarray(lps)[:, :k], dtype=torch.float32)
    return topk_from_features(target, F_row[P - 1:P - 1 + R], k)


@torch.no_grad()
def _decoder_pass(target, aux_layers: list[int] | None, **kw):
    """The target's decoder on `kw` → (the head's input features (B, n, W) float32: the last post-norm state
    (W = H), or with `aux_layers` the EAGLE-3 aux states concatenated (W = len · H, `draftalign.aux_states`);
    the last post-norm state (B, n, H) float32, whose softmax(W ·) is the target's distribution; the output)."""
    dec = target.get_decoder()
    if aux_layers is None:
        out = dec(**kw)
        last = out.last_hidden_state.float()
        return last, last, out
    with recording(dec, aux_layers) as aux:
        out = dec(**kw)
    return torch.cat(aux, -1).float(), out.last_hidden_state.float(), out


@torch.no_grad()
def _target_pass(target, seqs: list[list[int]], pad_id: int, keep_cache: bool, aux_layers: list[int] | None = None):
    """One batched, right-padded causal pass → (the head's input features (B, Lmax, W), the last post-norm features
    (B, Lmax, H), KV cache or None); W = H without `aux_layers` (`_decoder_pass`)."""
    B, Lmax = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, Lmax), pad_id, dtype=torch.long)
    mask = torch.zeros(B, Lmax, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    F_in, F_last, out = _decoder_pass(target, aux_layers, input_ids=ids, attention_mask=mask, use_cache=keep_cache)
    return F_in, F_last, (out.past_key_values if keep_cache else None)


@torch.no_grad()
def _branch_pass(target, cache, lengths: list[int], branches: list[list[tuple[int, list[int]]]], Lmax: int,
                 pad_id: int, aux_layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's features on token chains grafted onto the cached first pass (a tree pass, one per batch):
    branches[b] = [(c, [x_1, …, x_m]), …] puts x_i at position c + i, seeing the cached s_≤c and x_1 … x_i of its
    own chain. Returns (the head's input features (B, A, W), the last post-norm ones (B, A, H)) float32, A = the most
    chain tokens in a row, in the rows' chain order (`_decoder_pass`)."""
    from draftalign.models import additive_mask

    B, A = len(branches), max(sum(len(x) for _, x in row) for row in branches)
    ids = torch.full((B, A), pad_id, dtype=torch.long)
    pos = torch.zeros(B, A, dtype=torch.long)
    allowed = torch.zeros(B, A, Lmax + A, dtype=torch.bool)
    allowed[:, torch.arange(A), Lmax + torch.arange(A)] = True  # every node sees itself (padding nodes only that)
    for b, row in enumerate(branches):
        a = 0
        for c, xs in row:
            for i, x in enumerate(xs, start=1):
                ids[b, a], pos[b, a] = x, c + i
                allowed[b, a, :min(c + 1, lengths[b])] = True
                allowed[b, a, Lmax + a - i + 1:Lmax + a + 1] = True  # x_1 … x_i of this chain
                a += 1
    dtype = target.get_output_embeddings().weight.dtype
    G_in, G_last, _ = _decoder_pass(target, aux_layers, input_ids=ids, attention_mask=additive_mask(allowed, dtype),
                                    position_ids=pos, past_key_values=cache, use_cache=True)
    return G_in, G_last


@torch.no_grad()
def branch_features(target, rows: list[dict], branches: list[list[tuple[int, list[int]]]], *, k: int,
                    pad_id: int = 0, aux_layers: list[int] | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The target's side of the head's on-policy chains (`learner.fspad_distill.sample_chains`): one causal pass
    over the rows, one tree pass over their chains (`_branch_pass`) → per row (G (n, H), ids (n, k), lps (n, k)):
    the target's feature after each chain token, in chain order (the head's input features: aux states with
    `aux_layers`), and the top-k of softmax(W g) — the distribution of the token after it."""
    _check_rows(rows, k)
    if len(branches) != len(rows):
        raise ValueError(f"branch_features: {len(branches)} branch lists for {len(rows)} rows")
    seqs = [list(r["prompt_token_ids"]) + list(r["response_token_ids"]) for r in rows]
    for s, row in zip(seqs, branches, strict=True):
        if any(not 0 <= c < len(s) for c, _ in row):
            raise ValueError(f"branch_features: a chain grafted at position ≥ the row's length {len(s)}")
    if not any(xs for row in branches for _, xs in row):
        W = target.config.hidden_size * (len(aux_layers) if aux_layers else 1)
        return [(torch.zeros(0, W), torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)) for _ in rows]
    _, _, cache = _target_pass(target, seqs, pad_id, keep_cache=True)
    G, G_last = _branch_pass(target, cache, [len(s) for s in seqs], branches, max(len(s) for s in seqs), pad_id,
                             aux_layers)
    out = []
    for b, row in enumerate(branches):
        n = sum(len(xs) for _, xs in row)
        out.append((G[b, :n], *topk_from_features(target, G_last[b, :n], k)))
    return out


@dataclass
class RowFeatures:
    """The target's side of one row (module docstring): all a FeatureBatch needs from the target."""

    F: torch.Tensor  # (L, W) float: the head's input features of s_0 … s_{L−1} (W = H, or the aux states' width)
    ids: torch.Tensor  # (R, k) int64: the top-k of each answer token r_j
    lps: torch.Tensor  # (R, k) float32
    alts: list[tuple[int, int]]  # re-drawn tokens (d, x): x at position d + 1
    G: torch.Tensor  # (m, W) float: the target's feature after each re-drawn token
    g_ids: torch.Tensor  # (m, k) int64: the top-k of softmax(W g)
    g_lps: torch.Tensor  # (m, k) float32


def _check_rows(rows: list[dict], k: int) -> None:
    if not rows:
        raise ValueError("feature_batch: no rows")
    if k < 1:
        raise ValueError(f"feature_batch: k must be ≥ 1, got {k}")
    for r in rows:
        if len(r["prompt_token_ids"]) < 1 or len(r["response_token_ids"]) < 1:
            raise ValueError(f"row {r.get('prompt_id')!r}: needs a prompt and an answer token")


@torch.no_grad()
def row_features(target, rows: list[dict], *, k: int, feature_sampling: bool = False,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 pad_id: int = 0, aux_layers: list[int] | None = None) -> list[RowFeatures]:
    """The target's passes over a batch of rows (one causal pass; with feature sampling a second pass of the
    re-drawn tokens on its KV cache) → one RowFeatures per row. `generator`: one for the batch (drawn row by
    row) or one per row (a row's draws then do not depend on its batch: the feature store's case). `aux_layers`:
    the features are EAGLE-3's aux states (`_decoder_pass`); the distributions always come from the last state."""
    _check_rows(rows, k)
    seqs = [list(r["prompt_token_ids"]) + list(r["response_token_ids"]) for r in rows]
    F, F_last, cache = _target_pass(target, seqs, pad_id, feature_sampling, aux_layers)  # (B, Lmax, W), (B, Lmax, H)
    dists = [_answer_dists(target, r, F_last[b], k) for b, r in enumerate(rows)]
    alts: list[list[tuple[int, int]]] = [[] for _ in rows]
    if feature_sampling:
        for b, r in enumerate(rows):
            P, R = len(r["prompt_token_ids"]), len(r["response_token_ids"])
            if R < 2:
                continue
            gen = generator[b] if isinstance(generator, list) else generator
            x = sample_from_topk(dists[b][0][:R - 1], dists[b][1][:R - 1], gen)  # (R−1,) draws for r_0…r_{R−2}
            data = torch.tensor(r["response_token_ids"][:R - 1])
            alts[b] = [(P - 1 + j, int(x[j])) for j in (x != data).nonzero()[:, 0].tolist()]
    G = G_last = None
    if any(alts):
        G, G_last = _branch_pass(target, cache, [len(s) for s in seqs], [[(d, [x]) for d, x in a] for a in alts],
                                 F.shape[1], pad_id, aux_layers)  # (B, A, W), (B, A, H): x at d + 1, seeing s_≤d
    out = []
    W, H = F.shape[-1], F_last.shape[-1]
    for b, s in enumerate(seqs):
        g = G[b, :len(alts[b])] if alts[b] else F.new_zeros(0, W)
        g_ids, g_lps = topk_from_features(target, G_last[b, :len(alts[b])] if alts[b] else F.new_zeros(0, H), k)
        out.append(RowFeatures(F[b, :len(s)], dists[b][0], dists[b][1], alts[b], g, g_ids, g_lps))
    return out


def feature_batch(target, rows: list[dict], *, k: int, feature_sampling: bool = False,
                  generator: torch.Generator | None = None, pad_id: int = 0,
                  aux_layers: list[int] | None = None) -> FeatureBatch:
    """Rows of the distillation set (`learner.distill.load_rows`) → one FeatureBatch (module docstring).

    k: the top-k kept per position (the set's stored rows are cut to k; rows that store fewer, and every
    re-drawn node, get the top-k of the target's own softmax(W F))."""
    feats = row_features(target, rows, k=k, feature_sampling=feature_sampling, generator=generator, pad_id=pad_id,
                         aux_layers=aux_layers)
    return collate(rows, feats, pad_id)


def collate(rows: list[dict], feats: list[RowFeatures], pad_id: int = 0) -> FeatureBatch:
    """Lay the rows out as draft nodes (data nodes 0 … L−2, then one node per re-drawn token)."""
    seqs = [list(r["prompt_token_ids"]) + list(r["response_token_ids"]) for r in rows]
    B, H = len(rows), feats[0].F.shape[-1]
    T = max(len(s) - 1 + len(f.alts) for s, f in zip(seqs, feats, strict=True))
    x = torch.zeros(B, T, H)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    allowed = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)  # padding nodes see themselves only
    loss = torch.zeros(B, T, dtype=torch.bool)
    k = feats[0].ids.shape[-1]
    next_ids = torch.zeros(B, T, k, dtype=torch.long)
    next_lps = torch.zeros(B, T, k)
    next_mask = torch.zeros(B, T, dtype=torch.bool)
    t_feat, t_ids, t_lps, sampled = [], [], [], []
    for b, (r, s, f) in enumerate(zip(rows, seqs, feats, strict=True)):
        P, L, m = len(r["prompt_token_ids"]), len(s), len(f.alts)
        n = L - 1  # data nodes
        x[b, :n] = f.F[:n].float()
        ids[b, :n] = torch.tensor(s[1:])
        pos[b, :n] = torch.arange(n)
        allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        redrawn = torch.tensor([d for d, _ in f.alts], dtype=torch.long)
        d = torch.arange(max(P - 2, 0), L - 2)  # loss nodes of the data: one per answer token r_j, j = d + 2 − P
        next_ids[b, d], next_lps[b, d], next_mask[b, d] = f.ids[d + 2 - P], f.lps[d + 2 - P].float(), True
        d = d[~torch.isin(d, redrawn)]
        loss[b, d] = True
        t_feat.append(f.F[d + 1].float())
        t_ids.append(f.ids[d + 2 - P])
        t_lps.append(f.lps[d + 2 - P].float())
        sampled.append(torch.zeros(len(d), dtype=torch.bool))
        for a, (da, xa) in enumerate(f.alts):
            i = n + a
            x[b, i], ids[b, i], pos[b, i] = f.F[da].float(), xa, da
            allowed[b, i, :da] = True
            loss[b, i] = True
        if m:
            t_feat.append(f.G.float())
            t_ids.append(f.g_ids)
            t_lps.append(f.g_lps.float())
            sampled.append(torch.ones(m, dtype=torch.bool))
    if not loss.any():
        raise ValueError("feature_batch: no loss position (answers need a prompt of ≥ 2 tokens or ≥ 2 answer tokens)")
    return FeatureBatch(x, ids, pos, allowed, loss, torch.cat(t_feat), torch.cat(t_ids).long(),
                        torch.cat(t_lps), torch.cat(sampled), next_ids, next_lps, next_mask)


PASS_ROWS = 16  # rows per target pass inside a store shard (length-sorted)


def row_seed(seed: int, index: int) -> int:
    """The feature-sampling seed of train row `index`: fixed for the store's lifetime."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0])


@torch.no_grad()
def compute_shard(target, rows: list[dict], first: int, *, k: int, feature_sampling: bool, seed: int,
                  pad_id: int = 0, pass_rows: int = PASS_ROWS, aux_layers: list[int] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Rows `first …` of the train set → one store shard's tensors (layout: `actors/feature_store.py`), in row order."""
    size = [len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=size.__getitem__)
    feats: list[RowFeatures | None] = [None] * len(rows)
    for lo in range(0, len(order), pass_rows):
        idx = order[lo:lo + pass_rows]
        gens = [torch.Generator().manual_seed(row_seed(seed, first + i)) for i in idx]
        for i, f in zip(idx, row_features(target, [rows[i] for i in idx], k=k, feature_sampling=feature_sampling,
                                          generator=gens, pad_id=pad_id, aux_layers=aux_layers), strict=True):
            feats[i] = f
    H = feats[0].F.shape[-1]
    alts = [torch.tensor(f.alts, dtype=torch.long).reshape(-1, 2) for f in feats]
    return {"lengths": torch.tensor([f.F.shape[0] for f in feats]),
            "answers": torch.tensor([f.ids.shape[0] for f in feats]),
            "n_alts": torch.tensor([len(f.alts) for f in feats]),
            "F": torch.cat([f.F for f in feats]).half(),
            "ids": torch.cat([f.ids for f in feats]).int(), "lps": torch.cat([f.lps for f in feats]).float(),
            "alts": torch.cat(alts), "G": torch.cat([f.G.reshape(-1, H) for f in feats]).half(),
            "g_ids": torch.cat([f.g_ids for f in feats]).int(), "g_lps": torch.cat([f.g_lps for f in feats]).float()}


def batch_seed(seed: int, step: int, rank: int) -> int:
    """The feature-sampling seed of one (step, rank) batch: the same on every run and resume."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class BranchScorer:
    """What the feature actors share for on-policy training (`draft.fspad.on_policy`): `score_branches(step, rank,
    world, branches)` → `branch_features` of the head's chains on that (step, rank) batch's rows, picked exactly as
    `batch` picks them. Needs `rows`, `B`, `k`, `pad_id`, `sampler`, `aux_layers` and `scoring_target()`."""

    aux_layers: list[int] | None = None

    def score_branches(self, step: int, rank: int, world: int,
                       branches: list[list[tuple[int, list[int]]]]) -> list[tuple[torch.Tensor, ...]]:
        idx = self.sampler.indices(step * self.B, self.B)[rank::world]
        return branch_features(self.scoring_target(), [self.rows[i] for i in idx], branches, k=self.k,
                               pad_id=self.pad_id, aux_layers=self.aux_layers)


class TargetFeatures(BranchScorer):
    """Ray actor (role: target, features): the HF target answering `batch(step, rank, world)` with that rank's
    FeatureBatch of that step. Rows of step s: global samples [s·B, (s+1)·B) of an endless chain of per-epoch
    permutations seeded by the job seed (draftalign.batching.BatchSampler); rank r takes every world-th."""

    def __init__(self, target_path: str, dtype: str, rows: list[dict], batch_size: int, k: int,
                 feature_sampling: bool, seed: int, threads: int = 1, aux_layers: list[int] | None = None):
        from draftalign.batching import BatchSampler
        from draftalign.models import load_causal_lm, load_tokenizer, pick_dtype

        torch.set_num_threads(max(1, threads))
        self.target = load_causal_lm(target_path, pick_dtype(dtype))
        self.pad_id = load_tokenizer(target_path).pad_token_id or 0
        self.rows, self.B, self.k, self.seed = rows, batch_size, k, seed
        self.feature_sampling, self.aux_layers = feature_sampling, aux_layers
        self.sampler = BatchSampler(len(rows), seed)

    def batch(self, step: int, rank: int, world: int) -> FeatureBatch:
        idx = self.sampler.indices(step * self.B, self.B)[rank::world]
        gen = torch.Generator().manual_seed(batch_seed(self.seed, step, rank))
        return feature_batch(self.target, [self.rows[i] for i in idx], k=self.k,
                             feature_sampling=self.feature_sampling, generator=gen, pad_id=self.pad_id,
                             aux_layers=self.aux_layers)

    def shard(self, rows: list[dict], first: int) -> dict[str, torch.Tensor]:
        """Rows `first …` of the train set as one feature-store shard (`actors/feature_store.py`)."""
        return compute_shard(self.target, rows, first, k=self.k, feature_sampling=self.feature_sampling,
                             seed=self.seed, pad_id=self.pad_id, aux_layers=self.aux_layers)

    def scoring_target(self):
        return self.target

    def fixed_batch(self, rows: list[dict]) -> FeatureBatch:
        """`rows` as they are (no re-drawn tokens): the held-out batch."""
        return feature_batch(self.target, rows, k=self.k, feature_sampling=False, pad_id=self.pad_id,
                             aux_layers=self.aux_layers)


def job_aux_layers(cfg, target_path: str) -> list[int] | None:
    """The aux layer ids the job's head reads (`draft.kind: eagle3`), None for the FSPAD head (the last feature):
    `draft.eagle3.aux_layers`, else those of the `draft.eagle3.init_from` checkpoint, else the default."""
    if cfg.draft.kind != "eagle3":
        return None
    import json
    from pathlib import Path

    from transformers import AutoConfig

    ids = cfg.draft.eagle3.aux_layers
    if ids is None and cfg.draft.eagle3.init_from:
        ids = json.loads((Path(cfg.draft.eagle3.init_from) / "config.json").read_text()).get(
            "eagle_aux_hidden_state_layer_ids")
    return resolve_aux_layers(ids, AutoConfig.from_pretrained(target_path).num_hidden_layers)


def create_feature_actors(cfg, target_path: str, rows_ref, name_prefix: str = "draftalign") -> list:
    """target.num_engines TargetFeatures actors, each sized like a target engine. A batch is a pure function
    of (step, rank), so Ray may restart an actor and retry a call."""
    import ray

    t = cfg.target
    cls = ray.remote(TargetFeatures)
    return [cls.options(num_cpus=t.cpus_per_engine, num_gpus=t.gpus_per_engine, resources=dict(t.resources),
                        max_restarts=2, max_task_retries=2, name=f"{name_prefix}-features-{i}").remote(
        target_path, t.dtype, rows_ref, cfg.rollout.batch_size, t.top_k_logprobs, cfg.draft.fspad.feature_sampling,
        cfg.seed, threads=max(1, math.ceil(t.cpus_per_engine - 1e-9)), aux_layers=job_aux_layers(cfg, target_path))
        for i in range(t.num_engines)]
