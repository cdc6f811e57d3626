"""Incremental refresh on the bundled extracts with real osmium diffs, a real Dagster instance
(on disk), real Delta tables and a tiny trained model. The tests run in order on one root."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

import dagster as dg
import osmium
import pytest

from s2vec_pipeline import delta_store
from s2vec_pipeline import osm_changes as oc
from s2vec_pipeline.cli import main
from s2vec_pipeline.definitions import build_definitions
from s2vec_pipeline.defs.refresh import (
    partitions_to_reextract,
    reextract_touched_partitions,
    refresh,
)
from s2vec_pipeline.defs.resources import S2VecResource
from s2vec_pipeline.defs.runner import materialize, parse_stages
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6
from s2vec_pipeline_tests.test_model_pipeline import TINY
from s2vec_pipeline_tests.test_osm_changes import OLD_TS, STATION, TS, _node, _osc

TABLES = ["osm_features", "cell_features", "raster_tiles", "cell_embeddings", "image_embeddings"]
DOWNSTREAM = TABLES[1:]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _versions(root: Path) -> dict[str, int | None]:
    return {t: delta_store.table_version(root, t) for t in TABLES}


def _partition_files(root: Path, token: str) -> dict[str, float]:
    """Every data file of one partition in every table, with its mtime."""
    out = {}
    for t in TABLES:
        for f in sorted((root / t / f"parent_l6={token}").glob("*")):
            out[str(f.relative_to(root))] = f.stat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def env(materialized: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A copy of the materialized data layer and its Dagster records, plus a tiny model and
    embeddings of both partitions."""
    src_root, src_home = materialized
    root = tmp_path_factory.mktemp("refresh_root")
    home = tmp_path_factory.mktemp("refresh_home")
    shutil.copytree(src_root, root, dirs_exist_ok=True)
    shutil.copytree(src_home, home, dirs_exist_ok=True)
    settings = PipelineSettings(root=str(root))
    instance = dg.DagsterInstance.local_temp(str(home))
    materialize(
        settings,
        [HELSINKI_L6, MONACO_L6],
        parse_stages(["train", "embed"]),
        instance,
        op_config={"mae_model": TINY},
    )
    state = {"root": root, "instance": instance, "changes": root.parent / "changes"}
    yield state
    instance.dispose()


@pytest.fixture(scope="module")
def station(helsinki_pbf: Path) -> tuple[int, float, float, dict[str, str]]:
    """Helsinki railway station node (tagged, used by no way): version, lat, lon, tags."""
    for obj in osmium.FileProcessor(str(helsinki_pbf)).with_filter(
        osmium.filter.IdFilter([STATION])
    ):
        return obj.version, obj.location.lat, obj.location.lon, dict(obj.tags)
    raise AssertionError("station node not in the bundled extract")


def _moved(station: tuple, bump: int, dlat: float, ts: str = TS) -> str:
    """The station, ``dlat`` degrees north, as a new version keeping its tags (a modify
    replaces the whole object)."""
    version, lat, lon, tags = station
    node = _node(STATION, version + bump, lat + dlat, lon, ts)
    body = "".join(f'    <tag k="{k}" v="{escape(v)}"/>\n' for k, v in tags.items())
    return node.replace("/>\n", f">\n{body}  </node>\n")


def _settings(env: dict, changes: bool) -> PipelineSettings:
    return PipelineSettings(
        root=str(env["root"]), changes_dir=str(env["changes"]) if changes else None
    )


def test_unchanged_source_recomputes_nothing_downstream(env: dict) -> None:
    root, instance = env["root"], env["instance"]
    defs = build_definitions(_settings(env, False))
    env["cursor"] = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor
    before = _versions(root)
    report = refresh(_settings(env, False), instance)
    assert report.applied == {} and report.touched_cells == []
    assert report.recomputed["osm_features"] == [MONACO_L6, HELSINKI_L6]  # re-read, same data
    assert all(report.recomputed[t] == [] for t in DOWNSTREAM)
    after = _versions(root)
    assert {t: after[t] for t in DOWNSTREAM} == {t: before[t] for t in DOWNSTREAM}
    # The daemon's view: rematerialized but unchanged partitions request nothing downstream.
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=env["cursor"])
    assert result.total_requested == 0
    env["cursor"] = result.cursor


def test_automation_requests_only_the_changed_partition(env: dict, station: tuple) -> None:
    """The daemon's automation conditions, evaluated without a daemon: after a change in
    Helsinki is extracted, only Helsinki's cell_features partition is requested. A refresh
    then finishes the chain from Dagster's records (as after an interrupted refresh)."""
    root, instance = env["root"], env["instance"]
    defs = build_definitions(_settings(env, True))
    cursor = env["cursor"]
    _osc(env["changes"] / "0001.osc", modify=_moved(station, 1, 0.002))
    for src in _settings(env, True).sources:  # what osm_sources does, by hand
        applied = oc.apply_changes(root, src, env["changes"])
        assert [p.name for p in applied.applied] == ["0001.osc"]
    # What the sensor after osm_sources launches: Helsinki's partition only, as one range.
    assert partitions_to_reextract(_settings(env, True), instance) == [HELSINKI_L6]
    resources = {"s2vec": S2VecResource.from_settings(_settings(env, True))}
    sensed = reextract_touched_partitions(
        dg.build_sensor_context(instance=instance, resources=resources)
    )
    (request,) = sensed.run_requests
    assert request.job_name == "reextract_osm_features"
    assert request.tags["dagster/asset_partition_range_start"] == HELSINKI_L6
    assert request.tags["dagster/asset_partition_range_end"] == HELSINKI_L6
    again = reextract_touched_partitions(
        dg.build_sensor_context(instance=instance, resources=resources, cursor=sensed.cursor)
    )
    assert not again.run_requests  # once per osm_sources materialization
    materialize(_settings(env, True), [HELSINKI_L6, MONACO_L6], ["osm_features"], instance)

    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    assert result.get_requested_partitions(dg.AssetKey("cell_features")) == {HELSINKI_L6}
    assert result.total_requested == 1

    monaco = _partition_files(root, MONACO_L6)
    report = refresh(_settings(env, True), instance)
    assert report.recomputed == {"osm_features": [], **{t: [HELSINKI_L6] for t in DOWNSTREAM}}
    assert _partition_files(root, MONACO_L6) == monaco


def test_change_file_recomputes_only_its_partition(
    env: dict, station: tuple, helsinki_pbf: Path, capsys
) -> None:
    root, instance = env["root"], env["instance"]
    _osc(env["changes"] / "0002.osc", modify=_moved(station, 2, 0.004))
    source_sha = _sha(helsinki_pbf)
    monaco = _partition_files(root, MONACO_L6)
    assert len(monaco) >= len(TABLES)

    report = refresh(_settings(env, True), instance)
    # The folder is applied to every source (replication diffs are planet-wide); the object is
    # in Helsinki, so only Helsinki's cell is touched.
    assert report.applied == {s: ["0002.osc"] for s in _settings(env, True).sources}
    assert HELSINKI_L6 in report.touched_cells and MONACO_L6 not in report.touched_cells
    assert report.recomputed == {t: [HELSINKI_L6] for t in TABLES}
    assert _partition_files(root, MONACO_L6) == monaco  # not one Monaco file rewritten
    assert _sha(helsinki_pbf) == source_sha  # the user's file is never modified
    extract = oc.current_extract(root, helsinki_pbf)
    assert extract.parent == oc.source_dir(root, helsinki_pbf)

    # Same change files again: nothing applied, nothing recomputed, no Delta commit.
    versions = _versions(root)
    again = refresh(_settings(env, True), instance)
    assert again.applied == {} and all(v == [] for v in again.recomputed.values())
    assert _versions(root) == versions

    # The command prints what it recomputed (an empty list when nothing changed).
    args = ["refresh", "--root", str(root), "--changes", str(env["changes"])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(instance.root_directory))
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "cell_features: []" in out and "applied: no new change file" in out
    assert _versions(root) == versions


def test_bad_change_files_apply_nothing(
    env: dict, station: tuple, helsinki_pbf: Path, capsys
) -> None:
    root, instance = env["root"], env["instance"]
    ledger = oc.read_ledger(root, helsinki_pbf)
    versions = _versions(root)
    bad = env["changes"] / "0003.osc"
    bad.write_text("<osmChange version='0.6'><modify><node id='1' lat='60.1'")  # truncated
    with pytest.raises(S2VecError, match="0003.osc"):
        refresh(_settings(env, True), instance)
    bad.unlink()
    stale = _osc(env["changes"] / "0004.osc", modify=_moved(station, 0, 0.0, OLD_TS))
    args = ["refresh", "--root", str(root), "--changes", str(env["changes"])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(instance.root_directory))
        assert main(args) == 2
    assert "0004.osc" in capsys.readouterr().err
    stale.unlink()
    assert oc.read_ledger(root, helsinki_pbf) == ledger
    assert _versions(root) == versions


def test_new_model_makes_every_embedding_partition_stale(env: dict) -> None:
    """Weekly training, then the nightly run: a new model version requests every embedding
    partition (automation) and the refresh recomputes exactly those."""
    root, instance = env["root"], env["instance"]
    defs = build_definitions(_settings(env, True))
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance).cursor
    materialize(
        _settings(env, True),
        [HELSINKI_L6, MONACO_L6],
        ["mae_model"],
        instance,
        op_config={"mae_model": {**TINY, "seed": 7}},
    )
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    both = {HELSINKI_L6, MONACO_L6}
    assert result.get_requested_partitions(dg.AssetKey("cell_embeddings")) == both
    assert result.get_requested_partitions(dg.AssetKey("cell_features")) == set()
    versions = _versions(root)
    report = refresh(_settings(env, True), instance)
    assert report.recomputed == {
        "osm_features": [],
        "cell_features": [],
        "raster_tiles": [],
        "cell_embeddings": [MONACO_L6, HELSINKI_L6],
        "image_embeddings": [MONACO_L6, HELSINKI_L6],
    }
    after = _versions(root)
    assert {t: after[t] for t in TABLES[:3]} == {t: versions[t] for t in TABLES[:3]}
