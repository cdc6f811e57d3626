"""A source file's identity without reading it: where it is (resolved path) and which version
of it is there (size, modification time, inode).

The one home of this rule, used by the change ledger (``osm.changes``: the folder of a source
and the check that the original is unchanged), the per-cell source versions, the split cache
(``osm.split``: one folder per path, one sub-folder per version) and the root manifest
(``storage.manifest``: skip hashing a recorded file again).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: Hex digits of the sha256 of the resolved path in ``FileIdentity.path_key``.
PATH_HASH_DIGITS = 12


@dataclass(frozen=True)
class FileIdentity:
    """One version of a file at one place: ``path`` resolved (absolute, links followed)."""

    path: Path
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity:
        """The identity of the file now at ``path`` (``OSError`` if there is none)."""
        resolved = Path(path).resolve()
        st = resolved.stat()
        return cls(resolved, st.st_size, st.st_mtime_ns, st.st_ino)

    @property
    def stem(self) -> str:
        """A readable name for file names: the file name without ``.osm.pbf``, safe characters
        only, never empty and never starting with a dot (``...osm.pbf`` would give ``..``)."""
        return file_stem(self.path)

    @property
    def path_key(self) -> str:
        """See ``path_key``."""
        return path_key(self.path)

    def same_version(self, size: int, mtime_ns: int) -> bool:
        """Whether a recorded (size, mtime) still describe the file: then it need not be read
        again to know it is the same content."""
        return (self.size, self.mtime_ns) == (size, mtime_ns)


def path_key(path: str | os.PathLike) -> str:
    """``<stem>-<12 hex digits of the sha256 of the resolved path>``: one plain path component
    per place (the file need not exist); two files of the same name in different folders get
    different keys."""
    resolved = Path(path).resolve()
    digest = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:PATH_HASH_DIGITS]
    return f"{file_stem(resolved)}-{digest}"


def file_stem(path: Path) -> str:
    """See ``FileIdentity.stem``."""
    name = path.name
    for suffix in (".osm.pbf", ".pbf"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:64] or "source"
