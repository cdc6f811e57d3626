"""Where things live under a storage root: a local folder or an object-store prefix.

A root is either a local path (``s2vec_data``, ``/data/s2vec``) or a URI of an object store:
``s3://bucket/prefix`` (also ``gs://`` and ``az://``/``abfs://``, by the same mechanism; only S3
is tested). Everything under a root is addressed through this module: table URIs for delta-rs,
small files (the root manifest, regions, change ledgers, model cards, checkpoints) read and
written through a pyarrow filesystem, listings and deletions.

Object stores are configured only by each provider's standard environment, which delta-rs,
pyarrow and polars all read themselves: for S3 ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, and for an S3-compatible server ``AWS_ENDPOINT_URL`` (+ ``AWS_ALLOW_HTTP=true``
for plain http). Nothing is passed as delta-rs ``storage_options``.

Concurrent commits on S3 are safe without a lock service: delta-rs 1.x writes each commit file
``_delta_log/<version>.json`` with a conditional PUT (``If-None-Match: *``), which S3 supports
since 2024, so two writers can never both create one version (the loser retries or gets
``CommitFailedError``); the DynamoDB lock of older delta-rs versions is gone.

Some things cannot live on an object store and stay local: the Dagster instance (an object-store
root needs ``$DAGSTER_HOME``), OS file locks, the replay copies of streamed writes and the
working copies of OSM extracts osmium reads and writes (under :func:`local_cache`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from s2vec_pipeline.errors import RootNotWritableError

__all__ = [
    "FileEntry",
    "check_bucket",
    "check_object_root",
    "delete",
    "delete_tree",
    "exists",
    "filesystem",
    "is_dir",
    "is_file",
    "is_object_store",
    "join",
    "list_dirs",
    "list_files",
    "size",
    "local_cache",
    "normalize_root",
    "read_bytes",
    "write_bytes",
]

#: URI schemes treated as object stores (pyarrow and delta-rs both understand them).
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def _scheme(location: str | os.PathLike[str]) -> str | None:
    text = os.fspath(location)
    if "://" not in text:
        return None
    return text.split("://", 1)[0].lower()


def is_object_store(location: str | os.PathLike[str]) -> bool:
    """True for ``s3://…``, ``gs://…``, ``az://…`` (and their aliases), False for local paths."""
    return _scheme(location) in OBJECT_STORE_SCHEMES


def normalize_root(root: str | os.PathLike[str]) -> str:
    """A local root as an absolute path; an object-store URI without trailing slashes."""
    text = os.fspath(root)
    if is_object_store(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return str(Path(text).resolve())


def join(root: str | os.PathLike[str], *parts: str) -> str:
    """``root/part/…`` as a string: a local path, or a URI of the same object store.

    (``pathlib.Path`` cannot hold a URI: it collapses ``s3://`` into ``s3:/``.)"""
    text = os.fspath(root)
    if not is_object_store(text):
        return str(Path(text, *parts))
    clean = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([text.rstrip("/"), *clean])


def filesystem(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``location`` and the path of ``location`` in it.

    Object stores are configured by their standard environment (pyarrow reads it, including
    ``AWS_ENDPOINT_URL``); one filesystem per bucket and environment is reused."""
    text = os.fspath(location)
    if not is_object_store(text):
        return pafs.LocalFileSystem(), str(Path(text).absolute())
    scheme, rest = text.split("://", 1)
    scheme = {"s3a": "s3", "gcs": "gs", "az": "abfs"}.get(scheme.lower(), scheme.lower())
    bucket, _, key = rest.partition("/")
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    fs, base = _bucket_filesystem(f"{scheme}://{bucket}", env)
    return fs, "/".join(p for p in (base.rstrip("/"), key.strip("/")) if p)


_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_")


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(
    bucket_uri: str, env: tuple[tuple[str, str], ...]
) -> tuple[pafs.FileSystem, str]:
    # ``env`` only keys the cache: a changed environment gets its own filesystem
    return pafs.FileSystem.from_uri(bucket_uri)


def _info(location: str | os.PathLike[str]) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike[str]) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike[str]) -> bool:
    return _info(location).type == pafs.FileType.File


def size(location: str | os.PathLike[str]) -> int | None:
    """A file's size in bytes, or None when there is no such file."""
    info = _info(location)
    return int(info.size or 0) if info.type == pafs.FileType.File else None


def is_dir(location: str | os.PathLike[str]) -> bool:
    """A folder, or on an object store a prefix holding at least one object."""
    text = os.fspath(location)
    if not is_object_store(text):
        return Path(text).is_dir()
    fs, path = filesystem(text)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return True
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return bool(fs.get_file_info(selector))


def read_bytes(location: str | os.PathLike[str]) -> bytes | None:
    """The content of a file, or None when there is none."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:  # pyarrow's S3 "Path does not exist" is a plain OSError
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise e


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The one way a local file is written whole: yields a temporary path beside ``path`` for
    the caller (or a library such as pyarrow) to write; on success it is flushed to disk and
    renamed over ``path``, on failure removed. A reader sees the old file or the new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)  # the rename itself survives a power cut


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Replace a file's content atomically: a reader sees the old or the new content, never a
    part. Locally through :func:`replacing`; on an object store one PUT (atomic)."""
    text = os.fspath(location)
    if not is_object_store(text):
        with replacing(text) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(text)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str | os.PathLike[str], text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(location, text.encode("utf-8"))


def upload_file(local: str | os.PathLike[str], location: str | os.PathLike[str]) -> None:
    """Copy a local file to ``location`` (on an object store the object appears whole)."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(os.fspath(Path(local).absolute()), path, destination_filesystem=fs)


def download_file(location: str | os.PathLike[str], local: str | os.PathLike[str]) -> None:
    """Copy ``location`` to a local file, atomically (:func:`replacing`)."""
    fs, path = filesystem(location)
    with replacing(local) as tmp:
        pafs.copy_files(path, str(tmp), source_filesystem=fs)


@dataclass(frozen=True)
class FileEntry:
    """A file found under a location: its full location, path relative to the listed folder,
    size and modification time (seconds since the epoch)."""

    location: str
    relative: str
    size: int
    mtime: float


def list_files(location: str | os.PathLike[str], recursive: bool = True) -> list[FileEntry]:
    """The files under a folder / prefix (none when it does not exist)."""
    text = os.fspath(location)
    fs, path = filesystem(text)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path) :].lstrip("/")
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        out.append(FileEntry(join(text, rel), rel, int(info.size or 0), mtime))
    return sorted(out, key=lambda e: e.relative)


def list_dirs(location: str | os.PathLike[str]) -> list[str]:
    """Names of the sub-folders (object stores: common prefixes) directly under a location."""
    fs, path = filesystem(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
    )


def delete(location: str | os.PathLike[str]) -> None:
    """Delete one file; a missing file is fine."""
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def delete_tree(location: str | os.PathLike[str]) -> None:
    """Delete a folder / prefix with everything under it; a missing one is fine."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound and not list_files(location):
        return
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def local_cache(root: str | os.PathLike[str], *parts: str) -> Path:
    """A local folder for ``root``'s working files that must be local files (OS locks, staging
    copies, extracts osmium reads): ``root/parts`` for a local root; for an object-store root
    ``$S2VEC_CACHE_DIR`` (default ``~/.cache/s2vec``) ``/<hash of the root URI>/parts``."""
    text = os.fspath(root)
    if not is_object_store(text):
        return Path(text, *parts)
    from s2vec_pipeline.settings import cache_dir  # at call time: settings imports this module

    base = cache_dir()
    digest = hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:16]
    return base.joinpath(digest, *parts)


def bucket_of(root: str | os.PathLike[str]) -> str:
    """The bucket (container) of an object-store URI."""
    return os.fspath(root).split("://", 1)[1].split("/", 1)[0]


def check_bucket(root: str | os.PathLike[str]) -> None:
    """Fail when an object-store root's bucket is missing or unreachable (nothing is written):
    :class:`RootNotWritableError` naming the bucket and what to fix."""
    text = os.fspath(root)
    bucket = bucket_of(text)
    scheme = _scheme(text)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if scheme in ("s3", "s3a") else ""
    where = f" at {endpoint}" if endpoint else ""
    try:
        fs, _ = filesystem(text)
        found = fs.get_file_info(bucket).type
    except (OSError, ValueError) as e:
        raise RootNotWritableError(
            f"storage root {text}: cannot reach bucket {bucket!r}{where} ({_one_line(e)}): check "
            f"the credentials and endpoint in the environment ({_env_hint(scheme)})"
        ) from None
    if found == pafs.FileType.NotFound:
        raise RootNotWritableError(
            f"storage root {text}: bucket {bucket!r} does not exist{where}: create it first "
            f"or pass another --root (S2VEC_ROOT); check {_env_hint(scheme)}"
        )


def check_object_root(root: str | os.PathLike[str]) -> None:
    """``check_bucket``, then write one small probe object under the root and delete it:
    :class:`RootNotWritableError` when the bucket is missing, unreachable or read-only."""
    text = os.fspath(root)
    check_bucket(text)
    probe = join(text, f".s2vec-write-check-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as e:
        raise RootNotWritableError(
            f"storage root {text} is not writable ({_one_line(e)}): grant write access to bucket "
            f"{bucket_of(text)!r} or pass another --root (S2VEC_ROOT)"
        ) from None


def env_hint(location: str | os.PathLike[str]) -> str:
    """The environment variables that configure access to ``location``'s object store."""
    return _env_hint(_scheme(location))


def _env_hint(scheme: str | None) -> str:
    if scheme in ("s3", "s3a"):
        return "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION"
    if scheme in ("gs", "gcs"):
        return "GOOGLE_APPLICATION_CREDENTIALS"
    return "AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


@contextlib.contextmanager
def local_copy(location: str | os.PathLike[str]) -> Iterator[Path]:
    """A local path holding ``location``'s content for the block (itself when local)."""
    text = os.fspath(location)
    if not is_object_store(text):
        yield Path(text)
        return
    with tempfile.TemporaryDirectory(prefix="s2vec-") as tmp:
        target = Path(tmp) / text.rsplit("/", 1)[-1]
        download_file(text, target)
        yield target
