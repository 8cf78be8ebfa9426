#!/usr/bin/env python3
"""Check with pip's resolver that `.[gpu]` resolves to the pinned torch, without installing anything.

    python cluster/check_gpu_pins.py                 # check; exit 1 if the pins disagree
    python cluster/check_gpu_pins.py --lock cluster/docker/constraints-gpu.txt   # also write the lock

What it does: reads pyproject.toml's `dependencies` plus the `gpu` extra, and asks
`pip install --dry-run --ignore-installed --report` for the image's platform (CPython 3.11,
manylinux x86_64, wheels only). pip reads each wheel's metadata file (PEP 658) or, where an index
serves none, the METADATA inside the wheel through HTTP range requests (pip's fast-deps), so nothing
is downloaded but metadata; the script fails if pip downloaded a whole wheel anyway.
Nothing is installed: --dry-run, and --ignore-installed so the venv it runs from plays no part.
The project itself is not built either (its requirements are passed directly), so no build
environment is set up.

It ignores this machine's pip configuration (PIP_CONFIG_FILE=/dev/null; PIP_FIND_LINKS,
PIP_EXTRA_INDEX_URL, PIP_CONSTRAINT and PIP_NO_INDEX dropped): a development box may carry a local
CPU build of torch 2.13.0 in a find-links folder, or a constraint that caps torch, and either would
make the check answer for this box instead of for the GPU image. It then asserts that torch came
from an index (not a local file), that it is the version pyproject pins, and that vLLM resolved to
the gpu extra's pin. With --lock, every resolved `name==version` is written, for the Dockerfile's
GPU target to install against (keeps the image in step with pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The image's platform: CPython 3.11 on Debian bookworm x86_64 (glibc 2.36: manylinux tags up to 2.36).
PLATFORM = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
            *[f"--platform=manylinux_2_{m}_x86_64" for m in range(36, 4, -1)],
            *[f"--platform={t}" for t in ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")]]
DROP = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV",
        "PIP_TARGET", "PIP_PREFIX", "PIP_USER")


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pin(reqs: list[str], name: str) -> str | None:
    for r in reqs:
        if _name(r) == name:
            m = re.search(r"==\s*([^\s,;]+)", r)
            return m.group(1) if m else None
    return None


def requirements(pyproject: Path) -> tuple[list[str], list[str]]:
    meta = tomllib.loads(pyproject.read_text())["project"]
    return list(meta["dependencies"]), list(meta["optional-dependencies"]["gpu"])


def resolve(reqs: list[str], report: Path) -> tuple[dict, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env["PIP_CONFIG_FILE"] = os.devnull  # skip every pip.conf (global caps, find-links, local indexes)
    with tempfile.TemporaryDirectory() as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        # fast-deps: where the index serves no PEP 658 metadata file, read a wheel's METADATA through HTTP
        # range requests (a few kB to MB) instead of downloading it; PyPI serves the metadata files.
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-input",
               "--disable-pip-version-check", "--use-feature=fast-deps", *PLATFORM, "--report", str(report),
               "-r", str(req_file)]
        shown = [a for a in cmd[2:] if not a.startswith("--platform=")]
        print("$", " ".join(shown), "--platform=manylinux_2_{36..5}_x86_64 ...", flush=True)
        p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
    log = (p.stdout + p.stderr).splitlines()
    if p.returncode != 0:
        print("\n".join(log[-40:]))
        raise SystemExit(f"pip could not resolve .[gpu] (exit {p.returncode})")
    downloads = [ln.strip() for ln in log if ln.strip().startswith("Downloading") and ".metadata" not in ln]
    return json.loads(report.read_text()), downloads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--lock", type=Path, help="write the resolved name==version set here")
    args = ap.parse_args()

    deps, gpu = requirements(args.pyproject)
    torch_pin, vllm_pin = _pin(deps, "torch"), _pin(gpu, "vllm")
    print(f"pyproject: torch=={torch_pin}; gpu extra: {gpu}")
    with tempfile.TemporaryDirectory() as tmp:
        rep, downloads = resolve(deps + gpu, Path(tmp) / "report.json")
    got = {_name(i["metadata"]["name"]): i for i in rep["install"]}
    ver = {n: i["metadata"]["version"] for n, i in got.items()}
    problems = []
    if "torch" not in ver or ver["torch"] != torch_pin:
        problems.append(f"torch resolved to {ver.get('torch')}, pyproject pins {torch_pin}")
    if vllm_pin is None:
        problems.append("the gpu extra does not pin vllm with ==")
    elif ver.get("vllm") != vllm_pin:
        problems.append(f"vllm resolved to {ver.get('vllm')}, the gpu extra pins {vllm_pin}")
    torch_url = got.get("torch", {}).get("download_info", {}).get("url", "")
    if torch_url.startswith("file:"):
        problems.append(f"torch came from a local file ({torch_url}), not from the index")
    vllm_torch = [r for r in got.get("vllm", {}).get("metadata", {}).get("requires_dist", []) if _name(r) == "torch"]
    cuda = sorted(f"{n}=={v}" for n, v in ver.items() if n.startswith("nvidia-cuda-runtime"))
    print(f"resolved {len(ver)} packages for CPython 3.11 manylinux x86_64:")
    for n in ("vllm", "torch", "torchvision", "torchaudio", "transformers", "tokenizers", "ray", "triton",
              "flashinfer-python", "xformers", *[c.split("==")[0] for c in cuda]):
        if n in ver:
            print(f"  {n}=={ver[n]}")
    print(f"vllm's own torch requirement: {vllm_torch}")
    print(f"torch from: {torch_url.rsplit('/', 1)[-1] or '?'} (an index, not a local file)"
          if not torch_url.startswith("file:") else f"torch from: {torch_url}")
    print(f"whole wheels downloaded: {len(downloads)}" + "".join(f"\n  {d}" for d in downloads))
    if downloads:
        problems.append(f"pip downloaded {len(downloads)} wheel(s) instead of their metadata")
    if args.lock:
        head = ("# Generated by cluster/check_gpu_pins.py from pyproject.toml (dependencies + gpu extra),\n"
                "# resolved for CPython 3.11 manylinux x86_64. The Dockerfile's GPU target installs against it.\n")
        args.lock.write_text(head + "".join(f"{n}=={ver[n]}\n" for n in sorted(ver)))
        print(f"wrote {args.lock} ({len(ver)} pins)")
    for p in problems:
        print("PROBLEM:", p)
    print("OK: .[gpu] resolves to the pinned torch" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
