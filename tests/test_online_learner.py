"""The online learner (learner/online.py) with real components: local Ray, a RoundBuffer fed by a real engine's
capture, the learner actor training with stage 3's step, a Serve endpoint that hot-swaps the learner's versions.

Models: the tiny peaked target (tests/distill_helpers.py) and, as the served draft, an anti-draft: the tiny target
before peaking with its final norm negated (argmax q = argmin p: never accepted at first, and soft enough to learn;
a random tiny Llama would echo its input token as the peaked target does, and be accepted already). The replay set
is the target's own greedy answers to other prompts with its top-k at every position (what stage 2 records).
Greedy answers are compared with target-only decoding (`SpecDecoder.generate_target_only`) in this process.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cluster_helpers import free_port
from distill_helpers import peaked_target_fixture  # noqa: F401 - fixture

from draftalign.sampling import SamplingParams

GAMMA = 3
TOP_K = 8
CONTEXT = 512
NAMESPACE = "draftalign-test-learner"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot", "1, 2, 3, 4, 5,",
           "My favourite food is", "The weather today", "import numpy as np", "Dear team, thank you"]
REPLAY_PROMPTS = ["Hello there, how are", "A list of fruits:", "In 1999 the", "The quick brown fox",
                  "Rain falls on", "Water boils at", "Let me explain why", "Here is my plan"]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _weights(model) -> dict:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def write_scored_set(run_dir, target_path: str, tok, prompts: list[str], answer_tokens: int = 16) -> None:
    """A finished distillation set (actors.generate's layout) of the target's greedy answers, with its top-k log-probs
    at every answer position, as stage 2 records them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from draftalign.distset import SCHEMA
    from draftalign.models import load_causal_lm

    target = load_causal_lm(target_path)
    cols = {f.name: [] for f in SCHEMA}
    for i, text in enumerate(prompts):
        x = _ids(tok, text)
        with torch.no_grad():
            seq = target.generate(torch.tensor([x]), do_sample=False, max_new_tokens=answer_tokens,
                                  pad_token_id=tok.pad_token_id)[0].tolist()
            lp = torch.log_softmax(target(torch.tensor([seq])).logits[0, len(x) - 1: -1].float(), -1)  # (R, V)
        top_lp, top_ids = lp.topk(TOP_K, -1)
        y = seq[len(x):]
        for key, v in (("prompt_id", f"replay-{i}"), ("prompt", text), ("prompt_token_ids", x),
                       ("response_token_ids", y), ("response_text", tok.decode(y)), ("finish_reason", "length"),
                       ("response_index", 0), ("target_topk_ids", top_ids.flatten().tolist()),
                       ("target_topk_logprobs", top_lp.flatten().tolist())):
            cols[key].append(v)
    d = run_dir / "distill_set"
    d.mkdir(parents=True)
    pq.write_table(pa.table(cols, schema=SCHEMA), d / "part-00000.parquet")
    (d / "metadata.json").write_text(json.dumps({"rows": len(prompts), "by": "tests/test_online_learner.py"}))


def _cfg(run_dir, target: str, name: str, learner: dict | None = None, **online):
    from draftalign.config import JobConfig

    return JobConfig.model_validate({
        "name": name, "run_dir": str(run_dir), "seed": 0,
        "target": {"model": target, "dtype": "float32", "max_model_len": CONTEXT, "top_k_logprobs": TOP_K},
        "distill": {"loss": "fkl"},  # the local job's loss; the learner runs any distill.loss
        "serve": {"port": free_port(), "gamma": GAMMA, "gamma_policy": "fixed", "max_tokens_cap": 400,
                  "max_batch_size": 8, "batch_wait_timeout_s": 0.02, "cpus_per_replica": 1,
                  "online": {"enabled": True, "top_k_logprobs": TOP_K, "buffer_name": f"{name}-buffer",
                             "namespace": NAMESPACE, "push_every": 4, "push_interval_s": 0.2,
                             "weight_store": f"{name}-weights", "poll_interval_s": 0.2, "rollback_window": 8,
                             "rollback_margin": 1.0,  # never roll back: these tests follow the learner's versions
                             **online,
                             "learner": {"enabled": True, "records_per_step": 16, "replay_fraction": 0.25,
                                         "steps_per_publish": 2, "lr": 3e-2, "max_steps": 4, "poll_interval_s": 0.1,
                                         "cpus": 0.5, "gate": False,  # on in the gate's own test
                                         **(learner or {})}}}})


# ---------------------------------------------------------------------- config and batch (no Ray)
@pytest.mark.parametrize("sets, match", [
    (["serve.online.learner.enabled=true"], "set serve.online.enabled=true and serve.online.weight_store"),
    (["serve.online.enabled=true", "serve.online.learner.enabled=true"], "serve.online.weight_store"),
    (["serve.online.learner.replay_fraction=1"], "replay_fraction"),
    (["serve.online.learner.steps_per_publish=0"], "steps_per_publish"),
    (["serve.online.learner.epochs=0"], "epochs"),
    (["serve.online.enabled=true", "serve.online.weight_store=w", "serve.online.learner.enabled=true",
      "distill.form=sampled"], "distill.form=exact"),
])
def test_bad_learner_config_names_the_field(sets, match):
    from draftalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_replay_without_a_scored_set_is_a_config_error(tmp_path, tiny_target_path):
    from draftalign.config import ConfigError
    from learner.online import replay_rows

    cfg = _cfg(tmp_path / "run", tiny_target_path, "no-set")
    with pytest.raises(ConfigError, match="replay_fraction=0.25 .* set serve.online.learner.replay_fraction=0"):
        replay_rows(cfg, TOP_K)
    assert replay_rows(_cfg(tmp_path / "run", tiny_target_path, "no-set", {"replay_fraction": 0}), TOP_K) == []


def _round(request: str, context: list[int], kept: list[int], accepted: int, version: int = 0, seed: int = 0) -> dict:
    """A hand-made round record (`actors.traffic.round_records`' format) with distinct top-k rows."""
    rng = np.random.default_rng(seed)
    return {"request": request, "context": np.asarray(context, np.int32), "start": len(context),
            "draft_tokens": np.asarray(kept[:accepted] + [900 + i for i in range(GAMMA - accepted)], np.int32)[:GAMMA],
            "draft_logprobs": -rng.random(GAMMA).astype(np.float32),
            "target_ids": rng.permutation(1000)[: (GAMMA + 1) * TOP_K].reshape(GAMMA + 1, TOP_K).astype(np.int32),
            "target_logprobs": np.sort(rng.normal(size=(GAMMA + 1, TOP_K)).astype(np.float32))[:, ::-1],
            "committed": np.asarray(kept, np.int32), "num_accepted": accepted, "policy_version": version,
            "temperature": 0.0, "time": 0.0}


def test_rounds_of_interleaved_requests_become_one_row_each():
    """`request_records` on a hand-made history of two interleaved requests: each request is one row, its tokens
    the served sequence, its loss positions exactly the positions its rounds scored on that sequence (accepted
    proposals, then the recovered or bonus token) with those rounds' top-k rows; rows after a rejection and past a
    stop are dropped, and a token emitted by a round without a draft (γ = 0) stays unscored."""
    from actors.traffic import request_records, to_rollout_batch

    a = [_round("0.0", [11, 12, 13], [21, 31], accepted=1, seed=1),  # 22 rejected: 31 recovered
         _round("0.0", [11, 12, 13, 21, 31], [24, 25, 26, 32], accepted=3, seed=2),  # all accepted + bonus 32
         _round("0.0", [11, 12, 13, 21, 31, 24, 25, 26, 32], [27], accepted=2, version=1, seed=3)]  # stop at 27
    b = [_round("0.1", [41, 42], [51], accepted=0, seed=4),
         _round("0.1", [41, 42, 51, 52], [53, 54], accepted=1, seed=5)]  # 52: a γ = 0 round, not observed
    history = [a[0], b[0], a[1], b[1], a[2]]
    ra, rb = request_records(history)
    assert ra["request"] == "0.0" and rb["request"] == "0.1"
    assert ra["tokens"].tolist() == [11, 12, 13, 21, 31, 24, 25, 26, 32, 27]
    assert ra["positions"].tolist() == [3, 4, 5, 6, 7, 8, 9]
    rows_a = [(a[0], 0), (a[0], 1), (a[1], 0), (a[1], 1), (a[1], 2), (a[1], 3), (a[2], 0)]  # (round, row i)
    assert np.array_equal(ra["target_ids"], np.stack([r["target_ids"][i] for r, i in rows_a]))
    assert np.array_equal(ra["target_logprobs"], np.stack([r["target_logprobs"][i] for r, i in rows_a]))
    q = [a[0]["draft_logprobs"][0], 0, *a[1]["draft_logprobs"], 0, a[2]["draft_logprobs"][0]]  # 0: not drafted
    np.testing.assert_array_equal(ra["draft_logprobs"], np.asarray(q, np.float32))
    assert ra["draft_versions"].tolist() == [0] * 6 + [1] and ra["policy_version"] == 0
    assert (ra["rounds"], ra["accepted"]) == (3, 1 + 3 + 1)
    assert rb["tokens"].tolist() == [41, 42, 51, 52, 53, 54] and rb["positions"].tolist() == [2, 4, 5]
    assert np.array_equal(rb["target_ids"], np.stack([b[0]["target_ids"][0], *b[1]["target_ids"][:2]]))
    # In the batch, each request is one row: its sequence once, the loss at exactly its scored positions.
    batch = to_rollout_batch([ra, rb], pad_id=0)
    assert batch.input_ids.shape[0] == 2 and batch.n_tokens == 7 + 3
    for i, r in enumerate((ra, rb)):
        assert batch.input_ids[i, : len(r["tokens"])].tolist() == r["tokens"].tolist()
        assert np.flatnonzero(batch.loss_mask[i]).tolist() == r["positions"].tolist()
        assert np.array_equal(batch.target_ids[i, r["positions"]], r["target_ids"])
        np.testing.assert_array_equal(batch.draft_logprobs[i, r["positions"]], r["draft_logprobs"])
    # A request closed mid-call (`RoundCapture.flush`) continues in a new record: the same rows, two records.
    first, rest = request_records(history[:3]), request_records(history[3:])
    assert [r["positions"].tolist() for r in first + rest] == [[3, 4, 5, 6, 7, 8], [2], [4, 5], [9]]


def test_mixed_batch_places_served_rows_and_replayed_spans(tmp_path, peaked_target, target_tokenizer):
    """Served records become on-policy rows (one per request: its sequence, the loss at its scored positions);
    n_s · f / (1 − f) replayed rows are spans of the target's answers carrying the top-k recorded at exactly
    those positions."""
    from actors.traffic import request_records
    from learner.online import mixed_batch, replay_rows

    run = tmp_path / "run"
    write_scored_set(run, peaked_target, target_tokenizer, REPLAY_PROMPTS[:4], answer_tokens=8)
    rows = replay_rows(_cfg(run, peaked_target, "mix"), TOP_K)
    assert len(rows) == 4 and rows[0]["target_ids"].shape[1] == TOP_K
    rng = np.random.default_rng(0)
    history = []
    for i in range(6):  # request i: two rounds, accepting i % 4 then 0
        context = rng.integers(10, 999, 5 + i).tolist()
        kept = rng.integers(10, 999, min(i % 4, GAMMA) + 1).tolist()
        history += [_round(f"0.{i}", context, kept, accepted=len(kept) - 1, seed=i),
                    _round(f"0.{i}", context + kept, [7], accepted=0, seed=10 + i)]
    records = request_records(history)
    b = mixed_batch(records, rows, 0.25, TOP_K, pad_id=0, rng=random.Random(0))
    assert list(b.on_policy) == [True] * 6 + [False] * 2  # round(6 · 0.25 / 0.75) = 2 replayed rows
    assert b.loss_mask[6:].sum(1).min() >= 1  # a span may end with y
    for i, r in enumerate(records):
        assert list(b.input_ids[i, : len(r["tokens"])]) == list(r["tokens"])
        assert np.flatnonzero(b.loss_mask[i]).tolist() == r["positions"].tolist() == list(
            range(5 + i, len(r["tokens"])))  # every served token was scored
        assert np.array_equal(b.target_ids[i, r["positions"]], r["target_ids"])
    by_ids = {tuple(r["prompt_token_ids"]): r for r in rows}
    for i in (6, 7):
        pos = np.flatnonzero(b.loss_mask[i])
        seq = b.input_ids[i, : pos[-1] + 1].tolist()
        r = next(r for p, r in by_ids.items() if tuple(seq[: len(p)]) == p)
        j = pos[0] - len(r["prompt_token_ids"])  # the cut: the span is y[j : j + γ]
        assert seq[len(r["prompt_token_ids"]):] == r["response_token_ids"][: j + len(pos)]
        assert np.array_equal(b.target_ids[i, pos], r["target_ids"][j: j + len(pos)])
        assert not b.draft_logprobs[i].any()


# ---------------------------------------------------------------------- real Ray: the learner on captured rounds
@pytest.fixture(scope="module")
def anti_draft(tmp_path_factory, tiny_target_path, target_tokenizer) -> str:
    from draftalign.models import load_causal_lm, save_pretrained_atomic

    lm = load_causal_lm(tiny_target_path)
    with torch.no_grad():
        lm.model.norm.weight.neg_()  # logits → −logits: the peaked target's least likely token, softly
    return str(save_pretrained_atomic(lm, target_tokenizer, tmp_path_factory.mktemp("models") / "anti-draft"))


@pytest.fixture(scope="module")
def ray_local():
    from draftalign.runtime import init_ray

    ray = init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def learned(ray_local, tmp_path_factory, peaked_target, anti_draft, target_tokenizer):
    """A real engine serves 8 greedy prompts with capture on; the learner actor collects the captured requests 2 at a
    time (one row each, + replay), steps twice on each collection (epochs 2: 8 steps) and publishes versions 1 … 4,
    each grabbed from the store as it appears."""
    from actors.traffic import OnlineSettings, get_buffer
    from draftalign.models import load_causal_lm
    from learner.online import start_online_learner
    from serve.online import RoundCapture
    from serve.specdec import SpecDecoder

    ray = ray_local
    run = tmp_path_factory.mktemp("learned") / "run"
    write_scored_set(run, peaked_target, target_tokenizer, REPLAY_PROMPTS)
    cfg = _cfg(run, peaked_target, "learned", {"records_per_step": 2, "epochs": 2, "max_steps": 8})
    target, draft = load_causal_lm(peaked_target), load_causal_lm(anti_draft)
    buffer = get_buffer(OnlineSettings.from_config(cfg))
    capture = RoundCapture(buffer, TOP_K, push_every=10**6, push_interval_s=60)  # one push, at flush()
    decoder = SpecDecoder(target, draft, target_tokenizer, gamma=GAMMA)
    decoder.observer, decoder.call_done = capture.observe, capture.call_done
    prompts = [_ids(target_tokenizer, p) for p in PROMPTS]
    decoder.generate(prompts, SamplingParams(max_new_tokens=12))
    capture.flush()
    capture.wait()
    records = ray.get(buffer.get_batch.remote(10**6))  # a copy to evaluate on, put back for the learner
    ray.get(buffer.put.remote(records))
    assert capture.counts["dropped_in_replica"] == 0 and len(records) == 8, (capture.counts, len(records))
    t0 = time.perf_counter()
    actor, run_ref = start_online_learner(cfg, anti_draft)
    store = ray.get_actor(cfg.serve.online.weight_store, namespace=NAMESPACE)
    versions, deadline = {}, time.time() + 120
    while not ray.wait([run_ref], timeout=0.05)[0] and time.time() < deadline:
        got = ray.get(store.latest.remote(max(versions, default=0)))
        if got is not None:
            versions[got[0]] = ray.get(got[1][0])
    ray.get(actor.stop.remote())
    stats = ray.get(run_ref)
    got = ray.get(store.latest.remote(max(versions, default=0)))
    if got is not None:
        versions[got[0]] = ray.get(got[1][0])
    yield SimpleNamespace(cfg=cfg, records=records, stats=stats, versions=versions, v0=_weights(draft),
                          seconds=time.perf_counter() - t0, buffer=buffer)
    for h in (actor, buffer, store):
        ray.kill(h)


def test_learner_trains_on_captured_rounds_and_publishes_versions(learned, anti_draft):
    from actors.traffic import to_rollout_batch
    from draftalign.models import load_causal_lm
    from draftalign.weights import check_and_load_weights
    from learner.distill import ResponseLogits, evaluate_heldout

    st, n = learned.stats, len(learned.records)
    assert n == 8  # one record per request
    for r in learned.records:  # one round per token: the anti-draft is never accepted; every token scored
        assert r["rounds"] == len(r["positions"]) == 12 and r["accepted"] == 0
    assert st["step"] == 8 and [p["version"] for p in st["published"]] == [1, 2, 3, 4] == sorted(learned.versions)
    assert [p["step"] for p in st["published"]] == [2, 4, 6, 8]  # every steps_per_publish steps
    assert st["records"] == 4 * 2 and st["records_per_version"] == {0: 4 * 2}  # each record counted once
    assert st["served_tokens"] == 8 * 12 and st["replayed_rows"] == 8 * 1  # round(2 · 0.25 / 0.75) per step
    assert learned.seconds < 60
    for v in (1, 2):
        assert any(not np.array_equal(w, learned.v0[k]) for k, w in learned.versions[v].items())
    # Teacher-forced acceptance 1 − TVD(p, q) of the draft on the served positions rises with the learned weights.
    batch = to_rollout_batch(learned.records, pad_id=0)
    draft = load_causal_lm(anti_draft)
    before = evaluate_heldout(ResponseLogits(draft), batch, torch.device("cpu"), None)
    check_and_load_weights(draft, learned.versions[4])
    after = evaluate_heldout(ResponseLogits(draft), batch, torch.device("cpu"), None)
    assert after["heldout_acceptance"] > 1.5 * before["heldout_acceptance"], (before, after)
    assert after["heldout_greedy_acceptance"] > before["heldout_greedy_acceptance"] == 0, (before, after)


@pytest.mark.parametrize("arm", ["better", "worse"])
def test_gate_publishes_a_better_version_and_holds_back_a_worse_one(arm, learned, ray_local, tmp_path, peaked_target,
                                                                     anti_draft, target_tokenizer):
    """The gate's mechanics on the `learned` fixture's served requests, each put into the buffer twice so that the
    served probe (every 2nd record: 3 by step 8) holds copies of requests the learner trains on — on so little
    traffic a held-out request would show no learning. 2 collections × 4 epochs, a gate every 4 steps.
    better: from the anti-draft at lr 3e-2 the first candidate fits the probe better than version 0 and is
    published; every verdict is `gate_verdict` of the pairs it records. worse: from the target itself (a perfect
    draft, a = 1) at lr 10, training can only lose: both candidates are held back and nothing is published."""
    from learner.online import OnlineLearnerWorker, gate_verdict, replay_rows

    run = tmp_path / "run"
    write_scored_set(run, peaked_target, target_tokenizer, REPLAY_PROMPTS)
    cfg = _cfg(run, peaked_target, f"gate-{arm}", {"records_per_step": 2, "epochs": 4, "max_steps": 8, "gate": True,
                                                    "steps_per_publish": 4, "probe_every": 2,
                                                    "lr": 3e-2 if arm == "better" else 10.0})
    rows = replay_rows(cfg, TOP_K)
    worker = OnlineLearnerWorker(cfg.model_dump(mode="json"), anti_draft if arm == "better" else peaked_target,
                                 rows, heldout=rows)  # the replayed rows double as the replay probe here
    try:
        ray_local.get(worker.buffer.put.remote([r for r in learned.records for _ in range(2)]))
        st = worker.run()
    finally:
        for h in (worker.buffer, worker.store):
            ray_local.kill(h)
    gates = st["gates"]
    assert st["step"] == 8 and st["probe_records"] == 3 and [g["step"] for g in gates] == [4, 8]
    assert [g["probe_records"] for g in gates] == [1, 3] and all(g["greedy"] for g in gates)
    assert all(set(g["candidate"]) == {"served", "replay"} for g in gates)
    if arm == "better":
        assert gates[0]["publish"] and gates[0]["candidate"]["served"] > gates[0]["published"]["served"], gates
        assert all(g["publish"] == gate_verdict(g["candidate"], g["published"], 0.01) for g in gates), gates
        published = [g["step"] for g in gates if g["publish"]]
        assert [p["step"] for p in st["published"]] == published and st["held_back"] == 2 - len(published)
        assert [p["version"] for p in st["published"]] == list(range(1, len(published) + 1))
    else:
        assert st["published"] == [] and st["held_back"] == 2
        assert all(g["published"]["served"][0] == 1.0 and g["candidate"]["served"] < g["published"]["served"]
                   for g in gates), gates  # (a, b): lower a, or a tie at 1 and lower b


def test_served_pool_mixes_earlier_requests_into_each_step(learned, ray_local, tmp_path, peaked_target, anti_draft,
                                                            target_tokenizer):
    """served_pool 4, 2 records per step, 2 epochs, 4 collections of the `learned` fixture's requests: the first
    collection's steps have no earlier record, each later step draws 2 from the last ≤ 4 trained on, and the pool
    ends holding the newest 4."""
    from learner.online import OnlineLearnerWorker, replay_rows

    run = tmp_path / "run"
    write_scored_set(run, peaked_target, target_tokenizer, REPLAY_PROMPTS)
    cfg = _cfg(run, peaked_target, "pool", {"records_per_step": 2, "epochs": 2, "max_steps": 8, "served_pool": 4})
    worker = OnlineLearnerWorker(cfg.model_dump(mode="json"), anti_draft, replay_rows(cfg, TOP_K))
    try:
        recs = learned.records
        for i in range(0, 8, 2):
            worker.train_on(recs[i: i + 2])
    finally:
        for h in (worker.buffer, worker.store):
            ray_local.kill(h)
    assert [m["earlier_records"] for m in worker.history] == [0, 0, 2, 2, 2, 2, 2, 2]
    assert [r["request"] for r in worker.pool] == [r["request"] for r in recs[4:]]
    assert worker.counts["records"] == 8 and worker.learner.step == 8


def test_gate_verdict():
    from learner.online import gate_verdict

    pub = {"served": (0.5, 0.6), "replay": (0.7, 0.8)}
    assert gate_verdict({"served": (0.5, 0.6), "replay": (0.695, 0.1)}, pub, 0.01)  # a tie; forgets 0.005 < 0.01
    assert gate_verdict({"served": (0.51, 0.2), "replay": (0.7, 0.8)}, pub, 0.01)  # a wins, b does not matter
    assert not gate_verdict({"served": (0.5, 0.59), "replay": (0.9, 0.9)}, pub, 0.01)  # a tie lost on b
    assert not gate_verdict({"served": (0.49, 0.9), "replay": (0.9, 0.9)}, pub, 0.01)
    assert not gate_verdict({"served": (0.9, 0.9), "replay": (0.68, 0.9)}, pub, 0.01)  # forgets 0.02
    assert gate_verdict({"replay": (0.7, 0.0)}, {"replay": (0.7, 0.8)}, 0.0)  # no served probe yet
    assert gate_verdict({}, {}, 0.0)


def test_requests_in_flight_across_swaps_stay_lossless(learned, peaked_target, anti_draft, target_tokenizer):
    """A ragged batch of 8 greedy requests: the engine installs the learner's version 1 after round 3 and version 2
    after round 7 (`refresh_draft` between rounds); every sequence equals target-only decoding token for token,
    and the rounds were drafted by versions 0, 1 and 2."""
    from draftalign.models import load_causal_lm
    from draftalign.weights import check_and_load_weights
    from serve.specdec import SpecDecoder

    target, draft = load_causal_lm(peaked_target), load_causal_lm(anti_draft)
    decoder = SpecDecoder(target, draft, target_tokenizer, gamma=GAMMA)
    prompts, params = [_ids(target_tokenizer, p) for p in PROMPTS], SamplingParams(max_new_tokens=40)
    ref = [g.token_ids for g in decoder.generate_target_only(prompts, params)]
    rounds: list[tuple[int, int]] = []  # (draft version, tokens accepted by the live sequences)
    decoder.observer = lambda view: rounds.append((view.draft_version, sum(a for a, _ in view.outcomes)))
    for i, (_, gens) in enumerate(decoder.stream(prompts, params)):  # noqa: B007 - gens: the last yield
        if i in (3, 7):
            v = 1 if i == 3 else 2
            check_and_load_weights(draft, learned.versions[v])
            decoder.refresh_draft(v)
    assert [g.token_ids for g in gens] == ref
    assert rounds[0][0] == 0 and {v for v, _ in rounds} == {0, 1, 2}


# ---------------------------------------------------------------------- real Serve: `run_serve` starts the learner
@pytest.fixture(scope="module")
def endpoint(ray_local, tmp_path_factory, peaked_target, anti_draft, target_tokenizer):
    from ray import serve

    from serve.app import run_serve

    run = tmp_path_factory.mktemp("endpoint") / "run"
    write_scored_set(run, peaked_target, target_tokenizer, REPLAY_PROMPTS)
    cfg = _cfg(run, peaked_target, "endpoint", {"records_per_step": 4, "steps_per_publish": 1, "max_steps": None})
    try:
        url = run_serve(cfg, draft=anti_draft, blocking=False)
        yield SimpleNamespace(url=url, cfg=cfg,
                              replica=serve.get_deployment_handle("SpecDecodeReplica", app_name="draftalign"))
    finally:
        serve.shutdown()
        for name in ("endpoint-buffer", "endpoint-weights", "draftalign-endpoint-online-learner"):
            try:
                ray_local.kill(ray_local.get_actor(name, namespace=NAMESPACE))
            except ValueError:
                pass


def test_endpoint_swaps_in_the_learners_version_mid_stream(endpoint, peaked_target, target_tokenizer):
    """`run_serve` with serve.online.learner.enabled: the learner trains on the endpoint's own rounds and publishes;
    the replica installs a version while a long greedy stream and short requests are in flight. No request fails,
    every answer equals target-only decoding, and the install falls between the stream's first and last chunks."""
    import ray
    from openai import AsyncOpenAI

    from draftalign.models import load_causal_lm
    from learner.online import learner_name
    from serve.specdec import SpecDecoder

    reference = SpecDecoder(load_causal_lm(peaked_target), None, target_tokenizer)

    def ref_text(prompt: str, n: int) -> str:
        params = SamplingParams(max_new_tokens=n)
        return reference.generate_target_only([_ids(target_tokenizer, prompt)], params)[0].text

    installed = asyncio.Event()

    async def stream(c, prompt: str) -> tuple[str, float, float]:
        text, first = "", None
        async for ch in await c.completions.create(model="draftalign", prompt=prompt, max_tokens=300,
                                                   temperature=0, stream=True):
            text += ch.choices[0].text if ch.choices else ""
            first = first or time.time()
        return text, first, time.time()

    async def shorts(c, i: int) -> list[tuple[str, str]]:
        out = []
        while not installed.is_set() and len(out) < 40:
            p = PROMPTS[(i + len(out)) % len(PROMPTS)]
            r = await c.completions.create(model="draftalign", prompt=p, max_tokens=16, temperature=0)
            out.append((p, r.choices[0].text))
        return out

    async def watch():
        deadline = time.time() + 60
        while time.time() < deadline:
            st = await asyncio.to_thread(lambda: endpoint.replica.online_stats.remote().result())
            if st["draft_version"] >= 1:
                break
            await asyncio.sleep(0.1)
        installed.set()

    async def main():
        c = AsyncOpenAI(base_url=endpoint.url, api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(stream(c, "Once upon a time"), watch(), *(shorts(c, i) for i in range(3)),
                                        return_exceptions=True)
        finally:
            await c.close()

    (text, first, last), _, *short = asyncio.run(main())
    errors = [r for r in short if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    stats = endpoint.replica.online_stats.remote().result()
    install = next(e for e in stats["events"] if e["event"] == "install")
    learner = ray.get(ray.get_actor(learner_name(endpoint.cfg), namespace=NAMESPACE).stats.remote())
    assert install["version"] in [p["version"] for p in learner["published"]]
    assert learner["records"] >= 4 and learner["replayed_rows"] > 0
    assert first < install["time"] < last, (first, install["time"], last)  # the stream straddles the swap
    assert stats["rounds_per_version"].get(0, 0) > 0 and stats["rounds_per_version"].get(install["version"], 0) > 0
    assert text == ref_text("Once upon a time", 300)
    for p, t in (x for r in short for x in r):
        assert t == ref_text(p, 16)
