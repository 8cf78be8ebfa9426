"""Process-level set-up shared by every stage: vLLM-on-CPU switches, Ray start, run directories."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from draftalign.config import JobConfig
from draftalign.storage import pull


def configure_vllm_env(kv_cache_gib: float = 1.0, threads: int | None = None) -> None:
    """Environment vLLM reads at import / engine start. Must run before `import vllm`.

    On CPU: the KV cache size must be explicit (the default asks for 90% of the NUMA node), the
    engine runs in-process (≈2 s start, ≈1 GiB, works inside Ray actors), and the OpenMP threads
    are bound to what the caller owns.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve co-located processes
    # vLLM's start-up INFO/WARNING lines (a dozen per engine, forwarded by Ray) bury the stage summaries;
    # DRAFTALIGN_VERBOSE=1 shows them
    if os.environ.get("DRAFTALIGN_VERBOSE", "0") == "0":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(os.environ.get(
        "DRAFTALIGN_CACHE", Path.home() / ".cache" / "draftalign")) / "vllm"))
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def quiet_libraries(verbose: bool = False) -> None:
    """A console that shows progress and results: library chatter at WARNING/ERROR, for this process and
    (through the environment `init_ray` forwards) for Ray workers, and quiet mode (`quiet()`): workers'
    output kept in the run's log dir, one driver-side progress line per training stage. `verbose` (or
    DRAFTALIGN_VERBOSE=1) keeps everything. Only the CLI calls this: library use (tests) is unchanged."""
    if verbose or os.environ.get("DRAFTALIGN_VERBOSE", "0") != "0":
        os.environ["DRAFTALIGN_VERBOSE"] = "1"
        os.environ.pop("DRAFTALIGN_QUIET", None)
        return
    os.environ["DRAFTALIGN_QUIET"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' load/save/GGUF bars too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def quiet() -> bool:
    """Quiet console mode, set by `quiet_libraries` (the CLI without --verbose)."""
    return os.environ.get("DRAFTALIGN_QUIET") == "1"


class _DropMessage:
    """logging filter: drop records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_ray_worker() -> None:
    """`worker_process_setup_hook`: Ray Train's PlacementGroupCleaner polls the State API every
    second, which needs the dashboard; local Ray runs without one (include_dashboard=False), so
    every poll logged "Failed to query Ray Train Controller actor state" to the driver."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        _DropMessage("Failed to query Ray Train Controller actor state"))
    if os.environ.get("DRAFTALIGN_VERBOSE", "0") == "0":  # the controller's start-up INFO lines
        logging.getLogger("ray.train").setLevel(logging.WARNING)


def allocator_env() -> dict[str, str]:
    """LD_PRELOAD Ray's bundled jemalloc, never returning freed pages to the OS, for Ray workers.

    A training step allocates and frees logits-sized tensors (8 × 256 × 49152 fp32 ≈ 400 MB)
    that glibc serves with fresh mmaps, so every step page-faults them in again: measured 62k
    faults/s and ≈50% system time in the pretraining worker. With this allocator the same step
    ran at 780 vs 595 tokens/s (2 threads); vLLM scoring / generation were unchanged (310 vs 295,
    81 vs 84 tokens/s). `DRAFTALIGN_JEMALLOC=0` turns it off; it is skipped if the library is absent.
    """
    if os.environ.get("DRAFTALIGN_JEMALLOC", "1") == "0" or "LD_PRELOAD" in os.environ:
        return {}
    import ray

    lib = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if not lib.is_file():
        return {}
    return {"LD_PRELOAD": str(lib), "MALLOC_CONF": os.environ.get(
        "MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")}


API_KEY_ENV = "DRAFTALIGN_API_KEY"  # the serving endpoint's bearer key (serve.protocol.BearerAuthMiddleware)
SECRET_ENV = (API_KEY_ENV,)  # never copied into Ray's runtime env


def init_ray(cfg: JobConfig | None = None, **kw):
    """Connect to cfg.cluster.address, or start a local Ray instance sized to this machine.

    Quiet mode: the workers' stdout/stderr (vLLM start-up, Ray Train, rank-0 step lines) stay in Ray's
    log files instead of being echoed, and Ray's own driver INFO lines are off. With `cfg`, the session's
    log dir is linked from `<run_dir>/logs/` either way.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.cluster.address if cfg is not None else None
    # the serving API key stays out of the runtime env (which Ray keeps in its GCS and shows in job info): local
    # workers inherit it from this process, a cluster's nodes are given it by their operator
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("VLLM_", "DRAFTALIGN_", "OMP_", "HF_", "TRANSFORMERS_"))
                        and k not in SECRET_ENV} | allocator_env(),
           "worker_process_setup_hook": "draftalign.runtime.quiet_ray_worker"}
    if quiet():
        # "Token authentication is enabled for this Ray cluster ..." on every local start
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        kw = {"log_to_driver": False, "logging_level": logging.WARNING, **kw}
    if address:
        ray.init(address=address, runtime_env=env, **kw)
    else:
        # Serve's HTTP proxy gets 5 s to start by default; a 2-core machine under load starts a worker slower than
        # that, and the controller then kills and restarts the proxy forever (the raylet inherits this environment)
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray.init(num_cpus=kw.pop("num_cpus", os.cpu_count()), include_dashboard=False,
                 runtime_env=env, **kw)
    if cfg is not None:
        logs = link_ray_logs(cfg.run_path.resolve() / "logs")  # node-local links, never published
        if logs is not None and quiet():
            print(f"[ray] worker output: {logs}", file=sys.stderr, flush=True)
    return ray


def link_ray_logs(logs: Path) -> Path | None:
    """Symlink this process's Ray session log dir (every worker's .out/.err) as `logs/<session>` and
    `logs/ray` (the newest session); returns `logs/ray`, or None when there is no local session dir.
    A convenience: it never fails a run."""
    try:
        from ray._private import worker

        src = Path(worker._global_node.get_logs_dir_path()).resolve()
        logs.mkdir(parents=True, exist_ok=True)
        for name in (src.parent.name, "ray"):  # <temp>/session_<date>_<pid>/logs
            tmp = logs / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(src, target_is_directory=True)
            tmp.replace(logs / name)  # atomic: rename(2) replaces the old link, not its target
        return logs / "ray"
    except Exception:  # noqa: BLE001 - e.g. a ray:// client (no local node) or a read-only run dir
        return None


def run_dir(cfg: JobConfig) -> Path:
    """The run dir a stage's driver works in (created). For a URI run: this node's staging copy, mirrored from
    storage first (`draftalign.storage.pull`; checkpoints aside: each stage pulls its own, and node-local logs)."""
    path = cfg.run_path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return pull(path, exclude=("ray_results", "logs"))
