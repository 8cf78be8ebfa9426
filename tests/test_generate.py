"""Stage 2 (`draftalign generate`): the prompt plan, and a real run that is killed and resumed.

The slow scenario runs once per module (fixture `resumed_run`): the CLI generates in a
subprocess; after the first shard the TargetActor's process is SIGKILLed (Ray restarts it and
retries its shard), after the next new shard the driver itself is SIGKILLed; then an in-process
rerun with two engines finishes the set. The tests read what that left on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import actors.generate as gen
from actors.generate import PlanMismatch, build_prompts, make_plan
from draftalign.config import load_config
from draftalign.distset import SCHEMA, load_distill_set, shard_name

ROOT = Path(__file__).resolve().parents[1]
NUM_PROMPTS, SHARD_SIZE, MAX_TOKENS = 40, 4, 16
NUM_SHARDS = NUM_PROMPTS // SHARD_SIZE


def job_yaml(tmp: Path, model: str) -> Path:
    job = {"name": "gen-test", "run_dir": str(tmp / "run"), "seed": 3,
           "target": {"model": model, "dtype": "float32", "max_model_len": 512, "num_engines": 1,
                      "cpus_per_engine": 1},
           "generate": {"num_prompts": NUM_PROMPTS, "shard_size": SHARD_SIZE, "max_tokens": MAX_TOKENS,
                        "temperature": 0.7, "top_p": 0.9},
           "cluster": {"nodes": [{"cpus": 2}]}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# ---------------------------------------------------------------- the plan (no engine)

def test_plan_is_deterministic_train_only_and_templated(target_tokenizer, tiny_target_path):
    from draftalign.data import chat_messages, chat_prompt_ids, train_messages

    cfg = load_config(None, [f"target.model={tiny_target_path}", "generate.num_prompts=60", "seed=5"])
    a, skipped_a = build_prompts(cfg, target_tokenizer)
    b, skipped_b = build_prompts(cfg, target_tokenizer)
    assert a == b and skipped_a == skipped_b
    eval_ids = {m["id"] for m in chat_messages("eval")}
    assert not eval_ids & {p["prompt_id"] for p in a}
    msgs = {m["id"]: m["messages"] for m in train_messages(60, 5)}
    for p in a[:5]:
        assert p["prompt_token_ids"] == chat_prompt_ids(target_tokenizer, msgs[p["prompt_id"]])
        assert p["prompt"].rstrip().endswith("assistant")
        assert target_tokenizer(p["prompt"], add_special_tokens=False).input_ids == p["prompt_token_ids"]


def test_plan_skips_prompts_that_leave_no_room(target_tokenizer, tiny_target_path):
    cfg = load_config(None, [f"target.model={tiny_target_path}", "generate.num_prompts=60",
                             "target.max_model_len=128", "generate.max_tokens=64"])
    prompts, skipped = build_prompts(cfg, target_tokenizer)
    assert skipped and prompts, "this config should keep some prompts and skip others"
    assert all(len(p["prompt_token_ids"]) <= 64 for p in prompts)
    assert len(prompts) + len(skipped) == 60


def test_plan_change_is_refused(tmp_path, target_tokenizer, tiny_target_path):
    cfg = load_config(None, [f"target.model={tiny_target_path}", "generate.num_prompts=12"])
    prompts, skipped = build_prompts(cfg, target_tokenizer)
    gen._check_plan(tmp_path, make_plan(cfg, prompts, skipped))
    gen._check_plan(tmp_path, make_plan(cfg, prompts, skipped))  # same plan: fine
    cfg.generate.shard_size = 5
    with pytest.raises(PlanMismatch, match="shard_size"):
        gen._check_plan(tmp_path, make_plan(cfg, prompts, skipped))


def test_a_bigger_plan_shares_every_full_shard_of_a_smaller_one(target_tokenizer, tiny_target_path):
    def plan(n: int, *overrides: str) -> dict:
        cfg = load_config(None, [f"target.model={tiny_target_path}", f"generate.num_prompts={n}",
                                 "generate.shard_size=4", *overrides])
        return make_plan(cfg, *build_prompts(cfg, target_tokenizer))

    small, big = plan(30), plan(40)
    assert big["prompt_ids"][:30] == small["prompt_ids"]  # the prompt list grows at its end
    assert gen.reusable_shards(small, big) == list(range(7))  # shard 7 of the small plan holds 2 prompts, not 4
    assert gen.reusable_shards(big, small) == list(range(7))  # and the other way round
    with pytest.raises(PlanMismatch, match="sampling"):
        gen.reusable_shards(small, plan(40, "generate.temperature=1.0"))
    with pytest.raises(PlanMismatch, match="shard_size"):
        gen.reusable_shards(small, plan(40, "generate.shard_size=5"))


def test_a_set_with_embedded_self_queries_is_reused_from_another_run_dir(tmp_path, target_tokenizer,
                                                                         tiny_target_path):
    """A run's own copy of its self queries lies in its run dir; another run of the same job in another place has
    the same prompts in the same order and plan (the run dir's path decides nothing) and reuses the shards; other
    queries in the same place do not."""
    queries = "".join(json.dumps({"prompt": f"How do I plant tomato number {i}?"}) + "\n" for i in range(12))
    for run in ("a", "b"):
        (tmp_path / run / "self_queries").mkdir(parents=True)
        (tmp_path / run / "self_queries" / "self.jsonl").write_text(queries)

    def plan(run: str) -> dict:
        cfg = load_config(None, [f"target.model={tiny_target_path}", "generate.num_prompts=8", "generate.shard_size=4",
                                 f"data.train=[{tmp_path / run / 'self_queries' / 'self.jsonl'}]"])
        return make_plan(cfg, *build_prompts(cfg, target_tokenizer))

    a, b = plan("a"), plan("b")
    assert a["prompt_ids"] == b["prompt_ids"] and '"source": "embedded:self"' in a["prompt_source"]
    assert {k: v for k, v in a.items() if k != "target"} == {k: v for k, v in b.items() if k != "target"}
    assert gen.reusable_shards(a, b) == [0, 1]
    (tmp_path / "b" / "self_queries" / "self.jsonl").write_text(queries.replace("tomato", "potato"))
    assert gen.reusable_shards(a, plan("b")) == []  # other queries: other content-hashed ids, nothing reused


def test_rows_one_per_answer_in_prompt_order():
    prompts = [{"prompt_id": f"p{i}", "prompt": f"text {i}", "prompt_token_ids": [1, i]} for i in range(3)]
    answers = [[{"token_ids": [i, j], "text": f"a{i}{j}", "finish_reason": "length"} for j in range(2)]
               for i in range(3)]
    t = gen._rows(prompts, answers)
    assert t.schema == SCHEMA and t.num_rows == 6
    assert t.column("prompt_id").to_pylist() == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert t.column("response_index").to_pylist() == [0, 1] * 3
    assert t.column("response_token_ids").to_pylist()[3] == [1, 1]


def test_load_distill_set_refuses_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError, match="no distillation set"):
        load_distill_set(tmp_path)
    (tmp_path / "distill_set").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_distill_set(tmp_path)
    assert len(load_distill_set(tmp_path, allow_partial=True)) == 0


# ---------------------------------------------------------------- kill and resume (real Ray + vLLM)

def _session_pids(sid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            # zombies are dead already (their parent may never reap them here)
            if os.getsid(p.pid) == sid and p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out


def _target_actor_pid(sid: int) -> int | None:
    import psutil

    for pid in _session_pids(sid):
        with contextlib.suppress(psutil.Error):
            if "TargetEngine" in " ".join(psutil.Process(pid).cmdline()):
                return pid
    return None


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out / driver exited ({proc.poll()}) waiting for {what}; log tail:\n"
                         + log.read_text()[-3000:])


def _shards(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.parquet")}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_target_path):
    tmp = tmp_path_factory.mktemp("generate")
    job = job_yaml(tmp, tiny_target_path)
    d = tmp / "run" / "distill_set"
    log = tmp / "driver.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "draftalign.cli", "generate", str(job)], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    sid = proc.pid
    t_start = time.monotonic()
    phases = {}
    try:
        _wait_for(lambda: (d / shard_name(0)).exists() or (d / shard_name(1)).exists(), 240,
                  "the first shard", proc, log)
        phases["first_shard"] = time.monotonic() - t_start
        actor = _wait_for(lambda: _target_actor_pid(sid), 30, "the TargetActor process", proc, log)
        before_actor_kill = set(_shards(d))
        os.kill(actor, signal.SIGKILL)
        # Ray restarts the actor (a new process) and retries its shard: new shards keep coming.
        _wait_for(lambda: set(_shards(d)) - before_actor_kill, 240, "a shard after the actor kill", proc, log)
        phases["shard_after_actor_kill"] = time.monotonic() - t_start
        new_actor = _target_actor_pid(sid)
        proc.kill()  # the driver: a crash, no clean-up code runs
        proc.wait(30)
        at_driver_kill = _shards(d)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        # Ray's engine, raylet and GCS share the driver's fate; its dashboard and runtime-env
        # agents linger for minutes: give the engine a moment to go, then end what is left.
        deadline = time.monotonic() + 15
        while _target_actor_pid(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        phases["cleanup"] = time.monotonic() - t_start
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert len(at_driver_kill) < NUM_SHARDS, "the driver was killed after the run had finished"
    assert not (d / "metadata.json").exists()

    # Rerun in-process with two engines: the plan does not depend on the engine count.
    cfg = load_config(job, ["target.num_engines=2"])
    from actors.generate import run_generate

    out = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out):
        assert run_generate(cfg) == d
    phases["resume"] = time.monotonic() - t0
    print("phases", phases)
    return {"dir": d, "cfg": cfg, "job": job, "actor_pids": (actor, new_actor), "summary": out.getvalue(),
            "before_actor_kill": before_actor_kill, "at_driver_kill": at_driver_kill,
            "phases": phases, "after_resume": _shards(d)}


@pytest.mark.slow
def test_killed_actor_was_restarted(resumed_run):
    old, new = resumed_run["actor_pids"]
    assert new is not None and new != old
    assert len(resumed_run["at_driver_kill"]) > len(resumed_run["before_actor_kill"])


@pytest.mark.slow
def test_every_prompt_answered_exactly_once(resumed_run):
    d = resumed_run["dir"]
    plan = json.loads((d / "plan.json").read_text())
    assert len(plan["prompt_ids"]) == NUM_PROMPTS and plan["num_shards"] == NUM_SHARDS
    assert sorted(resumed_run["after_resume"]) == [shard_name(i) for i in range(NUM_SHARDS)]
    seen: Counter = Counter()
    for i in range(NUM_SHARDS):
        t = pq.read_table(d / shard_name(i))
        ids = t.column("prompt_id").to_pylist()
        assert ids == plan["prompt_ids"][i * SHARD_SIZE: (i + 1) * SHARD_SIZE], "shard boundaries moved"
        seen.update(ids)
    assert seen == Counter(plan["prompt_ids"])
    assert set(seen.values()) == {1}
    assert not list(d.glob(".*tmp*")), "temp files left behind"


@pytest.mark.slow
def test_finished_shards_not_regenerated(resumed_run):
    at_kill, after = resumed_run["at_driver_kill"], resumed_run["after_resume"]
    assert at_kill and all(after[name] == mtime for name, mtime in at_kill.items())
    assert f"({len(at_kill)} reused)" in resumed_run["summary"]


@pytest.mark.slow
def test_distill_set_rows_and_metadata(resumed_run, target_tokenizer):
    d = resumed_run["dir"]
    ds = load_distill_set(d.parent)
    assert len(ds) == NUM_PROMPTS
    assert pq.read_schema(d / shard_name(0)).remove_metadata() == SCHEMA
    plan = json.loads((d / "plan.json").read_text())
    assert ds["prompt_id"] == plan["prompt_ids"]
    for row in ds:
        assert 1 <= len(row["response_token_ids"]) <= MAX_TOKENS
        assert row["finish_reason"] in ("stop", "length")
        assert row["response_index"] == 0
        assert row["response_text"] == target_tokenizer.decode(row["response_token_ids"],
                                                              skip_special_tokens=True)
        assert target_tokenizer(row["prompt"], add_special_tokens=False).input_ids == row["prompt_token_ids"]
    from learner.distill import load_rows

    k = meta_k = json.loads((d / "metadata.json").read_text())["target_top_k_cached"]
    assert k == 20
    for row in load_rows(d.parent):  # the target's top-k at every answer position, ranked
        R = len(row["response_token_ids"])
        assert row["target_ids"].shape == row["target_logprobs"].shape == (R, meta_k)
        assert np.all(np.diff(row["target_logprobs"], axis=1) <= 1e-6)
        assert np.all(row["target_logprobs"] <= 0)
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["schema_version"] == 1 and meta["num_prompts"] == meta["num_rows"] == NUM_PROMPTS
    assert meta["num_response_tokens"] == sum(len(r) for r in ds["response_token_ids"])
    assert meta["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": MAX_TOKENS,
                                "responses_per_prompt": 1, "seed": 3}
    assert meta["shards"] == [shard_name(i) for i in range(NUM_SHARDS)]
    assert sum(meta["finish_reasons"].values()) == NUM_PROMPTS
    assert "train_messages" in meta["prompt_source"]
    assert "prompts/s" in resumed_run["summary"] and "tok/s" in resumed_run["summary"]


@pytest.mark.slow
def test_rerun_of_complete_set_is_a_noop(resumed_run):
    from actors.generate import run_generate

    d = resumed_run["dir"]
    meta_mtime = (d / "metadata.json").stat().st_mtime_ns
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_generate(resumed_run["cfg"])
    assert _shards(d) == resumed_run["after_resume"]
    assert (d / "metadata.json").stat().st_mtime_ns == meta_mtime
    assert "nothing to generate" in out.getvalue()


@pytest.mark.slow
def test_reuse_from_copies_the_shards_of_another_set(resumed_run, tmp_path, monkeypatch):
    """A smaller job over the same prompt order takes its shards from the finished set: no engine starts."""
    from actors.generate import run_generate

    n = 7 * SHARD_SIZE
    cfg = load_config(resumed_run["job"], [f"run_dir={tmp_path / 'small'}", f"generate.num_prompts={n}",
                                           f"generate.reuse_from={resumed_run['dir'].parent}"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        d = run_generate(cfg)
    assert "nothing to generate" in out.getvalue() and "7 of them copied" in out.getvalue()
    ds, old = load_distill_set(d.parent), load_distill_set(resumed_run["dir"].parent)
    assert ds["prompt_id"] == old["prompt_id"][:n]
    assert ds["response_token_ids"] == old["response_token_ids"][:n]
    assert json.loads((d / "metadata.json").read_text())["num_rows"] == n
    # the same set named by a storage URI (a run a user keeps in a bucket): pulled, then copied
    monkeypatch.setenv("DRAFTALIGN_STAGING", str(tmp_path / "staging"))
    uri = load_config(resumed_run["job"], [f"run_dir={tmp_path / 'from_uri'}", f"generate.num_prompts={n}",
                                           f"generate.reuse_from=file://{resumed_run['dir'].parent}"])
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_distill_set(run_generate(uri).parent)["response_token_ids"] == ds["response_token_ids"]
    bad = load_config(resumed_run["job"], [f"run_dir={tmp_path / 'other'}", "generate.temperature=0.0",
                                           f"generate.reuse_from={resumed_run['dir'].parent}"])
    with pytest.raises(PlanMismatch, match="sampling"):
        run_generate(bad)
