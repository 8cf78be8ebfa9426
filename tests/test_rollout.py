"""Rollout rows without Ray: short on-policy branches at prefixes of target answers, and the
sample ‖ score pipeline of `RolloutWorker.run` (a stand-in pool and queue; no Ray, no vLLM)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.rollout import RolloutWorker, branch_contexts, build_batch

TOP_K = 4


def _scores(seqs, starts, k=TOP_K, seed=0):
    """Well-formed random top-k scores for positions start..len(seq) − 1 of each sequence."""
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 1000, size=(len(s) - st, k)),
             "logprobs": np.log(rng.dirichlet(np.ones(k + 1), size=len(s) - st)[:, :k]).astype(np.float32)}
            for s, st in zip(seqs, starts, strict=True)]


class _Pool:
    """Stands in for TargetPool: submit records the request, collect answers it."""

    def __init__(self, events: list):
        self.events, self.failures = events, 0
        self.scored_tokens: dict[int, int] = {}  # TargetPool's per-engine count (rollout reports read it)

    def submit(self, seqs, starts, k):
        self.events.append("submit")
        return seqs, starts, k

    def collect(self, call, stop=None):
        self.events.append("collect")
        return _scores(*call)


class _Queue:
    def __init__(self, events: list):
        self.events, self.items = events, []

    def put(self, batch, block=True, timeout=None):
        self.events.append("put")
        self.items.append(batch)


def _rows(n: int, seed: int = 0, prompt_len=(3, 8), answer_len=(2, 12)) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        x = [rng.randrange(10, 5000) for _ in range(rng.randint(*prompt_len))]
        y = [rng.randrange(10, 5000) for _ in range(rng.randint(*answer_len))] + [2]  # EOS-terminated
        rows.append({"prompt_id": f"p{i}", "prompt_token_ids": x, "response_token_ids": y,
                     "target_ids": None, "target_logprobs": None})
    return rows


def _worker(path: str, rows: list[dict], **kw) -> RolloutWorker:
    args = dict(on_policy_fraction=1.0, temperature=1.0, max_new_tokens=4, batch_size=4, top_k=TOP_K, seed=0)
    w = RolloutWorker(0, path, rows, [], None, None, **{**args, **kw})  # store None: no Ray
    w.eos_id = 2  # the random answers end with token 2
    return w


def test_branch_contexts_cut_target_answers_where_the_branch_fits():
    rng = random.Random(0)
    prompts = [[1] * n for n in (3, 5, 10, 20)]
    answers = [list(range(100, 100 + n)) for n in (1, 6, 12, 30)]
    L, max_len = 4, 32
    seen = [set() for _ in prompts]
    for _ in range(300):
        for i, c in enumerate(branch_contexts(prompts, answers, L, max_len, rng)):
            x, y = prompts[i], answers[i]
            j = len(c) - len(x)
            assert c == x + y[:j] and 0 <= j <= len(y) - 1  # a proper prefix: y's EOS never in c
            assert len(c) + L < max_len  # the target can score c + branch
            seen[i].add(j)
    assert seen[0] == {0} and seen[1] == set(range(6)) and seen[2] == set(range(12))
    assert seen[3] == set(range(32 - 1 - 20 - L + 1))  # capped by max_len, uniform over what fits
    assert branch_contexts([[1] * 28], [[5, 6]], L, max_len, rng) == [None]  # no cut fits


def test_branch_rows_are_draft_samples_after_answer_prefixes(tiny_draft_path):
    """Branch mode: each on-policy row's prompt is x + y[:j], its response a draft branch of L tokens
    (L per batch within branch_tokens), its log-probs the draft's own; only the branch is scored and
    in loss_mask. A row too long for any branch replays."""
    rows = _rows(12)
    long_row = {**_rows(1, seed=9)[0], "prompt_id": "long", "prompt_token_ids": [7] * 60}  # 60 + 1 + L ≥ 61
    w = _worker(tiny_draft_path, rows + [long_row], on_policy_mode="branch", branch_tokens=(2, 4),
                max_model_len=61, batch_size=8)
    by_id = {r["prompt_id"]: r for r in rows + [long_row]}
    lengths, events = set(), []
    w.pool = _Pool(events)
    for _ in range(6):
        s = w.submit(w.sample())
        L = max(len(r) for r, f in zip(s.responses, s.flags, strict=True) if f)
        assert 2 <= L <= 4
        lengths.add(L)
        for i, (pick, c, br, f) in enumerate(zip(s.picks, s.prompts, s.responses, s.flags, strict=True)):
            x, y = pick["prompt_token_ids"], pick["response_token_ids"]
            if pick["prompt_id"] == "long":
                assert not f and c == x and br == y  # replayed as it is
                continue
            assert f and c[:len(x)] == x and c == x + y[:len(c) - len(x)] and len(c) - len(x) < len(y)
            assert 1 <= len(br) <= L and (len(br) == L or br[-1] == 2) and len(c) + len(br) < 61
            assert len(s.draft_lp[i]) == len(br)
        assert s.todo == list(range(len(s.picks)))  # nothing cached: every row goes to the target
        b = w.finish(s)
        for i, (c, br) in enumerate(zip(s.prompts, s.responses, strict=True)):
            assert b.loss_mask[i].nonzero()[0].tolist() == list(range(len(c), len(c) + len(br)))
            assert b.input_ids[i, :len(c) + len(br)].tolist() == c + br
            if s.flags[i]:
                np.testing.assert_allclose(b.draft_logprobs[i, len(c):len(c) + len(br)], s.draft_lp[i])
        assert b.on_policy.tolist() == s.flags and b.policy_version == w.version
        assert set(b.prompt_ids) <= set(by_id)
    assert len(lengths) > 1  # L varies across batches
    # the recorded log-probs are the draft's: log softmax(logits(c + branch)) at the branch tokens
    i = s.flags.index(True)
    c, br, lp = s.prompts[i], s.responses[i], s.draft_lp[i]
    with torch.no_grad():
        logits = w.model(torch.tensor([c + br])).logits[0, len(c) - 1:-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(br)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-4, rtol=1e-4)


def test_build_batch_trains_a_branch_row_on_its_branch_only():
    context, branch = [1, 5, 6, 8, 9], [11, 12, 13]  # prompt [1, 5, 6] + answer prefix [8, 9]
    b = build_batch([context, [1, 7]], [branch, [10, 2]], _scores([context + branch, [1, 7, 10, 2]], [5, 2]),
                    pad_id=0, on_policy=[True, False], draft_logprobs=[[-1.0, -2.0, -3.0], None])
    assert b.loss_mask.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0]]
    assert b.draft_logprobs[0, 5:].tolist() == [-1.0, -2.0, -3.0] and b.n_tokens == 5


def test_run_samples_the_next_batch_while_the_target_scores(tiny_draft_path):
    """run(): batch i+1 is sampled and submitted before batch i is collected and queued; each batch
    keeps the policy version that sampled it, and its timing shows the overlap."""
    events: list = []
    rows = _rows(8)
    prompt_len = {r["prompt_id"]: len(r["prompt_token_ids"]) for r in rows}
    w = _worker(tiny_draft_path, rows, on_policy_fraction=0.5)  # continuation mode (the default)
    w.pool, w.queue = _Pool(events), _Queue(events)
    w.store = SimpleNamespace(report=SimpleNamespace(remote=lambda *a: None))

    def sync_weights(wait=False):  # a new version before every batch
        w.version += 1
        return True

    sample = w.sample

    def recorded_sample():
        events.append(f"sample@{w.version}")
        return sample()

    w.sync_weights, w.sample = sync_weights, recorded_sample
    stats = w.run(max_batches=3)
    assert events == ["sample@1", "submit", "sample@2", "submit", "collect", "put",
                      "sample@3", "submit", "collect", "put", "collect", "put"]
    batches = w.queue.items
    assert stats["batches"] == 3 and [b.policy_version for b in batches] == [1, 2, 3]
    for b in batches:
        t = b.timing
        assert t["overlap_s"] == pytest.approx(t["score_s"] - t["score_wait_s"])
        assert t["total_s"] == pytest.approx(t["sample_s"] + t["score_s"])
        for i in np.flatnonzero(b.on_policy):  # continuation rows: everything after the prompt
            assert b.loss_mask[i].argmax() == prompt_len[b.prompt_ids[i]]
    assert batches[0].timing["overlap_s"] >= batches[1].timing["sample_s"] * 0.5  # scored while 1 sampled
    assert stats["sample_s"] > 0 and stats["score_s"] >= stats["score_wait_s"]

    # stop() while a batch is being scored: nothing more is queued and run returns
    events.clear()
    w.pool.collect = lambda call, stop=None: (w.stop(), None)[1]
    w.run()
    assert "put" not in events and len(w.queue.items) == 3
