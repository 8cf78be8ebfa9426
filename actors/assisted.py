"""Target-assisted on-policy rollouts (`rollout.on_policy_mode: target_assisted`; issue #38, after Draft-OPD,
arXiv 2605.29343): the rollout actor decodes a train prompt speculatively, so the draft is trained on the states
its own proposals create while the text stays the target's.

A round, for every live sequence of the batch at once (its context c = prompt + what the rounds committed):

    draft     x_1 … x_γ ~ q(· | c, x_<i)               (rollout.temperature, on the draft's vocabulary)
    target    one `TargetPool.score` call for all sequences: the top-k at the γ + 1 positions after c
              (c + x + one filler token, so the last row is the bonus position's distribution)
    verify    `draftalign.sampling.rejection_sample` with recorded uniforms u_i (greedy_verify at T = 0):
              accept x_i while u_i · q(x_i) < p̃(x_i); then the recovered token ~ norm(max(0, p̃ − q)), or the
              bonus ~ p̃ after γ acceptances; p̃ = the target's top-k renormalised and tempered (k = −1: exact)
    commit    x_1 … x_κ + that token, up to EOS / rollout.max_new_tokens: the continuation follows the target

so the committed text is the target's (sampling with top-k = target.top_k_logprobs; at T = 0 exactly its greedy
text). At T = 0 on a greedy distillation set whose rows carry the target's top-k (`stored_greedy`: `make run`'s),
every round lies on the stored answer, so the rounds follow from it with no engine call: the draft's argmax at each
answer position (one teacher-forced pass) against the stored argmax — x_i = a_{n+i−1} while the previous ones
matched, κ = the first mismatch, committed = the stored tokens n … n + κ (the target's token, or after γ the bonus),
the target's rows the stored top-k there. Such a record holds the tested proposals only (min(κ + 1, γ) of them, and
`scored: "stored"`): the ones after a rejection are never trained on. Only the re-drafts need the engine.

After the batch's rounds, up to rollout.redrafts_per_sequence rejection points per sequence (uniform among
its rounds that rejected) are re-drafted: from c + x_≤κ, the state where the draft erred, it drafts γ tokens again
at rollout.redraft_temperature, and the target scores them — the error positions, and the states the draft's own
proposals create after them.

Every round and re-draft is one round record (`actors.traffic.round_record`: the online path's format, plus `kind`
and the `uniforms`), and `actors.traffic.drafted_rows` turns them into training rows labelled by the proposals: a
sequence's rounds chained into one row (the committed text; loss at the accepted and the rejected proposals), and
one row per re-draft. A batch holds them next to the replayed rows (1 − rollout.on_policy_fraction of the picks,
the distillation set against forgetting) and goes through the bounded queue with its policy version, as the other
modes' batches do; the learner's sampled TVD++ rewards each proposal by 1{p(x) > q(x)} (learner/distill.py).
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from actors.rollout import RolloutWorker, _Sampled, cached_score, create_rollout_actors
from actors.traffic import drafted_rows, round_record
from draftalign.sampling import SamplingParams, draw, greedy_verify, logits_to_probs, rejection_sample


def target_probs(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """p̃ over the vocabulary from the target's top-k: (..., k) ids and raw log-probs → (..., V), p̃ ∝ p^(1/T) on the
    k listed tokens and 0 elsewhere (the truncation top-k sampling makes; k = V is exact). T = 0: one-hot argmax."""
    lp = logprobs.double()
    if temperature == 0:
        w = torch.nn.functional.one_hot(lp.argmax(-1), lp.shape[-1]).double()  # (..., k)
    else:
        w = torch.softmax(lp / temperature, -1)  # (..., k)
    return torch.zeros(*ids.shape[:-1], vocab_size, dtype=torch.float64).scatter_(-1, ids.long(), w)


def propose(model, contexts: list[list[int]], gamma: int, params: SamplingParams, pad_id: int,
            outside: torch.Tensor | None, generator: torch.Generator):
    """The draft's γ proposals for each context, batched with a KV cache (left padding), from scratch (a
    `DraftCache` of one round): tokens (B, γ) int64, q (B, γ, V) float32 the processed distribution each was drawn
    from (`logits_to_probs`, q = 0 outside the draft's vocabulary), log q(x) (B, γ)."""
    return DraftCache(model, contexts, pad_id).propose(list(range(len(contexts))), gamma, params, outside, generator)


class DraftCache:
    """The draft's KV cache across a batch's rounds, so a round feeds the draft only what the last round committed
    and not yet fed, then its γ − 1 proposals — not the whole context again (as `propose` does).

    The batch is left-padded once; each round appends a block of W = max pending columns (a row's pending tokens
    right-aligned, the slack masked) and then one column per proposal step. Proposals a round rejected stay in the
    cache as holes: their columns are masked out of the attention mask, and every token keeps its true position id
    (the mask, not the column, says what a query sees). Per row after a round with κ accepted of γ:

        in the cache   c, x_1 … x_min(κ, γ−1)       pending   the rest of what it committed (the recovered token;
                                                               after γ acceptances x_γ and the bonus)

    `propose(rows)` drafts for the batch rows still live (finished rows are dropped from the cache);
    `commit(committed, num_accepted)` then records, per row of that call, what the round kept."""

    def __init__(self, model, contexts: list[list[int]], pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.rows = list(range(len(contexts)))  # batch row → original index
        self.pending = [list(c) for c in contexts]  # not yet in the cache
        self.next_pos = [0] * len(contexts)  # position id of each row's next token
        self.attn = torch.zeros(len(contexts), 0, dtype=torch.long)  # (B, L) cache columns that are real tokens
        self.past = None

    def _keep(self, live: list[int]) -> None:
        if live == self.rows:
            return
        idx = [self.rows.index(s) for s in live]
        if self.past is not None:
            self.past.batch_select_indices(torch.tensor(idx, device=self.device))
        self.attn = self.attn[idx]
        self.pending = [self.pending[i] for i in idx]
        self.next_pos = [self.next_pos[i] for i in idx]
        self.rows = list(live)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, mask], 1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.attn.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float().cpu()  # (B, V)

    @torch.no_grad()
    def propose(self, live: list[int], gamma: int, params: SamplingParams, outside: torch.Tensor | None,
                generator: torch.Generator):
        """`propose`'s result for the contexts of rows `live` (original indices, in batch order)."""
        self._keep(live)
        B, W = len(self.rows), max(len(p) for p in self.pending)
        ids = torch.full((B, W), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, W, dtype=torch.long)
        pos = torch.zeros(B, W, dtype=torch.long)
        for b, p in enumerate(self.pending):
            ids[b, W - len(p):] = torch.tensor(p)
            mask[b, W - len(p):] = 1
            pos[b, W - len(p):] = torch.arange(self.next_pos[b], self.next_pos[b] + len(p))
            self.next_pos[b] += len(p)
        z = self._forward(ids, mask, pos)
        xs, qs = [], []
        for i in range(gamma):
            if outside is not None:
                z = z.masked_fill(outside, float("-inf"))
            q = logits_to_probs(z, params)  # (B, V)
            x = draw(q, params, generator)  # (B,)
            xs.append(x)
            qs.append(q)
            if i + 1 < gamma:
                z = self._forward(x[:, None], torch.ones(B, 1, dtype=torch.long),
                                  torch.tensor(self.next_pos)[:, None] + i)
        self.pending = [[] for _ in self.rows]
        x, q = torch.stack(xs, 1), torch.stack(qs, 1)  # (B, γ), (B, γ, V)
        self._gamma = gamma
        return x, q, q.gather(-1, x[..., None])[..., 0].clamp_min(1e-30).log()

    def commit(self, committed: list[list[int]], num_accepted: list[int]) -> None:
        """After the round: mask the rejected proposals' columns, queue what the cache still lacks."""
        g = self._gamma
        fed = g - 1  # x_1 … x_{γ−1} were fed, in the last γ − 1 columns
        for b, (out, kappa) in enumerate(zip(committed, num_accepted, strict=True)):
            kept = min(kappa, fed)
            if fed:
                self.attn[b, self.attn.shape[1] - fed + kept:] = 0  # x_{κ+1} … x_{γ−1}: holes
            self.pending[b] = list(out[kept:])
            self.next_pos[b] += kept


def verify(x: torch.Tensor, q: torch.Tensor, scores: list[dict], temperature: float, generator: torch.Generator):
    """The accept test of a round (`draftalign.sampling`): x (B, γ), q (B, γ, V), the target's top-k at the γ + 1
    positions per row → (num_accepted (B,), next token (B,), uniforms (B, γ) float64 or None at T = 0)."""
    ids = torch.stack([torch.as_tensor(s["ids"]) for s in scores])  # (B, γ+1, k)
    lps = torch.stack([torch.as_tensor(s["logprobs"]) for s in scores])  # (B, γ+1, k)
    if temperature == 0:
        argmax = ids.gather(-1, lps.argmax(-1, keepdim=True))[..., 0]  # (B, γ+1)
        k, nxt = greedy_verify(x, argmax)
        return k, nxt, None
    p = target_probs(ids, lps, q.shape[-1], temperature)  # (B, γ+1, V)
    u = torch.rand(x.shape, dtype=torch.float64, generator=generator)  # (B, γ)
    k, nxt = rejection_sample(x, q.double(), p, generator, uniforms=u)
    return k, nxt, u


class AssistedRolloutWorker(RolloutWorker):
    """`RolloutWorker` whose on-policy rows are target-assisted rollouts (module docstring). `last_records`: the
    round records of the latest batch (tests, benchmarks)."""

    MODES = ("target_assisted",)

    def __init__(self, *args, gamma: int = 3, redrafts_per_sequence: int = 2, redraft_temperature: float = 1.0,
                 stored_greedy: bool = False, **kw):
        kw.setdefault("on_policy_mode", "target_assisted")
        super().__init__(*args, **kw)
        if gamma < 1 or redrafts_per_sequence < 0 or redraft_temperature <= 0:
            raise ValueError(f"target_assisted needs gamma ≥ 1, redrafts_per_sequence ≥ 0 and redraft_temperature "
                             f"> 0, got {gamma}, {redrafts_per_sequence}, {redraft_temperature}")
        if self.lam > 0 and not self.pool.engines:
            raise ValueError("target_assisted rollouts need a TargetActor to verify the draft's proposals")
        self.gamma, self.redrafts, self.redraft_temperature = gamma, redrafts_per_sequence, redraft_temperature
        self.stored_greedy = stored_greedy  # the set's answers are the target's greedy text (module docstring)
        self.generator = torch.Generator().manual_seed(self.seed)
        V = self.model.config.vocab_size
        self.outside = None
        if self.draft_vocab is not None:
            self.outside = torch.ones(V, dtype=torch.bool)
            self.outside[torch.tensor(self.draft_vocab)] = False
        self.last_records: list[dict] = []
        self.counters.update({"rounds": 0, "proposed": 0, "accepted": 0, "rejections": 0, "redrafts": 0,
                              "committed": 0, "target_positions": 0, "stored_rounds": 0})

    def _params(self, temperature: float) -> SamplingParams:
        return SamplingParams(temperature=temperature)

    def _score(self, contexts: list[list[int]], x: torch.Tensor) -> tuple[list[dict], float]:
        """The target's top-k at the γ + 1 positions after each context (a filler token after x_γ makes the last
        row the bonus position's distribution); returns (scores, seconds waited)."""
        t0 = time.perf_counter()
        seqs = [list(c) + x[i].tolist() + [self.pad_id] for i, c in enumerate(contexts)]
        scores = self.pool.score(seqs, [len(c) for c in contexts], self.top_k, prefix_cache=True)
        self.counters["target_positions"] += sum(len(s) - len(c) for s, c in zip(seqs, contexts, strict=True))
        return scores, time.perf_counter() - t0

    def rollout(self, prompts: list[list[int]], tag: str,
                rows: list[dict] | None = None) -> tuple[list[list[int]], list[dict], float]:
        """Target-assisted decoding of `prompts`: (continuations, round records incl. re-drafts, target seconds).
        `rows`: the set's rows of those prompts — at T = 0 on a stored greedy set the rounds come from them."""
        if (self.temperature == 0 and self.stored_greedy and rows is not None
                and all(cached_score(r, self.top_k) is not None for r in rows)):
            new, records = self._stored_rounds(rows, tag)
            redrafts, target_s = self._redraft(records)
            self.counters["committed"] += sum(len(n) for n in new)
            return new, records + redrafts, target_s
        g, T, stop_len = self.gamma, self.temperature, self.max_new_tokens
        ctx = [list(p) for p in prompts]
        done = [len(c) + g + 1 >= self.max_len for c in ctx]  # the target scores c + γ + 1 tokens
        new: list[list[int]] = [[] for _ in prompts]
        records: list[dict] = []
        target_s = 0.0
        cache = DraftCache(self.model, ctx, self.pad_id)
        while not all(done):
            live = [s for s in range(len(ctx)) if not done[s]]
            x, q, log_qx = cache.propose(live, g, self._params(T), self.outside, self.generator)
            scores, dt = self._score([ctx[s] for s in live], x)
            target_s += dt
            k, nxt, u = verify(x, q, scores, T, self.generator)
            kept = []
            for j, s in enumerate(live):
                kappa = int(k[j])
                out = x[j, :kappa].tolist() + [int(nxt[j])]
                if self.eos_id in out:
                    out = out[:out.index(self.eos_id) + 1]
                out = out[:stop_len - len(new[s])]
                records.append(round_record(
                    f"{tag}.{s}", ctx[s], x[j], log_qx[j], scores[j]["ids"], scores[j]["logprobs"], out, kappa,
                    self.version, T, kind="round", uniforms=None if u is None else u[j].numpy()))
                self.counters["proposed"] += g
                self.counters["accepted"] += kappa
                self.counters["rejections"] += kappa < g
                kept.append(out)
                ctx[s] += out
                new[s] += out
                done[s] = (out[-1] == self.eos_id or len(new[s]) >= stop_len or len(ctx[s]) + g + 1 >= self.max_len)
            cache.commit(kept, k.tolist())
            self.counters["rounds"] += 1
        redrafts, dt = self._redraft(records)
        records += redrafts
        target_s += dt
        self.counters["committed"] += sum(len(n) for n in new)
        return new, records, target_s

    @torch.no_grad()
    def _stored_rounds(self, rows: list[dict], tag: str) -> tuple[list[list[int]], list[dict]]:
        """The greedy rounds of each row's prompt, read off its stored answer (module docstring): (continuations,
        round records with `scored: "stored"`). A stored answer is used up to its end, rollout.max_new_tokens, the
        context limit, or the first position whose stored token is not the stored top-k's maximum (past it the text
        is not greedy)."""
        g, stop_len = self.gamma, self.max_new_tokens
        device = next(self.model.parameters()).device
        records, continuations = [], [[] for _ in rows]
        for s, row in enumerate(rows):
            prompt, R = list(row["prompt_token_ids"]), np.asarray(row["response_token_ids"], np.int64)
            sc = cached_score(row, self.top_k)
            ids, lps = np.asarray(sc["ids"]), np.asarray(sc["logprobs"])  # (L, k)
            L = min(len(R), len(ids), stop_len + g + 1, self.max_len - len(prompt) - 1)
            # the stored token is the target's argmax there (a tie counts: vLLM picked that token)
            lp_r = np.where(ids[:L] == R[:L, None], lps[:L], -np.inf).max(-1)  # (L,) −inf: not in the top-k
            off = np.nonzero(lp_r < lps[:L].max(-1))[0]
            L = int(off[0]) if len(off) else L
            if L < 1:
                continue
            z = self.model(input_ids=torch.tensor([prompt + R[:L - 1].tolist()], device=device)).logits[0]
            z = z[len(prompt) - 1:].float().cpu()  # (L, V): row t predicts R[t]
            if self.outside is not None:
                z = z.masked_fill(self.outside, float("-inf"))
            a = z.argmax(-1).numpy()  # the draft's greedy proposal at each answer position
            n, new = 0, continuations[s]
            while n < L and len(new) < stop_len:
                ge = min(g, L - n)  # proposals testable on the stored answer
                match = a[n:n + ge] == R[n:n + ge]
                kappa = int(ge if match.all() else np.argmin(match))
                m = kappa + 1 if n + kappa < L else kappa  # + the target's token (or the bonus), where stored
                out = R[n:n + m].tolist()
                if self.eos_id in out:
                    out = out[:out.index(self.eos_id) + 1]
                out = out[:stop_len - len(new)]
                tested = a[n:n + min(kappa + 1, ge)]
                records.append(round_record(
                    f"{tag}.{s}", prompt + R[:n].tolist(), tested, np.zeros(len(tested), np.float32),
                    ids[n:n + len(out)], lps[n:n + len(out)], out, kappa, self.version, 0.0, kind="round",
                    uniforms=None, scored="stored"))
                self.counters["stored_rounds"] += 1
                self.counters["proposed"] += ge
                self.counters["accepted"] += kappa
                self.counters["rejections"] += kappa < ge
                n += len(out)
                new += out
                if out[-1] == self.eos_id:
                    break
        return continuations, records

    def _redraft(self, rounds: list[dict]) -> tuple[list[dict], float]:
        """Re-drafts from up to `redrafts_per_sequence` rejection points per sequence (module docstring):
        (their records, seconds waited on the target)."""
        by: dict[str, list[dict]] = {}
        for r in rounds:  # a rejection whose position was committed (not cut by EOS / max_new_tokens before it)
            if r["num_accepted"] < len(r["draft_tokens"]) and len(r["committed"]) > r["num_accepted"]:
                by.setdefault(r["request"], []).append(r)
        picked = [r for rs in by.values() for r in self.rng.sample(rs, min(self.redrafts, len(rs)))]
        if not picked:
            return [], 0.0
        T = self.redraft_temperature
        contexts = [list(r["context"]) + list(r["draft_tokens"][:r["num_accepted"]]) for r in picked]
        y, q, log_qy = propose(self.model, contexts, self.gamma, self._params(T), self.pad_id, self.outside,
                               self.generator)
        scores, waited = self._score(contexts, y)
        k, nxt, u = verify(y, q, scores, T, self.generator)
        out = []
        for j, (r, c) in enumerate(zip(picked, contexts, strict=True)):
            kappa = int(k[j])
            out.append(round_record(f"{r['request']}.r{j}", c, y[j], log_qy[j], scores[j]["ids"],
                                    scores[j]["logprobs"], y[j, :kappa].tolist() + [int(nxt[j])], kappa,
                                    self.version, T, kind="redraft", uniforms=u[j].numpy(), parent=r["request"]))
        self.counters["redrafts"] += len(out)
        return out, waited

    def sample(self) -> _Sampled:
        """Pick rows, flip the on-policy coins; on-policy picks become target-assisted rollouts, already scored
        (their rows: `actors.traffic.drafted_rows`), the rest replay the set."""
        t0 = time.perf_counter()
        picks = [self.rng.choice(self.rows) for _ in range(self.batch_size)]
        flags = [self.rng.random() < self.lam for _ in picks]
        on = [r for r, f in zip(picks, flags, strict=True) if f]
        off = [r for r, f in zip(picks, flags, strict=True) if not f]
        records, target_s, tag = [], 0.0, ""
        if on:
            tag = f"{self.actor_id}.{self.incarnation}.{self.counters['batches'] + self.counters['rounds']}"
            _, records, target_s = self.rollout([list(r["prompt_token_ids"]) for r in on], tag, rows=on)
        self.last_records = records
        rows = drafted_rows(records)
        n_on = len(rows["prompts"])
        prompts = rows["prompts"] + [list(r["prompt_token_ids"]) for r in off]
        responses = rows["responses"] + [list(r["response_token_ids"]) for r in off]
        cached = rows["scores"] + [cached_score(r, self.top_k) for r in off]
        pid = {f"{tag}.{s}": r.get("prompt_id", "") for s, r in enumerate(on)} if on else {}
        picks_out = [{"prompt_id": pid[req]} for req in rows["requests"]] + off
        s = _Sampled(picks_out, prompts, responses, [True] * n_on + [False] * len(off),
                     rows["draft_logprobs"] + [None] * len(off), cached, self.version,
                     time.perf_counter() - t0, target_s=target_s)
        s.loss_masks = rows["loss_masks"] + [None] * len(off)
        s.sampled = rows["sampled"] + [None] * len(off)
        return s


AssistedRolloutActor = ray.remote(max_concurrency=2)(AssistedRolloutWorker)  # run() | stop() / stats()


def create_assisted_actors(cfg, draft_path: str, rows_ref, engines: list, queue, store,
                           name_prefix: str | None = None, draft_vocab: list[int] | None = None,
                           stored_greedy: bool = False) -> list:
    """`create_rollout_actors` with target-assisted rollout actors (rollout.gamma, rollout.redrafts_per_sequence,
    rollout.redraft_temperature; stored_greedy: the set's answers are the target's greedy text)."""
    r = cfg.rollout
    return create_rollout_actors(cfg, draft_path, rows_ref, engines, queue, store, name_prefix=name_prefix,
                                 draft_vocab=draft_vocab, actor_cls=AssistedRolloutActor, gamma=r.gamma,
                                 redrafts_per_sequence=r.redrafts_per_sequence,
                                 redraft_temperature=r.redraft_temperature, stored_greedy=stored_greedy)
