"""The root manifest: what a storage root was built from, so later commands need not be told.

``<root>/s2vec_root.json`` records the sources (full paths, with size, mtime and a content hash
taken when first recorded), the profile and the taxonomy. ``s2vec materialize`` and
``s2vec refresh`` without ``--source`` use the recorded sources; a root written with another
profile or taxonomy is refused by the tables' contracts. Written atomically (temp file, rename)
and versioned (``format``), under the root's lock so concurrent commands merge their sources.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydantic

from s2vec_pipeline.errors import S2VecError, validation_problem
from s2vec_pipeline.storage import fs
from s2vec_pipeline.storage.file_identity import FileIdentity
from s2vec_pipeline.storage.locks import exclusive
from s2vec_pipeline.storage.versioning import file_sha256

MANIFEST = "s2vec_root.json"
FORMAT = 1


class ManifestError(S2VecError):
    """The root's manifest is unreadable, or names sources that are gone."""


class SourceRecord(pydantic.BaseModel):
    """A recorded source file: its size and mtime when recorded, and its content hash."""

    size: int
    mtime_ns: int
    sha256: str


class RootManifest(pydantic.BaseModel):
    """``s2vec_root.json`` (format ``FORMAT``)."""

    model_config = pydantic.ConfigDict(frozen=True)

    format: int = FORMAT
    sources: dict[str, SourceRecord]  # absolute path -> its record
    profile: str
    taxonomy_version: str

    @property
    def source_paths(self) -> list[str]:
        return list(self.sources)


def _path(root: str | os.PathLike) -> str:
    return fs.join(root, MANIFEST)


def read_manifest(root: str | os.PathLike) -> RootManifest | None:
    path = _path(root)
    raw = fs.read_bytes(path)
    if raw is None:
        return None
    try:
        manifest = RootManifest.model_validate_json(raw)
    except pydantic.ValidationError as e:
        raise ManifestError(
            f"{path} is not a readable s2vec manifest ({validation_problem(e, 'file')}): restore "
            f"it, or delete it and pass --source again"
        ) from e
    if manifest.format != FORMAT:
        raise ManifestError(
            f"{path} has format {manifest.format}; this version reads format {FORMAT}: delete "
            f"it and pass --source again"
        )
    return manifest


def record_sources(
    root: str | os.PathLike, sources: list[str], profile: str, taxonomy_version: str
) -> RootManifest:
    """Add ``sources`` to the root's manifest (creating it); returns the manifest as written."""
    with exclusive(fs.local_cache(root, f".{MANIFEST}.lock")):
        current = read_manifest(root)
        known = dict(current.sources) if current else {}
        for src in sources:
            identity = FileIdentity.of(src)
            key = str(identity.path)
            entry = known.get(key)
            if entry and identity.same_version(entry.size, entry.mtime_ns):
                continue  # unchanged: no need to hash it again
            known[key] = SourceRecord(
                size=identity.size,
                mtime_ns=identity.mtime_ns,
                sha256=file_sha256(identity.path)[0],
            )
        manifest = RootManifest(
            sources=dict(sorted(known.items())), profile=profile, taxonomy_version=taxonomy_version
        )
        fs.write_text(_path(root), manifest.model_dump_json(indent=2))
        return manifest


def recorded_sources(root: str | os.PathLike) -> list[str] | None:
    """The sources the root was built from, or None for a root without a manifest. A recorded
    source that no longer exists is an error naming it (never a silent fallback)."""
    manifest = read_manifest(root)
    if manifest is None:
        return None
    missing = [s for s in manifest.source_paths if not Path(s).is_file()]
    if missing:
        raise ManifestError(
            f"the root {root} was built from {', '.join(missing)}, which no longer exist: "
            f"restore them or pass --source with their new location"
        )
    return manifest.source_paths
