"""Served answers against an implementation other than our own (issue #37): greedy completions from the Ray Serve
endpoint, on contexts of ≥ 256 tokens, equal Hugging Face `generate` of the target alone, token for token — with a
draft that agrees with the target often but not always (accepted tokens asserted), in chain and token-tree mode, with
an FSPAD feature head (chain and EAGLE-2 dynamic tree), and while the online learner trains the draft on the traffic
and the replica hot-swaps its versions mid-stream.

One Ray and one Serve instance for the module (`endpoint`: the chain app at /); each other path is one more app on it,
deleted after its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from cluster_helpers import free_port, serving
from specdec_helpers import hf_greedy, partial_draft, train_head

GAMMA, NEW = 3, 24
STREAM = 96  # the online test's streams: ≥ 256 + 96 tokens of context by their last round
TOP_K = 8  # the target's log-probs per served position the online capture records
NAMESPACE = "draftalign-test-served-hf"
TEXT = ("The committee met on a grey morning to settle the budget for the coming year, and the discussion ran long. "
        "Each department argued for its share, the engineers for new machines, the teachers for books, and the "
        "gardeners for seeds and tools. ")


def _job(target_path: str, **serve_fields):
    from draftalign.config import JobConfig

    return JobConfig.model_validate({
        "target": {"model": target_path, "dtype": "float32", "max_model_len": 512},
        "serve": {"port": free_port(), "gamma": GAMMA, "gamma_policy": "fixed", "cpus_per_replica": 1,
                  "model_name": "draftalign", **serve_fields}})


@pytest.fixture(scope="module")
def endpoint(tiny_target_path, target_tokenizer, tmp_path_factory):
    """The tiny target served with a partly agreeing draft (the target's first layer, its final norm perturbed:
    `partial_pair`'s recipe, saved), chain at γ = 3; yields (root URL, draft path, config)."""
    from draftalign.models import save_pretrained_atomic

    draft = partial_draft(tiny_target_path)
    path = save_pretrained_atomic(draft, target_tokenizer, tmp_path_factory.mktemp("models") / "partial-draft")
    cfg = _job(tiny_target_path)
    with serving(cfg, str(path)) as url:
        yield url.removesuffix("/v1"), str(path), cfg


@pytest.fixture(scope="module")
def hf_target(tiny_target_path):
    """The target as HF's own model: its `generate` is the independent implementation (no engine ever touches it)."""
    from draftalign.models import load_causal_lm

    return load_causal_lm(tiny_target_path)


@contextlib.contextmanager
def _app(root: str, cfg, target_path: str, draft: str, name: str):
    """`draft` served by `cfg` as one more app at /<name> on the module's Serve instance; yields its OpenAI client."""
    from openai import OpenAI
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(cfg, target_path, draft), name=name, route_prefix=f"/{name}")
    try:
        yield OpenAI(base_url=f"{root}/{name}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.delete(name)


def _long_prompts(tokenizer, n: int = 4) -> list[list[int]]:
    base = tokenizer(TEXT, add_special_tokens=False).input_ids
    out = []
    for i in range(n):
        ids = (base * 8)[i * 7:]
        out.append(ids[: 256 + 13 * i])
    assert all(len(p) >= 256 for p in out)
    return out


def _check(client, prompts, tokenizer, target, depth: int | None = None) -> int:
    """Every served greedy answer equals HF `generate`'s; returns the accepted draft tokens. A static tree of
    `depth` levels reports γ = depth and depth proposed tokens per round (the path it verifies)."""
    accepted = 0
    eos = tokenizer.eos_token_id
    for p in prompts:
        r = client.completions.create(model="draftalign", prompt=p, max_tokens=NEW, temperature=0)
        want = hf_greedy(target, p, NEW, eos)
        assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True), (len(p), want)
        assert r.usage.completion_tokens == len(want)
        spec = r.model_extra["spec_decoding"]
        if depth is not None:
            assert spec["gamma"] == depth and spec["proposed"] == depth * spec["rounds"], spec
        accepted += spec["accepted"]
    return accepted


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_chain_and_tree_equal_hf_generate_on_long_contexts(endpoint, hf_target, tiny_target_path,
                                                                  target_tokenizer):
    from openai import OpenAI

    root, draft, cfg = endpoint
    prompts = _long_prompts(target_tokenizer)
    chain = OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=120)
    assert _check(chain, prompts, target_tokenizer, hf_target) > 0  # the draft was right at least sometimes

    tree_cfg = cfg.model_copy(deep=True)
    tree_cfg.serve.tree = [2, 1, 1]
    with _app(root, tree_cfg, tiny_target_path, draft, "tree") as tree:
        assert _check(tree, prompts, target_tokenizer, hf_target, depth=3) > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_feature_head_equals_hf_generate_on_long_contexts(endpoint, hf_target, tiny_target_path,
                                                                 target_tokenizer, tmp_path):
    """An FSPAD head (draft.kind=fspad: the endpoint detects it from its checkpoint) trained briefly on the target's
    own features of these contexts and their greedy continuations (`train_head`: it agrees often, not always), served
    as a chain at γ = 3 and as an EAGLE-2 dynamic tree."""
    from draftalign.models import load_causal_lm

    root, _, cfg = endpoint
    prompts = _long_prompts(target_tokenizer)
    head = train_head(load_causal_lm(tiny_target_path), prompts)  # its own target copy: hf_target stays untouched
    path = str(head.save(tmp_path / "fspad-head"))
    with _app(root, cfg, tiny_target_path, path, "fspad") as chain:
        assert _check(chain, prompts, target_tokenizer, hf_target) > 0
    dynamic = cfg.model_copy(deep=True)
    dynamic.serve.tree = {"depth": 4, "topk": 2, "nodes": 6}
    with _app(root, dynamic, tiny_target_path, path, "fspad-dtree") as dtree:
        assert _check(dtree, prompts, target_tokenizer, hf_target) > 0


def _spilled(spill: Path) -> list[dict]:
    """The served requests' records the online buffer spilled (whole shards only: they are renamed into place)."""
    return [json.loads(line) for f in sorted(spill.glob("rounds-*.jsonl")) for line in f.read_text().splitlines()]


def _straddles(record: dict) -> bool:
    """The request's rounds were drafted by version 0 and by a version the learner published, in that order."""
    v = record["draft_versions"]
    return v[0] == 0 and v[-1] >= 1 and v == sorted(v)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_online_learning_equals_hf_generate_while_the_draft_swaps(endpoint, hf_target, tiny_target_path,
                                                                          target_tokenizer, tmp_path):
    """serve.online with its learner (`run_serve`'s pair, started the same way): the learner trains the served
    draft (the partly agreeing one) on the captured rounds and publishes versions; the replica hot-swaps them while
    3 clients send streams and short requests on the long contexts. Every answer equals HF `generate` — the text
    each client received, and the token ids of every request as the capture recorded it — and traffic runs until a
    request was served across a swap (its rounds drafted by version 0, then by a learned one). The learned versions
    are accepted too: the weights changed under traffic, and the answers did not."""
    import ray
    from openai import AsyncOpenAI
    from ray import serve

    from learner.online import learner_name, start_online_learner

    root, draft, _ = endpoint
    prompts = _long_prompts(target_tokenizer)
    spill = tmp_path / "spill"
    ocfg = _job(tiny_target_path, cpus_per_replica=0.5, max_batch_size=8, batch_wait_timeout_s=0.02, online={
        "enabled": True, "top_k_logprobs": TOP_K, "buffer_name": "served-hf-buffer", "namespace": NAMESPACE,
        "spill_dir": str(spill), "push_every": 1, "push_interval_s": 0.2, "weight_store": "served-hf-weights",
        "poll_interval_s": 0.2, "rollback_window": 8,
        "rollback_margin": 1.0,  # never roll back: the replica follows the learner's versions
        "learner": {"enabled": True, "records_per_step": 2, "epochs": 1, "replay_fraction": 0,
                    "steps_per_publish": 1, "lr": 1e-4, "max_steps": 3, "poll_interval_s": 0.1, "cpus": 0.5}})
    ocfg.run_dir = str(tmp_path / "run")
    actor, run_ref = start_online_learner(ocfg, draft)  # boots while the app deploys
    served: list[tuple[list[int], int, str]] = []
    try:
        with _app(root, ocfg, tiny_target_path, draft, "online"):
            replica = serve.get_deployment_handle("SpecDecodeReplica", app_name="online")

            async def client(c, i: int, done: asyncio.Event) -> None:
                j = 0
                while not done.is_set():
                    p, stream = prompts[(i + j) % len(prompts)], (i + j) % 2 == 0
                    n = STREAM if stream else NEW
                    r = await c.completions.create(model="draftalign", prompt=p, max_tokens=n, temperature=0,
                                                   stream=stream)
                    if stream:
                        text = "".join([ch.choices[0].text async for ch in r if ch.choices])
                    else:
                        text = r.choices[0].text
                    served.append((p, n, text))
                    j += 1

            async def watch(done: asyncio.Event) -> None:
                deadline = time.time() + 180
                while time.time() < deadline:
                    stats = await asyncio.to_thread(lambda: replica.online_stats.remote().result())
                    if stats["draft_version"] >= 1 and any(_straddles(r) for r in _spilled(spill)):
                        break
                    await asyncio.sleep(0.5)
                done.set()

            async def main():
                c = AsyncOpenAI(base_url=f"{root}/online/v1", api_key="unused", max_retries=0, timeout=120)
                done = asyncio.Event()
                try:
                    return await asyncio.gather(watch(done), *(client(c, i, done) for i in range(3)),
                                                return_exceptions=True)
                finally:
                    await c.close()

            errors = [r for r in asyncio.run(main()) if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            replica.online_flush.remote().result()
            stats = replica.online_stats.remote().result()
        recorded = len(served) - stats["capture"]["dropped_in_replica"]  # a push past 8 in flight is dropped
        deadline = time.time() + 10
        while len(_spilled(spill)) < recorded and time.time() < deadline:  # the last pushes land
            time.sleep(0.2)
        learner = ray.get(actor.stats.remote())
    finally:
        ray.get(actor.stop.remote())
        for name in (learner_name(ocfg), "served-hf-weights", "served-hf-buffer"):
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))

    eos = target_tokenizer.eos_token_id
    for p, n, text in served:  # what each client received
        assert text == target_tokenizer.decode(hf_greedy(hf_target, p, n, eos), skip_special_tokens=True), (len(p), n)
    records = _spilled(spill)
    assert len(records) == recorded > 0  # one record per request: checked by its token ids too
    assert stats["capture"]["errors"] == 0  # every round was recorded (not so while streams ran with autograd on)
    accepted = {}  # by draft version: proposals the target accepted (the served token is the proposal)
    for r in records:
        (p,) = [p for p in prompts if r["tokens"][: len(p)] == p]
        got = r["tokens"][len(p):]
        assert got == hf_greedy(hf_target, p, len(got), eos), (len(p), len(got))
        hit = np.array(r["drafted"]) == np.array(r["tokens"])[r["positions"]]
        for v in set(r["draft_versions"]):
            accepted[v] = accepted.get(v, 0) + int(hit[np.array(r["draft_versions"]) == v].sum())
    assert any(_straddles(r) for r in records)  # a request was served across a swap
    installed = [e["version"] for e in stats["events"] if e["event"] == "install"]
    assert installed and set(installed) <= {x["version"] for x in learner["published"]}
    assert stats["rounds_per_version"].get(0, 0) > 0 and sum(stats["rounds_per_version"].get(v, 0)
                                                             for v in installed) > 0
    assert accepted.get(0, 0) > 0 and sum(accepted.get(v, 0) for v in installed) > 0, accepted
