"""Stage 1 pretraining with real Ray Train: loss goes down, checkpoints load, kill + resume is seamless.

A 1-layer x 32 draft on a few repeated local sentences (seq_len 32, batch 4): a step takes
milliseconds, so each test is dominated by Ray Train's start-up (~15 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from draftalign.batching import BatchSampler
from draftalign.config import JobConfig
from learner.pretrain import pack, run_pretrain
from learner.trainer import STATE_FILE, CorruptCheckpoint, list_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 5  # each ray.train.report is a round trip through the Train controller: not every step


@pytest.fixture(scope="module")
def varied_corpus(tmp_path_factory) -> list[str]:
    """~90 blocks of distinct text: a data cursor off by one block reads different tokens (the repeated
    sentences above would hide it). 40 steps x batch 4 cross an epoch boundary."""
    rng = np.random.default_rng(7)
    words = ("river market seven lantern quiet orbit paper violet engine harbor maple signal copper winter "
             "garden silver thunder pencil canyon meadow falcon glacier puzzle rocket").split()
    d = tmp_path_factory.mktemp("varied")
    (d / "c.txt").write_text("\n".join(f"record {i}: " + " ".join(rng.choice(words, 12)) + "." for i in range(130)))
    return [str(d / "c.txt")]


def make_cfg(run_dir: Path, corpus: list[str], draft_model: str | None = None, **pretrain) -> JobConfig:
    p = {"corpus": corpus, "max_steps": 30, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup_steps": 2,
         "checkpoint_every": 10, "num_workers": 1, "cpus_per_worker": 1, **pretrain}
    return JobConfig.model_validate({
        "name": "pt-test", "run_dir": str(run_dir), "seed": 0,
        "draft": {"model": draft_model,
                  "arch": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                           "max_position_embeddings": 128}},
        "pretrain": p})


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "pretrain_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, address="local")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, varied_corpus, ray_local, tiny_draft_path) -> Path:
    """One uninterrupted 40-step single-worker run (checkpoints at 20 and 40), logged every 5 steps, starting
    from an existing HF-format draft (draft.model; every `draftalign run` test builds a fresh one): the
    reference that the killed and the two-worker runs are held against."""
    run = tmp_path_factory.mktemp("pt") / "run"
    out = run_pretrain(reference_cfg(run, varied_corpus, tiny_draft_path), log_every=LOG_EVERY)
    assert out == run / "draft_pretrained"
    return run


def reference_cfg(run_dir: Path, corpus: list[str], draft_model: str, **over) -> JobConfig:
    """The reference job: 40 steps of batch 4 cross an epoch of the varied corpus; checkpoints at 20 and 40 only,
    so a kill after the first lands well before a second could appear."""
    return make_cfg(run_dir, corpus, draft_model=draft_model, max_steps=40, checkpoint_every=20, lr=3e-3, **over)


# ------------------------------------------------------------------------------- pure helpers

def test_pack_predicts_every_token_once():
    stream = np.arange(10)
    blocks = pack(stream, 3)  # (n, T + 1)
    assert blocks.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert np.concatenate([b[1:] for b in blocks]).tolist() == list(range(1, 10))


@pytest.mark.parametrize("flags, mode, want", [
    ({"avx2"}, "auto", None), ({"avx512_bf16"}, "auto", None),  # no AMX: fp32 measured faster
    ({"avx512_bf16", "amx_bf16"}, "auto", "bfloat16"), ({"amx_bf16"}, "off", None), ({"avx2"}, "bfloat16", "bfloat16"),
])
def test_cpu_autocast_is_on_with_amx_only(monkeypatch, flags, mode, want):
    import torch

    import learner.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_flags", lambda: flags)
    assert trainer.autocast_dtype(torch.device("cpu"), mode) == (want and getattr(torch, want))


def test_sampler_is_a_deterministic_permutation_per_epoch():
    s = BatchSampler(7, seed=3)
    first = np.concatenate([s.indices(c, 3) for c in range(0, 21, 3)])  # 3 epochs in batches of 3
    for e in range(3):
        assert sorted(first[7 * e: 7 * e + 7].tolist()) == list(range(7))
    assert np.array_equal(first, np.concatenate([BatchSampler(7, 3).indices(c, 3) for c in range(0, 21, 3)]))
    assert np.array_equal(s.indices(5, 4), first[5:9])  # a cursor resumes mid-epoch


def test_load_documents_reads_txt_jsonl_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from learner.pretrain import load_documents

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}))
    pq.write_table(pa.table({"id": [1, 2], "text": ["delta", ""]}), tmp_path / "d" / "c.parquet")
    assert sorted(load_documents([str(tmp_path / "d")])) == ["alpha", "beta", "delta", "gamma"]
    assert load_documents([str(tmp_path / "d" / "c.parquet")]) == ["delta"]
    with pytest.raises(ValueError, match="does not exist"):
        load_documents([str(tmp_path / "missing")])


def test_stage1_on_the_distill_set_leaves_the_heldout_prompts_out(tmp_path, target_tokenizer):
    """Stage 3 measures its held-out acceptance on these prompts' answers: stage 1 must not have seen them."""
    from distill_helpers import write_distill_set

    from draftalign.distset import load_distill_set
    from learner.distill import load_rows
    from learner.heldout import split_heldout
    from learner.pretrain import load_documents

    write_distill_set(tmp_path, target_tokenizer, n_prompts=40)
    train, held = split_heldout(load_rows(tmp_path))
    assert len(held) == 4 and len(train) == 36
    text = {r["prompt_id"]: r["prompt"] + r["response_text"] for r in load_distill_set(tmp_path).to_list()}
    docs = load_documents(["run:distill_set"], tmp_path)
    assert sorted(docs) == sorted(text[r["prompt_id"]] for r in train)


# ------------------------------------------------------------------------------------ with Ray

def test_loss_decreases_and_checkpoints_load(trained, target_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftalign.models import check_tokenizers_match

    log = read_log(trained)
    assert [r["step"] for r in log] == list(range(5, 41, 5))
    assert log[-1]["loss"] < log[0]["loss"] - 2, (log[0]["loss"], log[-1]["loss"])
    assert all(k in log[-1] for k in ("loss", "perplexity", "tokens_per_s", "lr", "step", "val_loss"))
    done = json.loads((trained / "pretrain_done.json").read_text())
    assert done["steps"] == 40 and done["val_loss"] < log[0]["loss"]

    ckpts = list_checkpoints(trained / "ray_results" / "pretrain")
    assert [s for s, _ in ckpts] == [40, 20]  # num_to_keep=2
    for path in (ckpts[0][1], trained / "draft_pretrained"):
        model = AutoModelForCausalLM.from_pretrained(path)
        check_tokenizers_match(target_tokenizer, AutoTokenizer.from_pretrained(path),
                               draft_vocab=model.config.vocab_size)
        assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert verify_checkpoint(ckpts[0][1]) == 40

    import torch

    state = torch.load(ckpts[0][1] / STATE_FILE, weights_only=False)
    assert state["step"] == 40 and state["cursor"] == 40 * 4
    assert {"optimizer", "scheduler", "rng", "config"} <= set(state)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tensorboard" / "pretrain"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 8 and len(acc.Scalars("val/val_loss")) == 2


def test_resume_on_two_workers_skips_a_truncated_checkpoint(trained, varied_corpus, tiny_draft_path, tmp_path,
                                                           ray_local, capfd):
    """Truncate the newest checkpoint (step 40) of the 1-worker run and resume it on 2 DDP workers:
    the corrupt checkpoint is named and skipped, training continues at step 21, and the losses of
    steps 21-40 repeat the uninterrupted 1-worker run's (global-token normalisation makes sharding
    invisible)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "pretrain_done.json").unlink()  # as if killed right after writing the step-40 checkpoint
    latest = list_checkpoints(run / "ray_results" / "pretrain")[0][1]
    weights = latest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        verify_checkpoint(latest)

    run_pretrain(reference_cfg(run, varied_corpus, tiny_draft_path, num_workers=2), resume=True,
                 log_every=LOG_EVERY)
    err = capfd.readouterr().err
    assert "skipping corrupt checkpoint" in err and latest.name in err
    done = json.loads((run / "pretrain_done.json").read_text())
    assert done["resumed_from_step"] == 20 and done["steps"] == 40
    log = read_log(run)
    resumed = [r for r in log if r["session"] != log[0]["session"]]
    assert [r["step"] for r in resumed] == [25, 30, 35, 40]
    saved = next(r for r in read_log(trained) if r["step"] == 20)["state_digest"]
    assert resumed[0]["restored_digest"] == saved  # 2 ranks restored the 1-rank run's exact state
    uninterrupted = {r["step"]: r["loss"] for r in read_log(trained)}
    for r in resumed:
        assert math.isclose(r["loss"], uninterrupted[r["step"]], rel_tol=0.01), (
            r["step"], r["loss"], uninterrupted[r["step"]])


KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from draftalign.config import JobConfig
    from learner.pretrain import run_pretrain
    ray.init(num_cpus=2, include_dashboard=False, address="local", _temp_dir=sys.argv[2])
    run_pretrain(JobConfig.model_validate(json.loads(sys.argv[1])), log_every=int(sys.argv[3]))
""")


def _kill_tree(pid: int) -> None:
    """SIGKILL the driver and every descendant (GCS, raylet, train workers) at once, then wait:
    Ray workers sit in their own process groups, and one that outlives the kill keeps training."""
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes survived the kill: {alive}"


def _last_logged_step(path: Path) -> int:
    """Last step the (still running) trainer logged; a line being written is not yet a step."""
    step = 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            step = json.loads(line)["step"]
        except ValueError:
            break
    return step


def _first_good_checkpoint(exp: Path) -> int | None:
    for _, d in list_checkpoints(exp):
        try:
            return verify_checkpoint(d)
        except CorruptCheckpoint:
            continue
    return None


def test_killed_run_resumes_without_a_jump(trained, varied_corpus, tiny_draft_path, tmp_path, ray_local):
    """SIGKILL a run (driver, Ray and workers) after it has logged past its first good checkpoint,
    resume it, and hold it against an uninterrupted run of the same job. Proven on state, not counters:
    the restored weights + optimizer hash to the digest saved at the checkpoint (and to the uninterrupted
    run's at that step); the batches read between log rows hash the same as the uninterrupted run's, so the
    rows seen are the same rows in the same order, none missing or read twice (across an epoch boundary);
    the losses of every step match."""
    run = tmp_path / "run"
    cfg = reference_cfg(run, varied_corpus, tiny_draft_path)
    exp = run / "ray_results" / "pretrain"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json(), ray_tmp, str(LOG_EVERY)],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while True:
            good = _first_good_checkpoint(exp)
            logged = _last_logged_step(run / "pretrain_log.jsonl")
            if good is not None and logged > good:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within 400 s"
            time.sleep(0.1)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not (run / "pretrain_done.json").exists()
    before = read_log(run)
    assert before[-1]["step"] < 40

    run_pretrain(cfg, resume=True, log_every=LOG_EVERY)
    done = json.loads((run / "pretrain_done.json").read_text())
    start = done["resumed_from_step"]
    assert start == 20 and done["steps"] == 40
    after = read_log(run)[len(before):]
    assert [r["step"] for r in after] == list(range(start + LOG_EVERY, 41, LOG_EVERY))  # continuous
    pre = {r["step"]: r["loss"] for r in before}
    assert abs(after[0]["loss"] - pre[start]) < 0.1 * pre[start], (after[0]["loss"], pre[start])  # no jump
    repeated = [r for r in after if r["step"] in pre]
    assert repeated, "the killed run should have logged past the checkpoint it resumes from"
    for r in repeated:
        assert math.isclose(r["loss"], pre[r["step"]], rel_tol=0.01), (r["step"], r["loss"], pre[r["step"]])

    saved = torch.load(_checkpoint_at(run, 20) / STATE_FILE, weights_only=False)["state_digest"]
    assert after[0]["restored_digest"] == saved == {r["step"]: r for r in before}[20]["state_digest"]
    uninterrupted = {r["step"]: r for r in read_log(trained)}  # the same job, never killed
    effective = [r for r in before if r["step"] <= start] + after
    assert [r["step"] for r in effective] == sorted(uninterrupted) == list(range(LOG_EVERY, 41, LOG_EVERY))
    assert [r["batch_digest"] for r in effective] == [uninterrupted[r["step"]]["batch_digest"] for r in effective]
    assert saved == uninterrupted[20]["state_digest"]  # the state at the checkpoint is the uninterrupted run's
    for r in effective:
        assert math.isclose(r["loss"], uninterrupted[r["step"]]["loss"], rel_tol=1e-4), (r, uninterrupted[r["step"]])


def _checkpoint_at(run: Path, step: int) -> Path:
    return next(d for s, d in list_checkpoints(run / "ray_results" / "pretrain") if s == step)


def test_a_restored_state_that_differs_from_the_saved_one_is_refused(tiny_draft_path):
    """Negative control of the digest check: one changed weight, or one changed optimizer moment, is caught."""
    from transformers import AutoModelForCausalLM

    from learner.trainer import check_restored, state_digest

    model = AutoModelForCausalLM.from_pretrained(tiny_draft_path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    state = {"step": 1, "state_digest": state_digest(model, opt)}
    assert check_restored(model, opt, state, Path("checkpoint_step_1")) == state["state_digest"]
    moment = next(iter(opt.state.values()))["exp_avg"]
    moment.view(-1)[0] += 1e-6
    with pytest.raises(CorruptCheckpoint, match="restored weights and optimizer differ"):
        check_restored(model, opt, state, Path("checkpoint_step_1"))
    moment.view(-1)[0] -= 1e-6
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(CorruptCheckpoint, match="step 1"):
        check_restored(model, opt, state, Path("checkpoint_step_1"))
