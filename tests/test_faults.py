"""Stage 3 under failures and at two rollout scales, with real Ray, a real vLLM TargetActor and a real
Ray Train learner on tiny models (helpers shared with tests/test_distill.py).

Start-up dominates (≈30 s of engine + trainer per run on 2 cores), so one run takes all three kills:
a RolloutActor and a TargetActor (ray.kill with restart) and the learner's rank-0 worker process
(SIGKILL: Ray Train restarts the worker group from the last checkpoint); the same run, on-policy with
max_policy_lag 0 and two DDP ranks, proves that stale batches are dropped and counted. The same run's checkpoints
then serve the corrupt-checkpoint resume. Custom Ray resources (`*_slot`) are declared on the local
cluster and asked for by every role, so their plumbing is exercised too.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from distill_helpers import distill_log, done, make_job, peaked_target_fixture, write_distill_set  # noqa: F401

from learner.trainer import CKPT_RE, STATE_FILE, list_checkpoints

pytestmark = pytest.mark.slow

SLOTS = {"learner_slot": 2.0, "rollout_slot": 2.0, "target_slot": 1.0}
ROLE_RESOURCES = {"learner__resources": {"learner_slot": 1.0}, "rollout__resources": {"rollout_slot": 1.0},
                  "target__resources": {"target_slot": 1.0}}
KILL_ROLLOUT_AT, KILL_TARGET_AT, KILL_LEARNER_AT = 3, 6, 11  # learner steps
CKPT_EVERY, MAX_STEPS = 5, 15
FAULT_RUN = dict(rollout__num_actors=2, rollout__cpus_per_actor=0.25, rollout__queue_size=3,
                 rollout__on_policy_fraction=1.0, rollout__max_policy_lag=0, learner__num_workers=2,
                 learner__cpus_per_worker=0.5, learner__sync_every=1, learner__max_steps=MAX_STEPS,
                 learner__checkpoint_every=CKPT_EVERY, learner__max_failures=2)


@pytest.fixture(scope="module")
def ray_slots():
    from draftalign.runtime import configure_vllm_env, init_ray

    configure_vllm_env(1.0, threads=1)
    ray = init_ray(None, num_cpus=2, resources=SLOTS)
    yield ray
    ray.shutdown()


def _job(tmp_path: Path, name: str, peaked_target: str, draft: str, tok, **over):
    cfg = make_job(tmp_path, name, peaked_target, draft, **{**ROLE_RESOURCES, **over})
    write_distill_set(cfg.run_path, tok)
    return cfg


def _last_step(cfg) -> int:
    path = cfg.run_path / "distill_log.jsonl"
    try:
        return json.loads(path.read_text().splitlines()[-1])["step"]
    except (FileNotFoundError, IndexError, ValueError):  # not written yet, or a line half written
        return 0


def _registered_checkpoint_step(cfg) -> int:
    """Step of the newest checkpoint Ray Train has registered (its run snapshot), 0 if none."""
    snap = cfg.run_path / "ray_results" / "distill" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0
    return int(CKPT_RE.match(latest["checkpoint_dir_name"]).group(1)) if latest else 0


def _alive_train_worker_pids(ray) -> set[int]:
    from ray._private.state import actors  # the GCS table: ray.util.state needs the dashboard

    return {a["Pid"] for a in actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}


def _killer(ray, cfg, events: dict, errors: list) -> None:
    """Kill a rollout actor, then the target engine, then learner rank 0, as the learner's steps pass."""
    name = cfg.name
    deadline = time.time() + 600
    try:
        while time.time() < deadline and "learner" not in events:
            step = _last_step(cfg)
            if "rollout" not in events and step >= KILL_ROLLOUT_AT:
                # every role holds its custom resource: none of the slots is left
                events["free_slots"] = {k: ray.available_resources().get(k, 0.0) for k in SLOTS}
                ray.kill(ray.get_actor(f"draftalign-{name}-rollout-0"), no_restart=False)
                events["rollout"] = step
            elif "rollout" in events and "target" not in events and step >= KILL_TARGET_AT:
                ray.kill(ray.get_actor(f"draftalign-{name}-target-0"), no_restart=False)
                events["target"] = step
            elif "target" in events and step >= KILL_LEARNER_AT:
                # Ray Train registers a reported checkpoint at its next poll (≈2 s): wait for the
                # step-10 one, so that the restart has a checkpoint other than the first to go to
                ckpt = _registered_checkpoint_step(cfg)
                if ckpt >= 2 * CKPT_EVERY:
                    store = ray.get_actor(f"draftalign-{name}-weight-store")
                    pid = ray.get(store.stats.remote())["learner_info"]["pid"]  # rank 0
                    assert pid in _alive_train_worker_pids(ray), "rank 0 is not a live RayTrainWorker"
                    os.kill(pid, signal.SIGKILL)
                    events["learner"] = {"step": _last_step(cfg), "registered_ckpt": ckpt, "pid": pid}
            time.sleep(0.2)
    except Exception as e:  # noqa: BLE001 - surfaced by the test
        errors.append(e)


@pytest.fixture(scope="module")
def fault_run(ray_slots, tmp_path_factory, peaked_target, tiny_draft_path, target_tokenizer):
    """One 15-step run (2 on-policy rollout actors, 2 learner ranks, checkpoints every 5 steps) with the kills.
    `max_policy_lag=0` with a publish after every step: a batch sampled before its actor saw the newest weights
    is stale, dropped and counted."""
    from learner.distill import run_distill

    cfg = _job(tmp_path_factory.mktemp("faults"), "faults", peaked_target, tiny_draft_path, target_tokenizer,
               **FAULT_RUN)
    events, errors = {}, []
    t = threading.Thread(target=_killer, args=(ray_slots, cfg, events, errors), daemon=True)
    t.start()
    t0 = time.time()
    run_distill(cfg)
    wall = time.time() - t0
    t.join(timeout=5)
    assert not errors, errors
    return cfg, events, wall


def test_run_survives_killed_rollout_target_and_learner(fault_run):
    cfg, events, wall = fault_run
    assert set(events) == {"free_slots", "rollout", "target", "learner"}, events
    d = done(cfg)
    assert d["steps"] == MAX_STEPS, d
    assert d["rollout_restarts"] >= 1 and d["target_restarts"] >= 1 and d["learner_restarts"] >= 1, d
    assert d["rollout_actor_starts"] >= 3 and d["dropped_batches"] > 0, d  # 2 actors + the restart; stale dropped
    log = distill_log(cfg)
    assert log[-1]["step"] == MAX_STEPS and log[-1]["learner_restarts"] >= 1
    assert all(r["policy_lag"] == 0 for r in log)  # nothing older than max_policy_lag was trained on
    assert log[-1]["trained_tokens"] > 0

    # the step counter: consecutive within an attempt; after the restart it goes back to the
    # checkpoint Ray Train restored, which is no older than the one registered before the kill
    first = [r["step"] for r in log if r["learner_attempt"] == 0]
    again = [r["step"] for r in log if r["learner_attempt"] >= 1]
    assert first == list(range(1, len(first) + 1)) and again, (first, again)
    restored = again[0] - 1
    assert again == list(range(restored + 1, MAX_STEPS + 1)), again
    assert restored % CKPT_EVERY == 0 and events["learner"]["registered_ckpt"] <= restored <= first[-1], (
        events, restored, first[-1])
    assert d["scaling"]["learner"]["start_step"] == restored, d["scaling"]
    restored_from = Path(d["scaling"]["learner"]["restored_from"])
    assert restored_from.name.startswith(f"checkpoint_step_{restored:08d}_")
    # weights + optimizer restored exactly: the restarted rank's digest is the one saved in that checkpoint
    saved = torch.load(restored_from / STATE_FILE, map_location="cpu", weights_only=False)["state_digest"]
    first_again = next(r for r in log if r["learner_attempt"] >= 1)
    assert first_again["restored_digest"] == saved, (first_again.get("restored_digest"), saved)
    assert events["learner"]["pid"] != d["scaling"]["learner"]["pid"]  # a new rank-0 process

    # weight versions keep increasing across the restart (the store rejects anything else)
    versions = [r["policy_version"] for r in log]
    assert versions == sorted(versions), versions
    # every role got its custom resource
    assert events["free_slots"] == {k: 0.0 for k in SLOTS}, events
    assert d["scaling"]["learner"]["granted_resources"] == {"CPU": 0.5, "learner_slot": 1.0}, d["scaling"]
    assert d["scaling"]["target"]["resources"] == [{"CPU": 0.5, "target_slot": 1.0}], d["scaling"]
    print(f"fault run: {wall:.0f} s, events {events}, restored step {restored}")


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(fault_run, capfd):
    """Truncate the newest checkpoint of the fault run (as a kill during its upload would), then
    resume with more steps: the driver names it and skips it, and the workers (to whom Ray Train
    hands that newest checkpoint from its run snapshot) skip it too."""
    from learner.distill import run_distill
    from learner.trainer import CorruptCheckpoint, verify_checkpoint

    cfg, _, _ = fault_run
    exp = cfg.run_path / "ray_results" / "distill"
    # Ray Train keeps two registered checkpoints (steps 15 and 10). On a slow machine the killed
    # attempt may have written its own step-15 checkpoint before dying, unregistered: it stays on
    # disk under the attempt-0 name and, being complete, is the one to fall back to.
    (latest_step, latest), (prev_step, prev) = list_checkpoints(exp)[:2]
    assert latest_step == MAX_STEPS and prev_step in (MAX_STEPS, MAX_STEPS - CKPT_EVERY), list_checkpoints(exp)
    weights = latest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        verify_checkpoint(latest)
    state = torch.load(prev / STATE_FILE, map_location="cpu", weights_only=False)  # before the resume's own
    saved, saved_version = state["state_digest"], state["policy_version"]  # checkpoints retire it (Ray Train keeps 2)
    n_lines = len(distill_log(cfg))
    cfg.learner.max_steps = MAX_STEPS + 3
    capfd.readouterr()
    run_distill(cfg, resume=True)
    out = capfd.readouterr()
    d = done(cfg)
    assert d["resumed_from_step"] == prev_step and d["steps"] == MAX_STEPS + 3, d
    assert len(d["skipped_checkpoints"]) == 1 and latest.name in d["skipped_checkpoints"][0], d
    assert "skipping corrupt checkpoint" in out.out + out.err and latest.name in out.out + out.err
    log = distill_log(cfg)
    resumed = [r["step"] for r in log[n_lines:]]
    assert resumed == list(range(prev_step + 1, MAX_STEPS + 4)), resumed
    # the driver-level resume restores weights + optimizer exactly (the digest saved in the checkpoint used)
    assert log[n_lines]["restored_digest"] == saved and "restored_digest" not in log[n_lines + 1]
    versions = [r["policy_version"] for r in log[n_lines:]]  # the weight versions go on from the checkpoint's
    assert versions == sorted(versions) and versions[0] > saved_version, (saved_version, versions)
    assert d["policy_version"] == saved_version + (MAX_STEPS + 3 - prev_step) // cfg.learner.sync_every, d


def test_rollout_actors_scale_without_touching_the_learner(fault_run, ray_slots, tmp_path, peaked_target,
                                                           tiny_draft_path, target_tokenizer):
    """The fault run (2 rollout actors) against a short run of the same job with rollout.num_actors = 1 (one
    engine and trainer start-up less than two new runs): the learner's workers and resources are the same, and
    throughput is reported for every rollout actor."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from learner.distill import run_distill

    c2, _, _ = fault_run
    d2 = done(c2)  # the fault run's, or its resumed run's (the corrupt-checkpoint test): both have 2 actors
    c1 = _job(tmp_path, "scale1", peaked_target, tiny_draft_path, target_tokenizer,
              **{**FAULT_RUN, "rollout__num_actors": 1, "learner__max_steps": 4, "learner__checkpoint_every": 4})
    t0 = time.time()
    run_distill(c1)
    d1, w1 = done(c1), time.time() - t0
    length = {"max_steps", "checkpoint_every"}  # the short run's length: not a resource
    assert c1.learner.model_dump(exclude=length) == c2.learner.model_dump(exclude=length) and c1.target == c2.target
    assert c1.rollout.model_copy(update={"num_actors": 2}) == c2.rollout
    l1, l2 = d1["scaling"]["learner"], d2["scaling"]["learner"]
    for key in ("num_workers", "resources_per_worker", "granted_resources", "max_failures"):
        assert l1[key] == l2[key], (key, l1, l2)
    assert l1["num_workers"] == 2 and l1["resources_per_worker"] == {"learner_slot": 1.0, "CPU": 0.5}, l1
    assert l1["granted_resources"] == {"CPU": 0.5, "learner_slot": 1.0}, l1  # what Ray gave rank 0
    assert d1["scaling"]["rollout"]["num_actors"] == 1 and d2["scaling"]["rollout"]["num_actors"] == 2

    assert set(d1["rollout_tokens_per_s_per_actor"]) == {"actor_0"}
    assert set(d2["rollout_tokens_per_s_per_actor"]) == {"actor_0", "actor_1"}
    assert all(v > 0 for v in d2["rollout_tokens_per_s_per_actor"].values()), d2
    assert sum(d2["rollout_tokens_per_actor"].values()) == d2["rollout_tokens"]
    log = distill_log(c2)
    assert any("rollout_tokens_per_s/actor_1" in r for r in log)
    acc = EventAccumulator(str(c2.run_path / "tensorboard" / "distill"))
    acc.Reload()
    assert {"system/rollout_tokens_per_s/actor_0", "system/rollout_tokens_per_s/actor_1",
            "system/learner_restarts"} <= set(acc.Tags()["scalars"])
    print(f"scaling: 1 actor {d1['rollout_tokens_per_s_per_actor']} in {w1:.0f} s; "
          f"2 actors {d2['rollout_tokens_per_s_per_actor']}")
