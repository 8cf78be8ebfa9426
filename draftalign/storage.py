"""Where a job's files live: a local path, or any URI pyarrow.fs opens (`file://`, `s3://`, `gs://`, `hdfs://`,
`abfs://`) — the filesystem layer Ray Train itself uses, so one URI names the same place to both.

Every stage works on local paths (HF `save_pretrained`, vLLM, parquet, TensorBoard need them). For a plain path
that *is* the run dir: nothing here copies anything (the fast path). For a URI, each node keeps a **staging**
copy of the run under `$DRAFTALIGN_STAGING` (default `<tmp>/draftalign-staging`), at a path that spells the
URI (`<staging>/<scheme>/<bucket>/<key…>`), so a path is mapped back to its URI on any node:

- **writes** go through `draftalign.io` (write_atomic, atomic_dir), which calls `published(path)` after the
  local rename: a file is uploaded, a directory is published;
- **reads**: `pull(path)` mirrors storage into staging (files whose size or mtime differ, local files that
  storage no longer has removed); `ensure_local(path or URI)` pulls only when the staging copy is missing.

The publish rule on object stores (no rename there): an object appears whole or not at all (one PUT, S3 and
GCS guarantee it), so a **file** is uploaded to its final key (on a local filesystem, `file://`: to a temp name,
then renamed). A **directory** is published as: write the marker `<dir>/.publishing`, upload every file to its
final key, delete the keys the new version does not hold, delete the marker. A reader skips a directory that
holds the marker (a killed publish), so it sees the previous complete directory, or none — never a torn one.
Multi-file progress (the distillation set's shards, checkpoints) is made complete by the stage's own marker
written last (`metadata.json`, a checkpoint's `manifest.json`), as on a local disk.

Credentials come the usual way (AWS_* / GOOGLE_APPLICATION_CREDENTIALS env vars, instance roles); a URI may
carry pyarrow's query options (`s3://bucket/runs?endpoint_override=host:9000&scheme=http`).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

STAGING_ENV = "DRAFTALIGN_STAGING"
PUBLISHING = ".publishing"  # a directory whose publish has not finished
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # what pyarrow.fs.FileSystem.from_uri opens


class StorageError(ValueError):
    """A storage URI that cannot be used; the message names it and what pyarrow said."""


def _said(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def check_uri(uri: str) -> None:
    """A URI's scheme must be one pyarrow opens (no network: reachability is checked at first use)."""
    scheme = urlsplit(uri).scheme
    if scheme not in SCHEMES:
        raise StorageError(f"{uri!r}: unsupported storage scheme {scheme!r} (pyarrow.fs opens "
                           f"{', '.join(s + '://' for s in SCHEMES)}; or give a path every node mounts)")


def join(uri: str, *parts: str) -> str:
    """`uri` / parts, its query options kept."""
    u = urlsplit(uri)
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return u._replace(path=path).geturl()


@functools.lru_cache(maxsize=16)
def _filesystem(base: str):
    import pyarrow.fs as pafs

    try:
        fs, _ = pafs.FileSystem.from_uri(base)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError / ValueError by backend
        raise StorageError(f"storage {base!r} cannot be opened: {_said(e)}") from None
    return fs


def resolve(uri: str):
    """(pyarrow filesystem, path on it) of a URI; a plain path gives the local filesystem and the absolute path."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    check_uri(uri)
    u = urlsplit(uri)
    fs = _filesystem(u._replace(path="/").geturl())
    if u.scheme == "file":
        return fs, unquote(u.path)
    return fs, (u.netloc + unquote(u.path)).rstrip("/")


def staging_base() -> Path:
    return Path(os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "draftalign-staging").resolve()


def staging_dir(uri: str) -> Path:
    """This node's working copy of `uri`: `<staging>/<scheme>/<bucket[?options]>/<key…>`."""
    u = urlsplit(uri)
    host = quote(u.netloc + (f"?{u.query}" if u.query else ""), safe="") or "_"
    return staging_base() / u.scheme / host / unquote(u.path).lstrip("/")


def uri_of(path: str | os.PathLike) -> str | None:
    """The URI a staging path mirrors; None for any other path (the fast path: one prefix test)."""
    p, base = str(path), str(staging_base())
    if not p.startswith(base + os.sep):
        return None
    parts = Path(os.path.abspath(p)).relative_to(base).parts
    if len(parts) < 2:
        return None
    host, _, query = unquote(parts[1]).partition("?")
    u = urlsplit(f"{parts[0]}://{'' if host == '_' else host}/{'/'.join(parts[2:])}")
    return u._replace(query=query).geturl()


def storage_of(path: str | os.PathLike):
    """(filesystem, path on it) behind a staging path, or None for a path that is its own storage."""
    uri = uri_of(path)
    return None if uri is None else resolve(uri)


def _info(fs, key: str):
    try:
        return fs.get_file_info(key)
    except Exception as e:  # noqa: BLE001 - the backend's own error, named
        raise StorageError(f"storage {key!r} is not reachable: {_said(e)}") from None


def _listing(fs, key: str, complete_only: bool = True) -> dict[str, object]:
    """{relative path: FileInfo} of the files under `key`; directories with an unfinished publish left out."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
    except Exception as e:  # noqa: BLE001 - the backend's own error, named
        raise StorageError(f"storage {key!r} is not reachable: {_said(e)}") from None
    files = {i.path[len(key):].lstrip("/"): i for i in infos if i.type == pafs.FileType.File}
    if not complete_only:
        return files
    torn = [rel[: -len(PUBLISHING)] for rel in files if rel == PUBLISHING or rel.endswith("/" + PUBLISHING)]
    return {rel: i for rel, i in files.items() if not any(rel.startswith(t) for t in torn)
            and ".tmp-" not in rel.rsplit("/", 1)[-1]}


def _upload(fs, local: Path, key: str) -> None:
    import pyarrow.fs as pafs

    fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):  # a mounted disk: rename makes it atomic
        tmp = f"{key}.tmp-{os.getpid()}"
        pafs.copy_files(str(local), tmp, destination_filesystem=fs)
        fs.move(tmp, key)
    else:  # an object store: the object appears whole at close
        with open(local, "rb") as src, fs.open_output_stream(key) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    if (mtime_ns := fs.get_file_info(key).mtime_ns) is not None:  # a later pull sees it unchanged
        os.utime(local, ns=(mtime_ns, mtime_ns))


def _download(fs, key: str, local: Path, mtime_ns: int | None) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.pull-{os.getpid()}")
    try:
        with fs.open_input_stream(key) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        if mtime_ns is not None:  # the next pull compares size and mtime
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(f for f in root.rglob("*") if f.is_file() and not f.is_symlink()) if root.is_dir() else []


def published(path: str | os.PathLike) -> None:
    """Called after `path` was written in place, atomically (draftalign.io): upload it to the storage its staging
    copy mirrors (a file: one object; a directory: the publish rule above). No-op for any other path."""
    where = storage_of(path)
    if where is None:
        return
    fs, key = where
    path = Path(path)
    if path.is_file():
        _upload(fs, path, key)
        return
    with tempfile.NamedTemporaryFile() as empty:
        _upload(fs, Path(empty.name), f"{key}/{PUBLISHING}")
    mine = {str(f.relative_to(path)) for f in _local_files(path)}
    for rel in sorted(mine):
        _upload(fs, path / rel, f"{key}/{rel}")
    for rel in _listing(fs, key, complete_only=False).keys() - mine - {PUBLISHING}:
        fs.delete_file(f"{key}/{rel}")
    fs.delete_file(f"{key}/{PUBLISHING}")


def pull(path: str | os.PathLike, exclude: tuple[str, ...] = ()) -> Path:
    """Mirror storage into the staging `path` (a file or a directory; top-level names in `exclude` skipped) and
    return it. Files whose size and mtime match are kept; local files storage no longer has are removed. No-op
    for a path that is its own storage."""
    path = Path(path)
    where = storage_of(path)
    if where is None:
        return path
    fs, key = where
    import pyarrow.fs as pafs

    info = _info(fs, key)
    if info.type == pafs.FileType.File:
        if not _same(path, info):
            _download(fs, key, path, info.mtime_ns)
        return path
    remote = {rel: i for rel, i in _listing(fs, key).items() if rel.split("/", 1)[0] not in exclude}
    for rel, i in remote.items():
        f = path / rel
        if not _same(f, i):
            _download(fs, i.path, f, i.mtime_ns)
    for f in _local_files(path):
        rel = str(f.relative_to(path))
        if rel not in remote and rel.split("/", 1)[0] not in exclude:
            f.unlink()
    return path


def _same(f: Path, info) -> bool:
    if not f.is_file():
        return False
    st = f.stat()
    return st.st_size == info.size and (info.mtime_ns is None or st.st_mtime_ns == info.mtime_ns)


def ensure_local(path: str | os.PathLike) -> Path:
    """A local path for `path`: a URI's staging copy, pulled; a staging path pulled when missing; any other
    path as it is. What a process on any node calls before it reads a run's files."""
    if is_uri(path):
        local = staging_dir(str(path))
        return pull(local) if not local.exists() else local
    p = Path(path)
    if uri_of(p) is not None and not p.exists():
        pull(p)
    return p


def exists(path: str | os.PathLike) -> bool:
    """`path` exists locally or, for a staging path, in storage."""
    import pyarrow.fs as pafs

    where = storage_of(path)
    return Path(path).exists() or (where is not None and _info(*where).type != pafs.FileType.NotFound)


def remove(path: str | os.PathLike) -> None:
    """Delete `path` locally and, for a staging path, in storage."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    where = storage_of(path)
    if where is None:
        return
    import pyarrow.fs as pafs

    fs, key = where
    info = _info(fs, key)
    if info.type == pafs.FileType.File:
        fs.delete_file(key)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(key)


def move(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename `src` to `dest` (both in one run dir): locally, and in storage by copy then delete."""
    src, dest = Path(src), Path(dest)
    if src.exists():
        src.rename(dest)
    where = storage_of(src)
    if where is None:
        return
    import pyarrow.fs as pafs

    fs, key = where
    _, dest_key = storage_of(dest)
    if _info(fs, key).type == pafs.FileType.NotFound:
        return
    pafs.copy_files(key, dest_key, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(key)


def ray_storage(path: str | os.PathLike) -> dict:
    """`RunConfig` keywords for a run's `ray_results` dir: the storage behind a staging path (Ray Train uploads its
    checkpoints there itself), else the local path."""
    where = storage_of(path)
    if where is None:
        return {"storage_path": str(Path(path).resolve())}
    fs, key = where
    return {"storage_path": key, "storage_filesystem": fs}
