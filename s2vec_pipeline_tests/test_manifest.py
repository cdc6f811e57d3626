"""The root manifest ``s2vec_root.json``: what is recorded, read back, and refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from s2vec_pipeline.storage.manifest import (
    MANIFEST,
    ManifestError,
    read_manifest,
    record_sources,
    recorded_sources,
)


def test_recorded_sources_read_back_with_their_hash(tmp_path: Path, monaco_pbf: Path) -> None:
    root = tmp_path / "root"
    assert read_manifest(root) is None and recorded_sources(root) is None
    record_sources(root, [str(monaco_pbf)], "city", "tax1")
    doc = json.loads((root / MANIFEST).read_text())  # the file as another tool reads it
    key = str(monaco_pbf.resolve())
    assert doc["format"] == 1 and doc["profile"] == "city" and doc["taxonomy_version"] == "tax1"
    assert doc["sources"][key] == {
        "size": monaco_pbf.stat().st_size,
        "mtime_ns": monaco_pbf.stat().st_mtime_ns,
        "sha256": hashlib.sha256(monaco_pbf.read_bytes()).hexdigest(),
    }
    assert recorded_sources(root) == [key]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{not json", "file"),
        ('{"format": 1, "profile": "city", "taxonomy_version": "t"}', "sources"),
        (
            '{"format": 1, "sources": {"/a": {"size": "big"}}, "profile": "c", '
            '"taxonomy_version": "t"}',
            "sources./a.size",
        ),
    ],
)
def test_a_damaged_manifest_is_named_in_one_line(tmp_path: Path, content: str, named: str) -> None:
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / MANIFEST) in message and named in message
    assert "delete it and pass --source again" in message


def test_a_manifest_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(
        '{"format": 2, "sources": {}, "profile": "city", "taxonomy_version": "t"}'
    )
    with pytest.raises(ManifestError, match="format 2; this version reads format 1"):
        read_manifest(tmp_path)
