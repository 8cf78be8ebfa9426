"""The target's features of the distillation set, computed once and stored: the FSPAD head's epochs read them.

Why. A streamed FeatureBatch (`actors/features.py`) costs one target pass over its rows, plus one over the
re-drawn tokens: measured on a 2-core EPYC (fp32, SmolLM2-135M, 16 rows of the long job's set) 8–11 s on two
threads and 17–25 s on one, against ≈ 1.2 s for the head's own step. Streamed, the head waits on the target
for most of its stage and sees each row once. The store runs every row through the target once, in
length-sorted batches (little padding), on all the CPUs before the learner starts; the head then trains
epochs at its own speed. Size: L · H float16 per row (the long job's 3.6k rows × 185 tokens × 576 ≈ 0.77 GB).

Feature sampling in the store. Each answer token's draw is made once, from a generator seeded by (job seed,
row index), so the store is a fixed augmentation of the set (EAGLE, too, trains on fixed data); streamed
batches (`draft.fspad.feature_store: false`) re-draw at every step. A store built with sampling also serves a
job without it (its re-drawn nodes are left out), so the ablation arms share one store.

On disk, `<run_dir>/fspad_features/`: `meta.json` (the fingerprint: target, k, seed, the rows' ids and
lengths) and `shard-XXXXX.safetensors`, rows [i·S, (i + 1)·S) of the train rows concatenated with their
counts. Every shard is written atomically; a rerun keeps the shards of the same fingerprint and computes
only the missing ones (another fingerprint: the old store is removed; it is derived data).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from actors.features import BranchScorer, FeatureBatch, RowFeatures, collate, job_aux_layers
from draftalign.io import write_atomic, write_json_atomic
from draftalign.storage import ensure_local, published

STORE_DIR = "fspad_features"
META_FILE = "meta.json"
HELDOUT_FILE = "heldout.pt"  # the held-out rows' FeatureBatch (no feature sampling), kept with the store
SHARD_ROWS = 256


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def fingerprint(target_path: str, k: int, seed: int, rows: list[dict], dtype: str = "float32",
                aux_layers: list[int] | None = None) -> str:
    """What a store's contents depend on: the target and the dtype it ran in (bf16 features differ from fp32
    ones), k, the seed, the rows and which features (the last state, or EAGLE-3's aux states `aux_layers`);
    feature sampling is recorded apart: a sampled store serves both."""
    h = hashlib.sha1(json.dumps([str(target_path), k, seed] + ([] if dtype == "float32" else [dtype])
                                + ([] if aux_layers is None else [["aux", *aux_layers]])).encode())
    for r in rows:
        h.update(f"{r['prompt_id']}:{len(r['prompt_token_ids'])}:{len(r['response_token_ids'])};".encode())
    return h.hexdigest()


def store_bytes(tokens: int, answer_tokens: int, width: int, k: int, draws: int = 0) -> int:
    """The store's size in bytes: float16 features at every token (width W = H, or n·H for EAGLE-3's fused aux
    states), the target's top-k (int32 id + float32 log-prob) at every answer token, and per feature-sampling draw
    its branch's feature and top-k:   2·W·T + 8·k·A + d·(2·W + 8·k)."""
    return 2 * width * tokens + 8 * k * answer_tokens + draws * (2 * width + 8 * k)


def use_store(cfg, rows: list[dict], width: int) -> tuple[bool, int]:
    """(store the features?, the store's estimated bytes): `draft.fspad.feature_store` true / false as set; "auto"
    stores when the estimate (no feature-sampling draws counted) is ≤ draft.fspad.max_store_gib, else streams
    (docs/feature_store.md: the estimate for an 8B and a 70B target)."""
    tokens = sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows)
    answers = sum(len(r["response_token_ids"]) for r in rows)
    size = store_bytes(tokens, answers, width, max(1, cfg.target.top_k_logprobs))
    mode = cfg.draft.fspad.feature_store
    return (size <= cfg.draft.fspad.max_store_gib * 2**30 if mode == "auto" else bool(mode)), size


def store_dtype(cfg) -> str:
    """The dtype the target computes the store's features in on this machine (`target.dtype`, auto resolved)."""
    from draftalign.models import pick_dtype

    return str(pick_dtype(cfg.target.dtype)).removeprefix("torch.")


class FeatureStore:
    """The stored rows, in memory: `row(i)` → the RowFeatures of train row i."""

    def __init__(self, path: str | Path):
        path = ensure_local(path)
        self.meta = json.loads((path / META_FILE).read_text())
        self.shards = [load_file(path / shard_name(i)) for i in range(self.meta["num_shards"])]
        self.offsets = []
        for s in self.shards:
            self.offsets.append({key: torch.cat([torch.zeros(1, dtype=torch.long), s[key].cumsum(0)])
                                 for key in ("lengths", "answers", "n_alts")})

    def __len__(self) -> int:
        return self.meta["num_rows"]

    def row(self, i: int, feature_sampling: bool = True) -> RowFeatures:
        s, j = divmod(i, self.meta["shard_rows"])
        t, o = self.shards[s], self.offsets[s]
        f0, f1 = int(o["lengths"][j]), int(o["lengths"][j + 1])
        r0, r1 = int(o["answers"][j]), int(o["answers"][j + 1])
        a0, a1 = (int(o["n_alts"][j]), int(o["n_alts"][j + 1])) if feature_sampling else (0, 0)
        return RowFeatures(t["F"][f0:f1], t["ids"][r0:r1].long(), t["lps"][r0:r1],
                           [tuple(a) for a in t["alts"][a0:a1].tolist()], t["G"][a0:a1],
                           t["g_ids"][a0:a1].long(), t["g_lps"][a0:a1])


def build_store(cfg, target_path: str, rows: list[dict], rdir: Path, say=print) -> Path:
    """Compute the missing shards of `<rdir>/fspad_features/` on target.num_engines Ray actors, each using an
    equal share of the cluster's CPUs (the learner has not started); the driver writes each shard atomically."""
    import ray

    from actors.features import TargetFeatures

    path = Path(rdir) / STORE_DIR
    k, fs = cfg.target.top_k_logprobs, cfg.draft.fspad.feature_sampling
    aux = job_aux_layers(cfg, target_path)
    meta = {"fingerprint": fingerprint(target_path, k, cfg.seed, rows, store_dtype(cfg), aux), "num_rows": len(rows),
            "shard_rows": SHARD_ROWS, "num_shards": math.ceil(len(rows) / SHARD_ROWS), "k": k,
            "feature_sampling": fs}
    old = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else None
    if old is not None and (old["fingerprint"] != meta["fingerprint"] or (fs and not old["feature_sampling"])):
        say(f"feature store {path} was built for other rows/target/dtype/k/sampling: rebuilding it")
        shutil.rmtree(path)
        old = None
    if old is not None:
        meta["feature_sampling"] = old["feature_sampling"]
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / META_FILE, meta)
    todo = [i for i in range(meta["num_shards"]) if not (path / shard_name(i)).is_file()]
    if not todo:
        return path
    t = cfg.target
    n = max(1, t.num_engines)
    threads = max(1, int(ray.cluster_resources().get("CPU", 1) // n))
    cls = ray.remote(TargetFeatures)
    actors = [cls.options(num_cpus=t.cpus_per_engine, num_gpus=t.gpus_per_engine, resources=dict(t.resources),
                          max_restarts=2, max_task_retries=2).remote(
        target_path, t.dtype, [], 1, k, meta["feature_sampling"], cfg.seed, threads=threads, aux_layers=aux)
        for _ in range(n)]
    say(f"feature store: {len(todo)} of {meta['num_shards']} shards to compute ({len(rows)} rows, "
        f"{n} target actor(s) × {threads} threads) -> {path}")
    t0, done = time.time(), 0
    try:
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * n:
                i = queue.pop(0)
                a = actors[i % n]
                pending[a.shard.remote(rows[i * SHARD_ROWS:(i + 1) * SHARD_ROWS], i * SHARD_ROWS)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            tensors = ray.get(ready[0])
            tmp = path / (shard_name(i) + ".tmp")
            save_file({key: v.contiguous() for key, v in tensors.items()}, str(tmp))
            tmp.replace(path / shard_name(i))
            published(path / shard_name(i))  # a URI run: to its storage
            done += 1
            rate = (time.time() - t0) / done
            say(f"feature store: shard {i} written ({done}/{len(todo)}, {rate:.0f} s per shard, "
                f"≈ {rate * (len(todo) - done) / 60:.0f} min left)")
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
    return path


def load_heldout(path: Path, key: str) -> FeatureBatch | None:
    """The store's held-out batch when it was computed for `key` (`fingerprint` of the held-out rows), else None."""
    f = Path(path) / HELDOUT_FILE
    if not f.is_file():
        return None
    saved = torch.load(f, map_location="cpu", weights_only=False)
    return saved["batch"] if saved.get("fingerprint") == key else None


def save_heldout(path: Path, key: str, batch: FeatureBatch) -> None:
    """Keep the held-out batch with the store (atomically), so a resumed or re-run job needs no target for it."""
    write_atomic(Path(path) / HELDOUT_FILE, lambda tmp: torch.save({"fingerprint": key, "batch": batch}, tmp))


class StoredFeatures(BranchScorer):
    """Ray actor (role: features, from the store): `batch(step, rank, world)` as `TargetFeatures.batch`, the same
    rows per (step, rank), read from the store instead of computed. Runs where the store is (the driver's node).
    With `scoring` = (target path, dtype, threads) it also scores the head's on-policy chains (`BranchScorer`),
    loading the target at the first request on that many threads (the learner waits for the scores, so its
    CPUs are free meanwhile)."""

    def __init__(self, path: str, rows: list[dict], batch_size: int, feature_sampling: bool, seed: int,
                 pad_id: int = 0, scoring: tuple[str, str, int] | None = None, aux_layers: list[int] | None = None):
        from draftalign.batching import BatchSampler

        torch.set_num_threads(1)
        self.store = FeatureStore(path)
        if len(self.store) != len(rows):
            raise ValueError(f"feature store {path} holds {len(self.store)} rows, the job has {len(rows)}")
        self.rows, self.B, self.feature_sampling, self.pad_id = rows, batch_size, feature_sampling, pad_id
        self.k = self.store.meta["k"]  # the store's fingerprint includes k: the job's top_k_logprobs
        self.sampler = BatchSampler(len(rows), seed)
        self.scoring, self._target, self.aux_layers = scoring, None, aux_layers

    def scoring_target(self):
        if self.scoring is None:
            raise RuntimeError("StoredFeatures was created without a target to score chains with (scoring=None)")
        if self._target is None:
            from draftalign.models import load_causal_lm, pick_dtype

            path, dtype, threads = self.scoring
            torch.set_num_threads(max(1, threads))
            self._target = load_causal_lm(path, pick_dtype(dtype))
        return self._target

    def batch(self, step: int, rank: int, world: int) -> FeatureBatch:
        idx = self.sampler.indices(step * self.B, self.B)[rank::world]
        return collate([self.rows[i] for i in idx], [self.store.row(int(i), self.feature_sampling) for i in idx],
                       self.pad_id)


def create_stored_feature_actor(cfg, path: Path, rows_ref, name_prefix: str = "draftalign",
                                target_path: str | None = None) -> list:
    """One StoredFeatures actor on this (the driver's) node, sized like a target engine; with
    `draft.fspad.on_policy` it scores the head's chains on `target_path` too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t = cfg.target
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    cls = ray.remote(StoredFeatures)
    scoring = None
    if cfg.draft.fspad.on_policy:  # the learner waits on the scores: the target may use its CPUs too
        if target_path is None:
            raise ValueError("draft.fspad.on_policy: the stored-features actor needs the target's path to score chains")
        threads = max(1, math.ceil(t.cpus_per_engine + cfg.learner.cpus_per_worker - 1e-9))
        scoring = (target_path, t.dtype, threads)
    return [cls.options(num_cpus=t.cpus_per_engine, scheduling_strategy=here, max_restarts=2, max_task_retries=2,
                        name=f"{name_prefix}-stored-features").remote(
        str(path), rows_ref, cfg.rollout.batch_size, cfg.draft.fspad.feature_sampling, cfg.seed,
        scoring=scoring, aux_layers=None if target_path is None else job_aux_layers(cfg, target_path))]
