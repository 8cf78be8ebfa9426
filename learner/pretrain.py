"""Stage 1: pretrain the draft on plain text with Ray Train (DDP), resumable after a kill.

Data. `pretrain.corpus` documents (embedded chitchat, local .txt / .jsonl / .parquet files or
directories, `datasets` names) are shuffled by seed, tokenized once with the **target's**
tokenizer with EOS after every document, and cached under the run dir. A few held-out documents
(or, for tiny corpora, the stream's tail) give the validation loss. The stream is packed into
blocks of seq_len + 1 tokens (stride seq_len: every token is predicted exactly once per epoch).
Step s reads global samples [cursor, cursor + batch_size) of an endless sequence of per-epoch
permutations seeded by (seed, epoch); rank r takes every world-th of them. The data position is
therefore one integer, `cursor`, saved in every checkpoint.

Loss. Summed token cross-entropy divided by the *global* token count, times world size (DDP
averages gradients over ranks), so sharding does not change the gradient.

Checkpoints (Ray Train, `<run_dir>/ray_results/pretrain/checkpoint_step_<step>_<session>/`): the
HF-format draft (`save_pretrained` + tokenizer, loadable unchanged by transformers and vLLM),
`trainer_state.pt` (optimizer, scheduler, step, cursor, per-rank torch/numpy/python RNG, config
dump) and `manifest.json` (size + sha256 of every file, written last). Rank 0 writes; every rank
calls `ray.train.report`.

Resume. The driver lists checkpoint dirs newest first (step, then mtime), verifies each against
its manifest, says which ones are corrupt or incomplete, and hands the newest good one to the
workers, which restore model, optimizer, scheduler, RNG and cursor: the resumed run continues at
the next step with the same batch it would have seen.

Failures inside a run. `FailureConfig(max_failures=learner.max_failures)`: when a worker dies,
Ray Train restarts the whole worker group, and each worker loads Ray Train's latest reported
checkpoint (`checkpoint_to_restore`, verified like the driver's choice): the step goes back to that
checkpoint, never further. The workers' resources are `pretrain.cpus_per_worker` (+ a GPU) plus the
custom Ray resources of `learner.resources` (the same learner nodes as stage 3).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from draftalign.batching import BatchSampler
from draftalign.config import JobConfig
from draftalign.io import write_atomic, write_json_atomic
from draftalign.models import (
    build_draft,
    load_causal_lm,
    load_draft,
    load_tokenizer,
    local_path,
    resolve_target,
    save_pretrained_atomic,
)
from draftalign.runtime import init_ray, quiet, run_dir
from draftalign.storage import ensure_local
from draftalign.vocab import job_draft_vocab
from learner.draft_head import DraftHead, DraftLM
from learner.heldout import heldout_prompt_ids
from learner.trainer import (
    STATE_FILE,
    BatchDigest,
    adamw,
    all_reduce,
    autocast_dtype,
    check_restored,
    checkpoint_to_restore,
    export_draft,
    fit_stage,
    lr_factor,
    param_groups,
    prepare_resume,
    publish_logs,
    result_checkpoint,
    rng_state,
    say_as,
    set_rng_state,
    stage_logs_in,
    state_digest,
    verify_checkpoint,
    worker_resources,
    worker_setup,
    write_manifest,
)

EXPERIMENT = "pretrain"
VAL_FRACTION = 0.02       # share of documents held out for the validation loss
VAL_MIN_DOCS = 50         # fewer documents than this: hold out the stream's tail instead
VAL_MAX_BLOCKS = 32       # cap on validation blocks (a validation pass must stay cheap)


_say = partial(say_as, "pretrain")


# ----------------------------------------------------------------------------------------- data

def _text_column_docs(ds, src: str) -> list[str]:
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    col = "text" if "text" in ds.column_names else (cols[0] if cols else None)
    if col is None:
        raise ValueError(f"pretrain.corpus entry {src!r} has no text column (columns: {ds.column_names})")
    return [t for t in ds[col] if t]


def load_documents(sources: list[str], run_path: Path | None = None) -> list[str]:
    """Documents of every corpus entry: `embedded:chitchat`, `run:distill_set` (this run's target
    answers, each with its chat-templated prompt: sequence-level KD; not the held-out prompts, learner.heldout),
    .txt / .jsonl / .parquet files or directories of them, or a `datasets` name (`name` or `name:config`, split
    train)."""
    from draftalign.data import pretrain_texts

    docs: list[str] = []
    for src in sources:
        p = Path(os.path.expanduser(src))
        if src == "run:distill_set":
            from draftalign.distset import load_distill_set

            if run_path is None:
                raise ValueError("pretrain.corpus entry run:distill_set needs the run directory")
            data = load_distill_set(run_path).select_columns(["prompt_id", "prompt", "response_text"]).to_list()
            held = heldout_prompt_ids(r["prompt_id"] for r in data)  # stage 3 measures acceptance on them
            docs += [r["prompt"] + r["response_text"] for r in data if str(r["prompt_id"]) not in held]
        elif src.startswith("embedded:") or (p.is_file() and p.suffix in (".txt", ".jsonl")):
            docs += pretrain_texts([src])
        elif p.is_dir() or (p.is_file() and p.suffix == ".parquet"):
            parquet = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
            if p.is_dir():
                docs += pretrain_texts([src])
            if parquet:
                import datasets

                ds = datasets.load_dataset("parquet", data_files=[str(f) for f in parquet], split="train")
                docs += _text_column_docs(ds, src)
        elif p.exists():
            raise ValueError(f"pretrain.corpus entry {src!r}: unsupported file type {p.suffix!r} "
                             "(use .txt, .jsonl with a 'text' field, or .parquet)")
        elif src.startswith(("/", ".", "~")) or p.suffix in (".txt", ".jsonl", ".parquet"):
            raise ValueError(f"pretrain.corpus entry {src!r} does not exist")
        else:
            import datasets

            name, _, conf = src.partition(":")
            try:
                ds = datasets.load_dataset(name, conf or None, split="train")
            except Exception as e:  # noqa: BLE001 - any loader failure means the same thing here
                raise ValueError(f"pretrain.corpus entry {src!r} is neither embedded:chitchat, an existing "
                                 f"path nor a loadable dataset: {str(e).splitlines()[0]}") from None
            docs += _text_column_docs(ds, src)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"pretrain.corpus {sources} holds no text")
    return docs


def _tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{type(tok).__name__}|{len(tok)}|{tok.eos_token_id}|{text}".encode()).hexdigest()


def _tokenize(docs: list[str], tok) -> np.ndarray:
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    eos = tok.eos_token_id
    assert eos is not None, "the target tokenizer has no EOS token to separate documents"
    parts = []
    for i in range(0, len(docs), 1000):
        for ids in tok(docs[i:i + 1000], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _savez(path: Path, streams: dict) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a path
        np.savez(f, **streams)


def prepare_tokens(cfg: JobConfig, tok, rdir: Path) -> tuple[dict[str, np.ndarray], str]:
    """Token streams {"train", "val"} of the corpus, cached in `<run_dir>/pretrain_data/` keyed by
    the documents, the tokenizer and the seed (so a restart skips tokenization)."""
    docs = load_documents(cfg.pretrain.corpus, rdir)
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    key = hashlib.sha256(f"{h.hexdigest()}|{_tokenizer_fingerprint(tok)}|{cfg.seed}|{VAL_FRACTION}|"
                         f"{VAL_MIN_DOCS}".encode()).hexdigest()[:16]
    path = rdir / "pretrain_data" / f"tokens-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {"train": z["train"], "val": z["val"]}, key
        except (OSError, ValueError, KeyError) as e:
            _say(f"token cache {path} is unreadable ({e}); tokenizing again")
    t0 = time.time()
    order = np.random.default_rng(cfg.seed).permutation(len(docs))
    n_val = int(round(len(docs) * VAL_FRACTION)) if len(docs) >= VAL_MIN_DOCS else 0
    streams = {"val": _tokenize([docs[i] for i in order[:n_val]], tok),
               "train": _tokenize([docs[i] for i in order[n_val:]], tok)}
    write_atomic(path, lambda tmp: _savez(tmp, streams))  # a killed writer leaves no half cache
    _say(f"tokenized {len(docs)} documents: {len(streams['train']):,} train + {len(streams['val']):,} "
         f"val tokens in {time.time() - t0:.1f}s -> {path}")
    return streams, key


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(n, seq_len + 1) view of overlapping-by-one blocks: inputs [:-1], targets [1:]."""
    n = max(0, (len(stream) - 1) // seq_len)
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=stream.dtype)
    return np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n]


def split_blocks(streams: dict[str, np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train blocks, val blocks). Without held-out documents the stream's tail is held out."""
    train, val = pack(streams["train"], seq_len), pack(streams["val"], seq_len)
    if len(val) == 0:
        k = max(1, min(VAL_MAX_BLOCKS, len(train) // 20))
        train, val = train[:-k], train[-k:]
    if len(train) == 0:
        raise ValueError(f"pretrain.corpus is too small: {len(streams['train'])} tokens give no training "
                         f"block of pretrain.seq_len={seq_len} (+ a held-out one); add text or lower seq_len")
    return train, val[:VAL_MAX_BLOCKS]


# ---------------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------------- worker loop


@torch.no_grad()
def _val_loss(core, val: np.ndarray, rank: int, world: int, batch: int, device, amp) -> float:
    core.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    mine = val[rank::world]
    for i in range(0, len(mine), batch):
        blk = torch.from_numpy(mine[i:i + batch].astype(np.int64)).to(device)  # (b, T + 1)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = core(blk[:, :-1])  # (b, T, n)
        labels = core.head.labels(blk[:, 1:].flatten())
        tot[0] += F.cross_entropy(logits.float().flatten(0, 1), labels, reduction="sum", ignore_index=-1)
        tot[1] += int((labels >= 0).sum())
    core.train()
    all_reduce(tot)
    return float(tot[0] / tot[1].clamp(min=1))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: DDP pretraining from `init_dir` or the checkpoint `resume_from`."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.experimental.tqdm_ray import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with ours
    cfg, rank, world, device = worker_setup(config, cpus_per_worker=int(config["cpus_per_worker"]))
    pc = cfg.pretrain
    amp = autocast_dtype(device, pc.autocast)
    B, T = pc.batch_size, pc.seq_len
    assert B >= world, f"pretrain.batch_size={B} must be ≥ num_workers={world}"

    with checkpoint_to_restore(config["resume_from"], say=_say) as ckpt_dir:  # None: fresh start
        src = str(ckpt_dir or ensure_local(config["init_dir"]))
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False) if ckpt_dir else None
        restored_name = ckpt_dir.name if ckpt_dir else None
    model.train()
    head = DraftHead(config.get("draft_vocab"), model.config.vocab_size)
    model = ray.train.torch.prepare_model(DraftLM(model, head))
    core = model.module if hasattr(model, "module") else model
    opt = adamw(param_groups(core, pc.weight_decay), lr=pc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(
        lr_factor, warmup=pc.warmup_steps, max_steps=pc.max_steps, min_ratio=pc.min_lr_ratio))
    step, cursor, digests = 0, 0, {}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        digests["restored_digest"] = check_restored(core, opt, state, restored_name)
        step, cursor = state["step"], state["cursor"]
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)

    streams = ray.get(config["tokens_ref"])
    train, val = split_blocks(streams, T)
    sampler = BatchSampler(len(train), cfg.seed)
    seen = BatchDigest()  # the rows read since the last log row: resume proofs compare them across runs

    writer = bar = log = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        stage_logs_in(config)
        # purge_step drops events a killed run logged after the checkpoint we resume from
        writer = SummaryWriter(config["tb_dir"], purge_step=step + 1 if step else None)
        log = open(config["log_path"], "a")
        if config["worker_bar"]:  # --verbose; in quiet mode the driver follows the JSONL log
            bar = tqdm(total=pc.max_steps, desc="pretrain", unit="step")
            bar.n = step
        _say(f"rank 0/{world}: {'resuming at step ' + str(step) if step else 'starting'}; "
             f"{len(train)} train / {len(val)} val blocks of {T}; batch {B}; autocast {amp}")

    win_loss, win_steps, win_time = 0.0, 0, 0.0
    while step < pc.max_steps:
        t0 = time.perf_counter()
        idx = sampler.indices(cursor, B)[rank::world]
        seen.update(train[idx])
        blk = torch.from_numpy(train[idx].astype(np.int64)).to(device)  # (b, T + 1)
        lr = opt.param_groups[0]["lr"]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(blk[:, :-1])  # (b, T, n)
        # targets outside the draft's vocabulary carry no loss (the draft can never propose them)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), head.labels(blk[:, 1:].flatten()),
                                   reduction="sum", ignore_index=-1)
        (loss_sum * (world / (B * T))).backward()  # out-of-vocabulary targets count as zero-loss tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, cursor = step + 1, cursor + B
        loss = float(all_reduce(loss_sum.detach().double())) / (B * T)
        win_loss, win_steps, win_time = win_loss + loss, win_steps + 1, win_time + time.perf_counter() - t0

        is_ckpt = step % pc.checkpoint_every == 0 or step == pc.max_steps
        if bar is not None:
            bar.update(1)
        if not (is_ckpt or step % config["log_every"] == 0):
            continue
        mean = win_loss / win_steps
        metrics = {"step": step, "loss": mean, "perplexity": math.exp(min(mean, 50.0)),
                   "tokens_per_s": win_steps * B * T / max(win_time, 1e-9), "lr": lr,
                   "grad_norm": grad_norm, "epoch": cursor / len(train)}
        win_loss, win_steps, win_time = 0.0, 0, 0.0
        if is_ckpt:
            metrics["val_loss"] = _val_loss(core, val, rank, world, B, device, amp)
            metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 50.0))
        digests["batch_digest"] = seen.take(world)
        rngs = [None] * world
        if is_ckpt and world > 1:
            dist.all_gather_object(rngs, rng_state())
        elif is_ckpt:
            rngs = [rng_state()]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                for k, v in metrics.items():
                    if k != "step":
                        writer.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, step)
                saved = state_digest(core, opt) if is_ckpt else None
                if saved:
                    digests["state_digest"] = saved
                log.write(json.dumps({**metrics, "session": config["session"], **digests}) + "\n")
                log.flush()
                digests = {}
                if bar is not None:
                    bar.set_description(f"pretrain loss {mean:.3f} {metrics['tokens_per_s']:,.0f} tok/s")
                if is_ckpt:
                    writer.flush()
                    d = Path(tmp)
                    core.lm.save_pretrained(d)
                    tokenizer.save_pretrained(d)
                    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                                "cursor": cursor, "rng": rngs, "config": config["cfg"],
                                "data_key": config["data_key"], "metrics": metrics,
                                "state_digest": saved}, d / STATE_FILE)
                    write_manifest(d, step)  # last: its presence + matching files = a complete checkpoint
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    _say(f"step {step}: loss {mean:.4f} val_loss {metrics['val_loss']:.4f} "
                         f"{metrics['tokens_per_s']:,.0f} tok/s -> checkpoint")
            name = f"checkpoint_step_{step:08d}_{config['session']}" if is_ckpt else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
            if rank == 0 and is_ckpt:
                publish_logs(config)
    if bar is not None:
        bar.close()
        sys.stdout.flush()  # the "closed" state must reach the driver before Ray Train kills this worker
    if rank == 0:
        writer.close()
        log.close()


# --------------------------------------------------------------------------------------- driver


def _build_initial_draft(cfg: JobConfig, tok, target_path: str, dest: Path) -> Path:
    from transformers import AutoConfig

    if cfg.draft.model:
        vocab = AutoConfig.from_pretrained(target_path).vocab_size
        draft = load_draft(str(local_path(cfg.draft.model)), tok, target_vocab=vocab)
        _say(f"draft: starting from {cfg.draft.model}")
    else:
        target = load_causal_lm(target_path) if cfg.draft.init != "random" else None
        draft = build_draft(cfg.draft.arch, tok, target=target, init=cfg.draft.init,
                            copy_layers=cfg.draft.copy_layers, seed=cfg.seed)
        del target
        gc.collect()  # the 135M+ target must not sit in the driver for the whole run
        n = sum(p.numel() for p in draft.parameters())
        _say(f"draft: fresh {cfg.draft.arch.num_layers} layers x {cfg.draft.arch.hidden_size}, init "
             f"{cfg.draft.init}, {n / 1e6:.1f}M parameters")
    return save_pretrained_atomic(draft, tok, dest)


def run_pretrain(cfg: JobConfig, resume: bool = False, *, log_every: int = 10) -> Path:
    """Pretrain the draft; return `<run_dir>/draft_pretrained/` (HF format).

    resume=True continues from the newest good checkpoint (or returns at once when
    `pretrain_done.json` already covers `pretrain.max_steps`); resume=False starts over and moves
    an earlier run's checkpoints to `ray_results/pretrain.prev`.
    """
    import ray

    t_start = time.time()
    pc = cfg.pretrain
    rdir = run_dir(cfg)
    final, done_path = rdir / "draft_pretrained", rdir / "pretrain_done.json"
    storage, log_path = rdir / "ray_results", rdir / "pretrain_log.jsonl"
    tb_dir = rdir / "tensorboard" / "pretrain"
    exp = storage / EXPERIMENT
    target_path = resolve_target(cfg.target.model)
    tok = load_tokenizer(target_path)

    start, start_step, resume_from = prepare_resume(
        resume, exp=exp, done_path=done_path, final=final, max_steps=pc.max_steps,
        tb_dir=tb_dir, log_path=log_path, say=_say)
    if start == "done":
        return final

    draft_vocab = None
    if resume_from is not None and start_step >= pc.max_steps:
        _say(f"checkpoint step {start_step} ≥ max_steps {pc.max_steps}: exporting it")
        metrics = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)["metrics"]
    else:
        streams, data_key = prepare_tokens(cfg, tok, rdir)
        split_blocks(streams, pc.seq_len)  # fail here, with the message, not inside a worker
        draft_vocab = job_draft_vocab(cfg, rdir, fallback=[streams["train"]])  # counted only without a set
        init_dir = None
        if resume_from is None:
            init_dir = _build_initial_draft(cfg, tok, target_path, rdir / "pretrain_init")
        init_ray(cfg)
        need = pc.num_workers * pc.cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:
            raise ValueError(f"pretrain needs {need:g} CPUs (num_workers x cpus_per_worker) but the Ray "
                             f"cluster has {have:g}")
        tb_dir.mkdir(parents=True, exist_ok=True)
        config = {"cfg": cfg.model_dump(mode="json"), "tokens_ref": ray.put(streams), "data_key": data_key,
                  "draft_vocab": draft_vocab,
                  "init_dir": str(init_dir) if init_dir else None,
                  "resume_from": str(resume_from) if resume_from else None,
                  "tb_dir": str(tb_dir), "log_path": str(log_path), "log_every": max(1, log_every),
                  "cpus_per_worker": pc.cpus_per_worker, "session": uuid.uuid4().hex[:8],
                  "worker_bar": not quiet()}
        result = fit_stage(train_loop_per_worker, config, name=EXPERIMENT, storage=storage,
                           num_workers=pc.num_workers, use_gpu=pc.use_gpu,
                           resources_per_worker=worker_resources(pc.cpus_per_worker, pc.use_gpu,
                                                                 cfg.learner.resources),
                           max_failures=cfg.learner.max_failures, log_path=log_path, total=pc.max_steps,
                           start_step=start_step, fields={"loss": "loss", "val_loss": "val_loss"})
        resume_from = result_checkpoint(result, exp)
        verify_checkpoint(resume_from)
        metrics = result.metrics
    export_draft(resume_from, tok, final, draft_vocab or job_draft_vocab(cfg, rdir))
    done = {"steps": metrics["step"], "final_loss": metrics["loss"], "val_loss": metrics.get("val_loss"),
            "tokens_per_s": metrics.get("tokens_per_s"), "wall_time_s": round(time.time() - t_start, 1),
            "resumed_from_step": start_step, "checkpoint": str(resume_from), "draft": str(final)}
    write_json_atomic(done_path, done)
    _say(f"done: step {done['steps']}, loss {done['final_loss']:.4f}, val_loss "
         f"{done['val_loss']:.4f}, {done['wall_time_s']}s -> {final}")
    return final
