"""Stage-1 pretraining: random-init draft vs a draft built from the target, at equal wall time.

Arms (embedded SmolLM2-135M-Instruct target, chitchat train text, same held-out validation blocks):
  random       4 layers x 256, fresh weights
  from_target  2 layers x 576 (the target's width and heads), embeddings + target layers 0 and 29
Both arms first run short pilots back to back to measure their training throughput; each then gets
max_steps = budget x measured steps/s, so both arms train for about the same time and both finish
their cosine schedule. Reported: parameters, steps, tokens seen, tokens/s, validation loss before
training and at the end.

    .venv/bin/python bench/pretrain_init.py --out F.json [--minutes 3.5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftalign.config import EMBEDDED_TARGET, JobConfig  # noqa: E402
from learner.pretrain import prepare_tokens, run_pretrain, split_blocks  # noqa: E402

ARMS = {
    "random": {"arch": {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "intermediate_size": 704},
               "init": "random", "copy_layers": []},
    "from_target": {"arch": {"num_layers": 2, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3,
                             "intermediate_size": 1536},
                    "init": "from_target", "copy_layers": [0, 29]},
}


def arm_cfg(name: str, run_dir: Path, args, max_steps: int, checkpoint_every: int) -> JobConfig:
    arm = ARMS[name]
    return JobConfig.model_validate({
        "name": f"bench-{name}", "run_dir": str(run_dir), "seed": 0,
        "target": {"model": EMBEDDED_TARGET},
        "draft": {"arch": {**arm["arch"], "tie_embeddings": True, "max_position_embeddings": 2048},
                  "init": arm["init"], "copy_layers": arm["copy_layers"]},
        "pretrain": {"corpus": ["embedded:chitchat"], "max_steps": max_steps, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": min(20, max_steps // 10),
                     "checkpoint_every": checkpoint_every, "num_workers": 1, "cpus_per_worker": args.cpus}})


def seed_token_cache(src: Path | None, run_dir: Path) -> None:
    """Token caches are keyed by content, so a copy is valid: skip re-tokenizing chitchat."""
    if src is not None and (src / "pretrain_data").is_dir() and not (run_dir / "pretrain_data").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "pretrain_data", run_dir / "pretrain_data")


@torch.no_grad()
def val_loss_of(model_dir: Path, cfg: JobConfig, threads: int) -> float:
    """Validation loss of a saved model on exactly the blocks the trainer validates on."""
    from draftalign.models import load_tokenizer, pick_dtype, resolve_target

    torch.set_num_threads(threads)
    tok = load_tokenizer(resolve_target(cfg.target.model))
    streams, _ = prepare_tokens(cfg, tok, Path(cfg.run_dir))
    _, val = split_blocks(streams, cfg.pretrain.seq_len)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    amp = pick_dtype("auto") == torch.bfloat16
    tot, n = 0.0, 0
    for i in range(0, len(val), cfg.pretrain.batch_size):
        blk = torch.from_numpy(val[i:i + cfg.pretrain.batch_size].astype(np.int64))  # (b, T + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=blk[:, :-1]).logits  # (b, T, V)
        tot += float(F.cross_entropy(logits.float().flatten(0, 1), blk[:, 1:].flatten(), reduction="sum"))
        n += blk[:, 1:].numel()
    return tot / n


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "pretrain_log.jsonl").read_text().splitlines()]


def train_throughput(log: list[dict], tokens_per_step: int) -> tuple[float, float]:
    """(tokens/s, training seconds) over the logged windows after the first (start-up, warm-up)."""
    prev, tokens, secs = 0, 0, 0.0
    for i, r in enumerate(log):
        n = (r["step"] - prev) * tokens_per_step
        prev = r["step"]
        if i > 0 or len(log) == 1:
            tokens, secs = tokens + n, secs + n / r["tokens_per_s"]
    return tokens / secs, secs


def pilot(name: str, args, root: Path, cache_src: Path | None) -> float:
    """This arm's training tokens/s over a short run (first window dropped: start-up, warm-up)."""
    pilot_dir = root / f"{name}-pilot"
    shutil.rmtree(pilot_dir, ignore_errors=True)
    seed_token_cache(cache_src, pilot_dir)
    run_pretrain(arm_cfg(name, pilot_dir, args, args.pilot_steps, args.pilot_steps), log_every=4)
    tok_s, _ = train_throughput(read_log(pilot_dir), args.batch_size * args.seq_len)
    return tok_s


def run_arm(name: str, args, root: Path, tok_s: float) -> dict:
    steps = max(10, int(args.minutes * 60 * tok_s / (args.batch_size * args.seq_len)))
    print(f"[bench] {name}: pilot {tok_s:,.0f} tok/s -> {steps} steps for {args.minutes} min", flush=True)
    pilot_dir = root / f"{name}-pilot"
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    seed_token_cache(pilot_dir, run_dir)
    cfg = arm_cfg(name, run_dir, args, steps, max(1, steps // 4))
    t0 = time.time()
    final = run_pretrain(cfg, log_every=10)
    wall = time.time() - t0
    load_after = os.getloadavg()[0]
    done = json.loads((run_dir / "pretrain_done.json").read_text())
    log = read_log(run_dir)
    run_tok_s, _ = train_throughput(log, args.batch_size * args.seq_len)
    val_init = val_loss_of(run_dir / "pretrain_init", cfg, args.cpus)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(final)).parameters())
    return {
        "arm": name, "arch": ARMS[name]["arch"], "init": ARMS[name]["init"],
        "copy_layers": ARMS[name]["copy_layers"], "params_m": round(n_params / 1e6, 2),
        "steps": done["steps"], "tokens": done["steps"] * args.batch_size * args.seq_len,
        "tokens_per_s": round(run_tok_s, 1), "pilot_tokens_per_s": round(tok_s, 1),
        "wall_time_s": round(wall, 1), "val_loss_init": round(val_init, 4),
        "val_loss_curve": [(r["step"], round(r["val_loss"], 4)) for r in log if "val_loss" in r],
        "val_loss": round(done["val_loss"], 4), "val_ppl": round(math.exp(done["val_loss"]), 2),
        "final_train_loss": round(done["final_loss"], 4), "draft": str(final),
        # other processes on the 2 cores change tokens/s (not the loss at a given step): say so
        "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
    }


def format_table(rows: list[dict]) -> str:
    head = (f"{'arm':<12} {'params':>7} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'wall s':>7} "
            f"{'val0':>7} {'val loss':>9} {'val ppl':>8} {'load':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['arm']:<12} {r['params_m']:>6.1f}M {r['steps']:>6} {r['tokens']:>9,} "
                     f"{r['tokens_per_s']:>7,.0f} {r['wall_time_s']:>7.0f} {r['val_loss_init']:>7.3f} "
                     f"{r['val_loss']:>9.3f} {r['val_ppl']:>8.1f} "
                     f"{'/'.join(f'{x:.1f}' for x in r['loadavg_1min_before_after']):>9}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=3.5, help="training time per arm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of the one train worker")
    ap.add_argument("--pilot-steps", type=int, default=16)
    ap.add_argument("--root", type=Path, default=Path("runs/bench_pretrain_init"))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--quick", action="store_true", help="smoke test: 0.2 min per arm, short sequences")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.seq_len, args.pilot_steps = 0.2, 64, 8

    import ray

    from draftalign.runtime import init_ray

    init_ray(num_cpus=args.cpus)  # the same worker environment (allocator) as `draftalign pretrain`
    root = args.root.resolve()
    rows: list[dict] = []
    try:
        # pilots back to back, so both throughputs see the same machine; then one arm at a time
        # (two runs sharing 2 cores distort both)
        tok_s, cache_src = {}, None
        for name in args.arms:
            tok_s[name] = pilot(name, args, root, cache_src)
            cache_src = root / f"{name}-pilot"
        for name in args.arms:
            rows.append(run_arm(name, args, root, tok_s[name]))
    finally:
        ray.shutdown()
    result = {"target": EMBEDDED_TARGET, "corpus": "embedded:chitchat", "batch_size": args.batch_size,
              "seq_len": args.seq_len, "lr": args.lr, "minutes_per_arm": args.minutes, "cpus": args.cpus,
              "torch_threads": args.cpus, "arms": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(format_table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
