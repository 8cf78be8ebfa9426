"""The trainer runtime stages 1 and 3 share: checkpoints (manifest, verification, newest good one,
what a restarted Ray Train worker restores), where a stage starts (fresh / resume / done), the
optimizer and its schedule, RNG state, worker resources, the exported draft, and logging.

Checkpoint layout (both stages): `<run_dir>/ray_results/<stage>/checkpoint_step_<step>_<session>/` with
the HF-format draft, `trainer_state.pt` and `manifest.json` (size + sha256 of every file, written last:
its presence and matching files make a checkpoint complete).

A URI run (`draftalign.storage`): Ray Train uploads checkpoints to the storage itself (`RunConfig(storage_path,
storage_filesystem)`); the driver pulls a stage's checkpoints into its staging copy to choose where to resume, a
worker pulls the checkpoint or starting draft it is given, and rank 0 publishes its JSONL log and TensorBoard
events after every checkpoint (`stage_logs_in`, `publish_logs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from draftalign.io import atomic_dir
from draftalign.models import cpu_flags
from draftalign.storage import ensure_local, exists, move, published, pull, ray_storage, remove

STATE_FILE = "trainer_state.pt"

MANIFEST = "manifest.json"

CKPT_RE = re.compile(r"^checkpoint_step_(\d+)_([0-9a-z]+)$")

def say_as(tag: str, msg: str) -> None:
    # not print(): inside Ray Train workers print is patched to log *and* echo, printing twice;
    # tqdm.write: on the driver, a live progress line (draftalign.progress) is redrawn below it
    tqdm.write(f"[{tag}] {msg}", file=sys.stderr)
    sys.stderr.flush()


_say = partial(say_as, "train")

class CorruptCheckpoint(RuntimeError):
    """A checkpoint dir whose files do not match its manifest (e.g. a kill during the upload)."""

def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def write_manifest(ckpt_dir: Path, step: int) -> None:
    files = {str(f.relative_to(ckpt_dir)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(ckpt_dir.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (ckpt_dir / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))

def verify_checkpoint(ckpt_dir: str | Path) -> int:
    """Return the checkpoint's step, or raise CorruptCheckpoint naming the first problem."""
    d = Path(ckpt_dir)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{d.name}: no {MANIFEST} (write interrupted?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{d.name}: unreadable {MANIFEST} ({e})") from None
    for req in (STATE_FILE, "config.json"):
        if req not in files:
            raise CorruptCheckpoint(f"{d.name}: manifest lists no {req}")
    for name, meta in files.items():
        f = d / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{d.name}: {name} is missing")
        if f.stat().st_size != meta["size"]:
            raise CorruptCheckpoint(f"{d.name}: {name} has {f.stat().st_size} bytes, "
                                    f"manifest says {meta['size']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CorruptCheckpoint(f"{d.name}: {name} does not match its sha256")
    return int(manifest["step"])

def list_checkpoints(exp_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint dir, newest first."""
    found = []
    for d in exp_dir.glob("checkpoint_step_*") if exp_dir.is_dir() else []:
        m = CKPT_RE.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d.stat().st_mtime, d))
    return [(s, d) for s, _, d in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]

def latest_good_checkpoint(exp_dir: Path, skipped: list[str] | None = None,
                           say=None) -> tuple[int, Path] | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported (through `say`, and
    appended to `skipped` when given) and skipped."""
    for step, d in list_checkpoints(exp_dir):
        try:
            verify_checkpoint(d)
            return step, d
        except CorruptCheckpoint as e:
            (say or _say)(f"WARNING: skipping corrupt checkpoint {e}; falling back to the previous one")
            if skipped is not None:
                skipped.append(str(e))
    return None

@contextlib.contextmanager
def checkpoint_to_restore(resume_from: str | None, say=None):
    """The checkpoint dir a starting Ray Train worker loads (a context: a checkpoint on remote
    storage is downloaded for its duration), or None for a fresh start.

    Ray Train's latest reported checkpoint (`ray.train.get_checkpoint()`) comes first: it is set
    when Ray Train restarted the worker group after a failure in this run (FailureConfig), and on a
    resumed run (from the run snapshot in the experiment dir). It is verified like any other: when
    corrupt, the newest good checkpoint next to it is used. Without one, `resume_from` (the
    driver's verified choice). Every rank makes the same choice: they see the same files.
    """
    import ray.train

    say = say or _say
    resume_from = str(ensure_local(resume_from)) if resume_from else None  # the driver's pick, on any node
    ckpt = ray.train.get_checkpoint()
    driver_step = verify_checkpoint(resume_from) if resume_from else -1
    if ckpt is not None:
        with ckpt.as_directory() as d:
            try:
                step = verify_checkpoint(d)
            except CorruptCheckpoint as e:
                say(f"WARNING: Ray Train's latest checkpoint is corrupt: {e}")
                step = None
            # a complete checkpoint whose registration a kill cut off is newer than Ray's latest:
            # the driver found it, so the higher step wins
            if step is not None and step >= driver_step:
                yield Path(d)
                return
        found = latest_good_checkpoint(Path(ckpt.path).parent, say=say) if Path(ckpt.path).is_dir() else None
        if found is not None and found[0] >= driver_step:
            yield found[1]
            return
    yield Path(resume_from) if resume_from else None

def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

def param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

def autocast_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """bf16 autocast on GPUs that support it and on CPUs with AMX tiles. Measured on 2 threads: with
    avx512_bf16 but no AMX, fp32 trained the 4x256 draft at 1.19k tok/s and bf16 autocast at 0.63k; with
    AMX, a 6x384 draft's training step (16 x 160 tokens) took 1.1 s in fp32 and 0.67 s in bf16 autocast."""
    if mode == "off":
        return None
    if mode == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if "amx_bf16" in cpu_flags() else None

def all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t

def state_digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """blake2b over every parameter (by name) and every optimizer state tensor and hyper-parameter:
    a restored run holds the checkpoint's state iff its digest equals the one saved with it."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    sd = opt.state_dict()
    for i in sorted(sd["state"]):
        for k, v in sorted(sd["state"][i].items()):
            h.update(f"{i}.{k}".encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    h.update(repr([{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]).encode())
    return h.hexdigest()


def check_restored(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, ckpt: Path) -> str:
    """The restored state's digest; CorruptCheckpoint when it is not the one the checkpoint saved
    (checkpoints written before digests existed carry none and pass)."""
    got = state_digest(model, opt)
    if state.get("state_digest") not in (None, got):
        raise CorruptCheckpoint(f"{Path(ckpt).name}: the restored weights and optimizer differ from the state "
                                f"saved at step {state.get('step')} (digest {got} != {state['state_digest']})")
    return got


class BatchDigest:
    """An order-sensitive digest of the token rows a rank consumed since the last `take()`: two runs read the
    same batches in the same order between two log rows iff their digests match (ranks gathered in order)."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=8)

    def update(self, rows: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())

    def take(self, world: int) -> str:
        import torch.distributed as dist

        mine, self._h = self._h.hexdigest(), hashlib.blake2b(digest_size=8)
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return hashlib.blake2b("".join(ranks).encode(), digest_size=8).hexdigest()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}

def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])

def quiet_train_worker_logs() -> None:
    """Ray Train V2 logs every report at INFO ("Reporting training result ..."); the progress bar
    and our checkpoint lines say the same, so keep only its warnings."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_ctx
    except ImportError:
        return
    logging.getLogger(train_ctx.__file__).setLevel(logging.WARNING)  # that logger is named by file


def worker_setup(config: dict, cpus_per_worker: float | None = None):
    """What every stage's `train_loop_per_worker` starts with: quiet Ray Train logs, the job config,
    (rank, world size), torch threads = ceil(CPUs per worker) (default `learner.cpus_per_worker`), and
    the device. Returns (cfg, rank, world, device)."""
    import ray.train
    import ray.train.torch

    from draftalign.config import JobConfig

    quiet_train_worker_logs()
    cfg = JobConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    cpus = cfg.learner.cpus_per_worker if cpus_per_worker is None else cpus_per_worker
    torch.set_num_threads(max(1, math.ceil(cpus - 1e-9)))
    return cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def worker_resources(cpus: float, use_gpu: bool, custom: dict[str, float]) -> dict[str, float]:
    """Ray Train `resources_per_worker`: the custom resources of `learner.resources` plus CPUs and,
    with use_gpu, one GPU (the dedicated fields win over same-named custom keys)."""
    return {**custom, "CPU": cpus, **({"GPU": 1} if use_gpu else {})}

def export_draft(ckpt: Path, tok, dest: Path, draft_vocab: list[int] | None = None) -> Path:
    """The checkpoint's draft as a plain HF dir at `dest` (atomically), with its draft vocabulary file."""
    from transformers import AutoModelForCausalLM

    from draftalign.vocab import save_draft_vocab

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if draft_vocab is not None:
            save_draft_vocab(tmp, draft_vocab)

    return atomic_dir(dest, write)

def result_checkpoint(result, exp: Path) -> Path:
    """The local dir of a finished stage's last checkpoint: Ray's path for a run on a path, the staging copy
    (pulled) for a URI run, where Ray's path is a key in the storage."""
    return ensure_local(exp / Path(result.checkpoint.path).name)


def stage_logs_in(config: dict) -> None:
    """Rank 0, before it appends to the stage's JSONL log and TensorBoard events: this node's copy of them is
    storage's (a URI run; no-op otherwise)."""
    Path(config["log_path"]).parent.mkdir(parents=True, exist_ok=True)
    for key in ("tb_dir", "log_path"):
        pull(config[key])


def publish_logs(config: dict) -> None:
    """Rank 0, after a checkpoint: the log and TensorBoard events so far, to storage (a URI run; no-op otherwise)."""
    for key in ("log_path", "tb_dir"):
        if Path(config[key]).exists():
            published(config[key])


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW(β = 0.9, 0.95), fused into one kernel per step (CPU and CUDA). Measured on the 4 × 256
    draft, 2 threads: distill step 924 vs 1019 ms, pretraining step (8 × 256) 3441 vs 3522 ms."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)

def close_worker_bars() -> None:
    """Drop the driver's copies of the workers' tqdm_ray bars (pretraining, --verbose) once training
    has returned. The workers close theirs, but the "closed" update can be lost when Ray Train tears
    the worker down, and the stale bar was then redrawn under every later log line of `draftalign run`."""
    try:
        from ray.experimental import tqdm_ray

        mgr = tqdm_ray.instance()
        for group in list(mgr.bar_groups.values()):
            for bar in list(group.bars_by_uuid.values()):
                group.close_bar(bar.state)
    except Exception:  # noqa: BLE001 - cosmetic: never fail a finished run over a progress bar
        pass

def fit_stage(train_loop, config: dict, *, name: str, storage: Path, num_workers: int, use_gpu: bool,
              resources_per_worker: dict, max_failures: int, log_path: Path, total: int, start_step: int,
              fields: dict[str, str]):
    """Run one training stage on Ray Train and return its `Result`.

    A `TorchTrainer` over `train_loop` with `num_workers` ranks; the experiment `<storage>/<name>`
    keeps the two newest checkpoints, and a failed worker group is restarted from the latest one
    up to `max_failures` times. In quiet mode the driver shows one live line for the stage, fed by
    the JSONL log rank 0 writes (`draftalign.progress.follow_log`, `fields` {log key: label}).
    Raises RuntimeError naming the stage when training failed.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from draftalign.progress import follow_log
    from draftalign.runtime import quiet

    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(**ray_storage(storage), name=name,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)))
    progress = (follow_log(log_path, total, name, fields, initial=start_step) if quiet()
                else contextlib.nullcontext())
    with progress:
        result = trainer.fit()
    close_worker_bars()
    if result.error is not None:
        raise RuntimeError(f"{name} failed: {result.error}") from result.error
    return result

def prepare_resume(resume: bool, *, exp: Path, done_path: Path, final: Path, max_steps: int,
                   tb_dir: Path, log_path: Path, skipped: list | None = None,
                   fallback: str = "scratch", say=_say) -> tuple[str, int, Path | None]:
    """Decide where a stage starts; shared by pretraining and distillation.

    Returns ("done", steps, None) when `done_path` already covers `max_steps` (the export in
    `final` is complete), ("resume", step, checkpoint) for the newest good checkpoint, else
    ("fresh", 0, None). A fresh start (resume=False) moves the earlier run's checkpoints aside
    to `<exp>.prev` and clears its TensorBoard events and JSONL log. The completion marker is
    removed in both non-done cases: it is rewritten only when the stage ends.
    """
    start_step, resume_from = 0, None
    if resume:
        pull(exp)  # a URI run: the stage's checkpoints, from storage
        if done_path.is_file() and (final / "config.json").is_file():
            done = json.loads(done_path.read_text())
            if done.get("steps", 0) >= max_steps:
                say(f"already done ({done['steps']} steps ≥ max_steps {max_steps}): {final}")
                return "done", done["steps"], None
        found = latest_good_checkpoint(exp, skipped=skipped, say=say)
        if found is None:
            say(f"WARNING: resume asked but no good checkpoint under {exp}; starting from {fallback}")
        else:
            start_step, resume_from = found
            say(f"resuming from {resume_from} (step {start_step})")
    else:
        if exists(exp):
            prev = exp.with_name(exp.name + ".prev")
            remove(prev)
            move(exp, prev)
            say(f"fresh start: the earlier run's checkpoints moved to {prev}")
        remove(tb_dir)
        remove(log_path)
    done_path.unlink(missing_ok=True)
    return ("resume" if resume_from is not None else "fresh"), start_step, resume_from
