"""Online distillation, serving side (serve/online.py): real Ray Serve on 127.0.0.1, tiny models, the openai client.

One module-scoped app serves with serve.online on: capture into a named RoundBuffer, draft versions polled from a
named WeightStore. Its draft starts as an anti-draft (the tiny target with its final norm negated: argmax q =
argmin p, so greedy acceptance is 0); version 1 is the target's own weights (acceptance ≈ 1); version 2 is the
anti-draft again, a worse version that must be rolled back. Every greedy answer is compared with
`SpecDecoder.generate_target_only` on the same target in this process. The tests run in file order: the swap
test installs version 1, the rollback test needs it.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest
from cluster_helpers import free_port

MODEL = "draftalign"
GAMMA = 3
TOP_K = 8
CAP = 256
CONTEXT = 512
NAMESPACE = "draftalign"
BUFFER = "test-online-buffer"
STORE = "test-online-weight-store"
WINDOW = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot", "1, 2, 3, 4, 5,"]
STREAMS = ["In a quiet village by the sea,", "Here is a list of things to pack:"]  # only the swap test's streams


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def versions(tiny_target_path, target_tokenizer, tmp_path_factory):
    """path: the anti-draft served as version 0; weights by version: 1 = the target's, 2 = the anti-draft's."""
    import torch

    from draftalign.models import load_causal_lm, save_pretrained_atomic

    target = load_causal_lm(tiny_target_path)
    good = {k: v.detach().numpy().copy() for k, v in target.state_dict().items()}
    with torch.no_grad():
        target.model.norm.weight.neg_()  # logits → −logits: the draft proposes the target's least likely token
    path = save_pretrained_atomic(target, target_tokenizer, tmp_path_factory.mktemp("online") / "anti-draft")
    bad = {k: v.detach().numpy().copy() for k, v in target.state_dict().items()}
    return SimpleNamespace(path=str(path), weights={1: good, 2: bad})


def _cfg(tiny_target_path, **online):
    from draftalign.config import JobConfig

    return JobConfig.model_validate({
        "target": {"model": tiny_target_path, "dtype": "float32", "max_model_len": CONTEXT},
        "serve": {"port": free_port(), "gamma": GAMMA, "gamma_policy": "fixed", "max_tokens_cap": CAP,
                  "max_batch_size": 8, "batch_wait_timeout_s": 0.02, "cpus_per_replica": 1, "model_name": MODEL,
                  "online": online}})


@pytest.fixture(scope="module")
def server(tiny_target_path, versions):
    import ray
    from ray import serve

    from actors.rollout import WeightStore
    from serve.app import run_serve

    cfg = _cfg(tiny_target_path, enabled=True, top_k_logprobs=TOP_K, buffer_records=100_000, buffer_name=BUFFER,
               namespace=NAMESPACE, push_every=4, push_interval_s=0.2, weight_store=STORE, poll_interval_s=0.2,
               rollback_window=WINDOW)
    try:
        url = run_serve(cfg, draft=versions.path, blocking=False)
        store = WeightStore.options(name=STORE, namespace=NAMESPACE).remote()
        replica = serve.get_deployment_handle("SpecDecodeReplica", app_name="draftalign")
        yield SimpleNamespace(url=url, root=url.removesuffix("/v1"), cfg=cfg, store=store, replica=replica,
                              buffer=lambda: ray.get_actor(BUFFER, namespace=NAMESPACE))
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def target_model(tiny_target_path):
    from draftalign.models import load_causal_lm

    return load_causal_lm(tiny_target_path)


@pytest.fixture(scope="module")
def reference(target_model, target_tokenizer):
    """Greedy decoding of the target alone, in this process (fp32): token ids by prompt text."""
    from draftalign.sampling import SamplingParams
    from serve.specdec import SpecDecoder

    decoder = SpecDecoder(target_model, None, target_tokenizer)
    cache = {}

    def run(prompt: str, max_tokens: int):
        if (prompt, max_tokens) not in cache:
            cache[prompt, max_tokens] = decoder.generate_target_only(
                [_ids(target_tokenizer, prompt)], SamplingParams(max_new_tokens=max_tokens))[0]
        return cache[prompt, max_tokens]

    return run


def _records(server) -> list[dict]:
    import ray

    server.replica.online_flush.remote().result()
    return ray.get(server.buffer().get_batch.remote(1_000_000))


def _online(server) -> dict:
    return server.replica.online_stats.remote().result()


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("serve_cfg, match", [
    ({"engine": "vllm", "online": {"enabled": True}}, "needs serve.engine=native"),
    ({"tree": [2, 1], "online": {"enabled": True}}, "unset serve.tree"),
    ({"online": {"enabled": True, "buffer_records": 0}}, "buffer_records"),
    ({"online": {"enabled": True, "buffer_rounds": 0}}, "buffer_rounds"),  # the field's earlier name still reads
    ({"online": {"enabled": True, "top_k_logprobs": 0}}, "top_k_logprobs"),
])
def test_bad_online_config_names_the_field(serve_cfg, match):
    from draftalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"serve.{k}={v}" for k, v in serve_cfg.items() if k != "online"]
                    + [f"serve.online.{k}={v}" for k, v in serve_cfg["online"].items()])


def test_full_vocabulary_target_top_k_needs_an_online_k():
    from draftalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="serve.online.top_k_logprobs"):
        load_config(None, ["target.top_k_logprobs=-1", "serve.online.enabled=true"])
    assert load_config(None, ["target.top_k_logprobs=-1", "serve.online.enabled=true",
                              "serve.online.top_k_logprobs=20"]).serve.online.top_k_logprobs == 20


def test_rollback_rule_is_a_one_sided_z_test():
    """Hand-worked: α̂_old = 60/100 = 0.6, α̂_new = 50/100 = 0.5, pooled ᾱ = 0.55,
    SE = √(0.55 · 0.45 · 2/100) = 0.0704: 0.5 < 0.6 − 1.645 · 0.0704 = 0.484 is false (noise, kept);
    the same shortfall on 10× the tokens (SE 0.0222, bound 0.563) rolls back, as does any shortfall at z = 0."""
    from serve.online import VersionTrial, worse_beyond_noise

    assert not worse_beyond_noise((50, 50), (60, 40), margin=0.0, z=1.645)
    assert worse_beyond_noise((500, 500), (600, 400), margin=0.0, z=1.645)
    assert worse_beyond_noise((50, 50), (60, 40), margin=0.0, z=0.0)
    assert not worse_beyond_noise((60, 40), (50, 50), margin=0.0, z=0.0)  # better is never rolled back
    assert not worse_beyond_noise((55, 45), (60, 40), margin=0.1, z=0.0)  # within the margin

    trial = VersionTrial(window=2, z=1.645)
    trial.observe(0, [(6, 4), (54, 36)])  # version 0's window: 60 accepted, 40 rejected
    trial.start(1, previous_weights={})
    assert trial.on_trial and trial.baseline_alpha == 0.6
    trial.observe(1, [(25, 25)])
    assert trial.verdict() is None  # one sequence-round of two
    trial.observe(0, [(0, 100)])  # another version's rounds do not count
    trial.observe(1, [(25, 25)])
    assert trial.verdict() == "keep"


def test_paired_rule_is_a_one_sided_paired_z_test():
    """Hand-worked: d = (−1, 0, 0, 0): mean −0.25, sd 0.5, SE 0.25, bound −1.645 · 0.25 = −0.411: noise, kept;
    25 × that pattern (n = 100: sd 0.435, SE 0.0435, bound −0.072) rolls back; any shortfall does at z = 0."""
    from serve.online import paired_worse

    d = np.array([-1.0, 0, 0, 0])
    assert not paired_worse(d, margin=0.0, z=1.645)
    assert paired_worse(np.tile(d, 25), margin=0.0, z=1.645)
    assert paired_worse(d, margin=0.0, z=0.0)
    assert not paired_worse(-d, margin=0.0, z=0.0)  # better is never rolled back
    assert not paired_worse(d, margin=0.3, z=0.0)  # within the margin
    assert not paired_worse(np.zeros(0), margin=0.0, z=0.0)  # no traffic: nothing to judge


def test_teacher_forced_acceptance_is_one_minus_tvd(tiny_target_path, tiny_draft_path, target_tokenizer):
    """On served positions t with p_t given in full (K = V): a_t = 1 − TVD(p_t, q_t), q_t the draft's softmax
    given tokens[:t] from one HF forward here; restricted to a vocabulary, q is renormalised on its rows; at
    greedy a_t = 1{argmax q_t = argmax p_t}."""
    import torch

    from draftalign.models import load_causal_lm
    from draftalign.sampling import SamplingParams
    from serve.online import teacher_forced_acceptance

    target, draft = load_causal_lm(tiny_target_path), load_causal_lm(tiny_draft_path)
    tokens = np.array(_ids(target_tokenizer, PROMPTS[2] + " and it learned to paint"), np.int32)
    pos = np.arange(3, len(tokens))
    x = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        p = torch.softmax(target(x).logits[0].float(), -1)[pos - 1]  # (N, V)
        z = draft(x).logits[0].float()[pos - 1]
    V = p.shape[-1]
    all_ids = np.tile(np.arange(V, dtype=np.int32), (len(pos), 1))
    sampled = SamplingParams(temperature=1.0)
    a = teacher_forced_acceptance(draft, None, tokens, pos, all_ids, p.numpy(), sampled)
    np.testing.assert_allclose(a, 1 - 0.5 * (p - torch.softmax(z, -1)).abs().sum(-1).numpy(), atol=1e-5)

    rows = torch.arange(0, V, 2)  # every other token
    q = torch.zeros_like(p).index_copy_(-1, rows, torch.softmax(z[:, rows], -1))
    a = teacher_forced_acceptance(draft, rows, tokens, pos, all_ids, p.numpy(), sampled)
    np.testing.assert_allclose(a, torch.minimum(p, q).sum(-1).numpy(), atol=1e-5)

    top = p.argmax(-1, keepdim=True)
    a = teacher_forced_acceptance(draft, None, tokens, pos, top.numpy().astype(np.int32),
                                  np.ones((len(pos), 1), np.float32), SamplingParams())
    np.testing.assert_array_equal(a, (z.argmax(-1) == top[:, 0]).float().numpy())


# ---------------------------------------------------------------------- buffer
def test_buffer_drops_the_oldest_and_counts(server, tmp_path):
    import json

    import ray

    from actors.traffic import RoundBuffer

    buf = RoundBuffer.remote(3, str(tmp_path))
    recs = [{"context": np.arange(i + 1, dtype=np.int32), "policy_version": 0, "i": i} for i in range(5)]
    assert ray.get(buf.put.remote(recs[:2])) == 0
    assert ray.get(buf.put.remote(recs[2:])) == 2
    got = ray.get(buf.get_batch.remote(10))
    assert [r["i"] for r in got] == [2, 3, 4]  # the two oldest were dropped, order kept
    assert ray.get(buf.stats.remote()) | {"records_per_version": None} == {
        "size": 0, "capacity": 3, "received": 5, "dropped": 2, "taken": 3, "shards": 2, "records_per_version": None}
    lines = [json.loads(x) for f in sorted(tmp_path.glob("rounds-*.jsonl")) for x in f.read_text().splitlines()]
    assert [r["i"] for r in lines] == [0, 1, 2, 3, 4] and lines[4]["context"] == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob(".*"))  # no temp file left behind
    with pytest.raises(ray.exceptions.RayTaskError, match="n ≥ 1"):
        ray.get(buf.get_batch.remote(0))


# ---------------------------------------------------------------------- capture
def test_capture_records_one_row_per_request(server, client, reference, target_tokenizer, target_model):
    """Each request's rounds reach the buffer as one record: the served sequence, and at every position a round
    scored on it (with the fixed γ policy: every served token) the target's raw top-k there."""
    import torch

    from actors.traffic import to_rollout_batch

    _records(server)  # start from an empty buffer
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ref = reference(prompt, 12)
    assert r.choices[0].text == ref.text
    client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0.8, seed=3)
    recs = _records(server)
    p_ids = _ids(target_tokenizer, prompt)
    mine = [x for x in recs if list(x["tokens"][: len(p_ids)]) == p_ids]
    other = [x for x in recs if list(x["tokens"][: len(p_ids)]) != p_ids]
    assert len(mine) == 1 and len(other) == 1 and other[0]["temperature"] == 0.8  # one record per request
    (x,) = mine
    assert x["rounds"] == r.model_extra["spec_decoding"]["rounds"] and x["accepted"] == r.model_extra[
        "spec_decoding"]["accepted"]
    assert list(x["tokens"]) == p_ids + ref.token_ids
    assert list(x["positions"]) == list(range(len(p_ids), len(x["tokens"])))  # every served token was scored
    assert x["target_ids"].shape == (12, TOP_K) and x["target_logprobs"].shape == (12, TOP_K)
    assert x["policy_version"] == 0 and list(x["draft_versions"]) == [0] * 12 and x["temperature"] == 0
    assert np.all(np.diff(x["target_logprobs"], axis=1) <= 0) and np.all(x["draft_logprobs"] == 0)
    # The stored rows are the target's raw distribution at each scored position: one forward pass checks them all.
    with torch.no_grad():
        lp = torch.log_softmax(target_model(torch.tensor([list(x["tokens"])])).logits[0].float(), -1)  # (T, V)
    top_lp, top_ids = lp[x["positions"] - 1].topk(TOP_K, -1)  # row t − 1 predicts token t
    assert np.array_equal(x["target_ids"][:, 0], top_ids[:, 0].numpy())
    np.testing.assert_allclose(x["target_logprobs"], top_lp.numpy(), atol=1e-4)
    batch = to_rollout_batch(mine, pad_id=0)
    assert batch.n_tokens == 12 and batch.input_ids.shape[0] == 1 and batch.target_ids.shape[2] == TOP_K
    assert batch.on_policy.all() and batch.policy_version == 0


def test_capture_off_records_nothing(server, tiny_target_path, versions, reference):
    import ray
    from openai import OpenAI
    from ray import serve

    from serve.app import build_app

    before = ray.get(server.buffer().stats.remote())["received"]
    cfg = _cfg(tiny_target_path, buffer_name="test-online-off-buffer")  # online.enabled defaults to False
    serve.run(build_app(cfg, tiny_target_path, versions.path), name="off", route_prefix="/off")
    try:
        c = OpenAI(base_url=f"{server.root}/off/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0)
        assert r.choices[0].text == reference(PROMPTS[2], 8).text
        assert serve.get_deployment_handle("SpecDecodeReplica", app_name="off").online_stats.remote().result() is None
        with pytest.raises(ValueError):
            ray.get_actor("test-online-off-buffer", namespace=NAMESPACE)  # no buffer was ever created
        server.replica.online_flush.remote().result()
        assert ray.get(server.buffer().stats.remote())["received"] == before
    finally:
        serve.delete("off")


# ---------------------------------------------------------------------- hot-swap
def test_swap_under_concurrent_load_is_lossless(server, reference, versions, target_tokenizer):
    """Version 1 is published while 12 greedy clients and 2 long streams run: no request fails, every answer is the
    target's, and the streams straddle the swap (their rounds were drafted by version 0, then by version 1)."""
    import ray
    from openai import AsyncOpenAI

    _records(server)
    published = asyncio.Event()

    async def publish_after_first_chunk(first: asyncio.Event):
        await first.wait()
        await asyncio.to_thread(ray.get, server.store.publish.remote(1, versions.weights[1]))
        published.set()

    async def stream(c, prompt, first: asyncio.Event) -> str:
        text = ""
        async for ch in await c.completions.create(model=MODEL, prompt=prompt, max_tokens=120, temperature=0,
                                                   stream=True):
            text += ch.choices[0].text if ch.choices else ""
            first.set()
        return text

    async def client_loop(c, i) -> list[tuple[str, str]]:
        out = []
        for j in range(3):
            p = PROMPTS[(i + j) % len(PROMPTS)]
            r = await c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
            out.append((p, r.choices[0].text))
            if j == 0:
                await asyncio.wait_for(published.wait(), 60)  # the later requests run after the swap
        return out

    async def main():
        c = AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        first = asyncio.Event()
        try:
            return await asyncio.gather(publish_after_first_chunk(first), stream(c, STREAMS[0], first),
                                        stream(c, STREAMS[1], first), *(client_loop(c, i) for i in range(12)),
                                        return_exceptions=True)
        finally:
            await c.close()

    _, *results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert results[0] == reference(STREAMS[0], 120).text and results[1] == reference(STREAMS[1], 120).text
    for p, text in (x for r in results[2:] for x in r):
        assert text == reference(p, 16).text
    deadline = time.time() + 30
    while _online(server)["draft_version"] != 1 and time.time() < deadline:
        time.sleep(0.2)
    stats = _online(server)
    assert stats["draft_version"] == 1 and [e["version"] for e in stats["events"] if e["event"] == "install"] == [1]
    assert stats["rounds_per_version"].get(0, 0) > 0 and stats["rounds_per_version"].get(1, 0) > 0
    recs = _records(server)
    for prompt in STREAMS:
        p_ids = _ids(target_tokenizer, prompt)
        (mine,) = [x for x in recs if list(x["tokens"][: len(p_ids)]) == p_ids]  # one stream, one record
        v = list(mine["draft_versions"])
        assert v[0] == 0 and v[-1] == 1 and v == sorted(v) and mine["policy_version"] == 0, v  # both drafts, in order


def test_new_version_is_kept_when_acceptance_rises(server, client, reference):
    deadline = time.time() + 60
    while _online(server)["on_trial"] and time.time() < deadline:
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert r.choices[0].text == reference(PROMPTS[0], 24).text
        assert r.model_extra["spec_decoding"]["accepted"] > 0  # version 1 is the target: it agrees
    (keep,) = [e for e in _online(server)["events"] if e["event"] in ("keep", "rollback")]
    assert keep["event"] == "keep" and keep["version"] == 1 and keep["alpha"] > keep["baseline_alpha"]
    assert keep["judge"] == "paired" and keep["positions"] > 0  # both drafts scored on the same served tokens


def test_worse_version_is_rolled_back(server, client, reference, versions):
    import ray

    ray.get(server.store.publish.remote(2, versions.weights[2]))
    deadline = time.time() + 90
    while not any(e["event"] == "rollback" for e in _online(server)["events"]) and time.time() < deadline:
        r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
        assert r.choices[0].text == reference(PROMPTS[1], 24).text
    stats = _online(server)
    (rb,) = [e for e in stats["events"] if e["event"] == "rollback"]
    assert rb["version"] == 2 and rb["previous"] == 1 and rb["alpha"] < rb["baseline_alpha"]
    assert rb["judge"] == "paired" and rb["positions"] > 0
    assert stats["draft_version"] == 1 and stats["rejected_versions"] == [2] and not stats["on_trial"]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    assert r.choices[0].text == reference(PROMPTS[1], 24).text
    assert r.model_extra["spec_decoding"]["accepted"] > 0  # version 1 drafts again


def test_version_with_a_wrong_shape_is_refused(server, client, reference, versions):
    weights = dict(versions.weights[1])
    name = "model.norm.weight"
    weights[name] = np.ones(weights[name].shape[0] + 1, dtype=np.float32)
    with pytest.raises(Exception, match=f"{name} has shape"):
        server.replica.install_draft.remote(9, weights).result()
    assert _online(server)["draft_version"] == 1
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0)
    assert r.choices[0].text == reference(PROMPTS[3], 12).text
    assert r.model_extra["spec_decoding"]["accepted"] > 0  # the served draft is still version 1, untouched


# ---------------------------------------------------------------------- engine: refresh between rounds
@pytest.mark.parametrize("tree", [None, [2, 1]])
def test_refresh_mid_stream_keeps_greedy_output(tiny_target_path, target_tokenizer, versions, tree):
    """`SpecDecoder.refresh_draft` between two rounds of a stream (chain and tree): the stream restarts its draft
    cache, its tokens stay the target's, and the new draft (the target's weights) is accepted from then on."""
    from draftalign.models import load_causal_lm
    from draftalign.sampling import SamplingParams
    from draftalign.weights import check_and_load_weights
    from serve.specdec import SpecDecoder

    target, draft = load_causal_lm(tiny_target_path), load_causal_lm(versions.path)
    decoder = SpecDecoder(target, draft, target_tokenizer, gamma=GAMMA, tree=tree)
    prompt, params = _ids(target_tokenizer, PROMPTS[0]), SamplingParams(max_new_tokens=40)
    ref = decoder.generate_target_only([prompt], params)[0].token_ids
    per_round, out = [], []
    for i, (new, g) in enumerate(decoder.generate_stream(prompt, params)):  # noqa: B007 - g: the last one
        out += new
        per_round.append(len(new))
        if i == 4:
            check_and_load_weights(draft, versions.weights[1])
            decoder.refresh_draft(1)
    assert out == ref and decoder.draft_version == 1
    assert per_round[:5] == [1] * 5  # the anti-draft: every proposal rejected
    assert max(per_round[5:]) > 1 and g.accepted > 0  # the target as draft: accepted after the refresh
