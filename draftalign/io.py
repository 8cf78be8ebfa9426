"""Atomic writes, for every stage: a reader (or a resumed run) sees the old file or the whole new
one, never a torn one. Files: write to a temp file in the same directory, fsync, rename.
Directories: write into a temp directory, then rename it into place. A path in a URI run's staging copy is then
published to its storage (`draftalign.storage.published`; a no-op for any other path)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from draftalign.storage import published


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path), fsync, rename onto `path` (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    published(path)


def write_json_atomic(path: str | Path, obj) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def read_json(path: str | Path | None) -> dict | None:
    """The JSON at `path`, or None when it is absent or torn."""
    try:
        return json.loads(Path(path).read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def atomic_dir(dest: str | Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir) and rename tmp_dir to `dest`: a killed writer leaves no half directory."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    published(dest)
    return dest
