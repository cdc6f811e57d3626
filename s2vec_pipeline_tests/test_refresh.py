"""Incremental refresh on the bundled extracts with real osmium diffs, a real Dagster instance
(on disk), real Delta tables and a tiny trained model. Each test starts from its own copy of
one embedded root and its Dagster records."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

import dagster as dg
import osmium
import polars as pl
import pytest

from s2vec_pipeline.cli import main
from s2vec_pipeline.definitions import build_definitions
from s2vec_pipeline.defs.automation import refresh_stale_partitions, stale_partitions
from s2vec_pipeline.errors import S2VecError
from s2vec_pipeline.osm import changes as oc
from s2vec_pipeline.service.runner import Launcher, materialize, parse_stages, refresh
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import HELSINKI_L6, MONACO_L6
from s2vec_pipeline_tests.test_model_pipeline import TINY
from s2vec_pipeline_tests.test_osm_changes import OLD_TS, STATION, TS, _node, _osc

pytestmark = pytest.mark.slow  # each test refreshes a Dagster-run root

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
def embedded_base(materialized: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """The materialized data layer and its Dagster records, plus a tiny model and embeddings of
    both partitions. Read-only: each test copies it."""
    src_root, src_home = materialized
    root = tmp_path_factory.mktemp("refresh_root")
    home = tmp_path_factory.mktemp("refresh_home")
    shutil.copytree(src_root, root, dirs_exist_ok=True)
    shutil.copytree(src_home, home, dirs_exist_ok=True)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        materialize(
            PipelineSettings(root=str(root)),
            [HELSINKI_L6, MONACO_L6],
            parse_stages(["train", "embed"]),
            instance,
            op_config={"mae_model": TINY},
        )
    return root, home


@pytest.fixture
def env(embedded_base: tuple[Path, Path], tmp_path: Path):
    root, home = tmp_path / "root", tmp_path / "home"
    shutil.copytree(embedded_base[0], root)
    shutil.copytree(embedded_base[1], home)
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        yield {"root": root, "instance": instance, "changes": tmp_path / "changes"}


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


def test_unchanged_source_recomputes_nothing(env: dict) -> None:
    root, instance = env["root"], env["instance"]
    before = _versions(root)
    report = refresh(_settings(env, False), instance)
    assert report.applied == {} and report.touched_cells == []
    assert all(report.recomputed[t] == [] for t in TABLES)
    assert _versions(root) == before  # not one Delta commit


def test_change_file_recomputes_only_its_partition(
    env: dict, station: tuple, helsinki_pbf: Path, capsys
) -> None:
    root, instance = env["root"], env["instance"]
    _osc(env["changes"] / "0001.osc", modify=_moved(station, 1, 0.004))
    source_sha = _sha(helsinki_pbf)
    monaco = _partition_files(root, MONACO_L6)
    assert len(monaco) >= len(TABLES)
    before = delta_store.read_partitions(root, "osm_features", [HELSINKI_L6])

    report = refresh(_settings(env, True), instance)
    # The folder is offered to every source (replication diffs are planet-wide); the object is
    # in Helsinki's region only, so only Helsinki applies it and only Helsinki's cell is touched.
    sources = _settings(env, True).sources
    (helsinki,) = [s for s in sources if Path(s).resolve() == helsinki_pbf.resolve()]
    assert len(sources) == 2 and report.applied == {helsinki: ["0001.osc"]}
    assert HELSINKI_L6 in report.touched_cells and MONACO_L6 not in report.touched_cells
    assert report.recomputed == {t: [HELSINKI_L6] for t in TABLES}
    assert _partition_files(root, MONACO_L6) == monaco  # not one Monaco file rewritten
    assert _sha(helsinki_pbf) == source_sha  # the user's file is never modified
    extract = oc.current_extract(root, helsinki_pbf)
    assert extract.parent == oc.source_dir(root, helsinki_pbf)
    # the station really moved in the re-extracted rows (an independent look at the table)
    after = delta_store.read_partitions(root, "osm_features", [HELSINKI_L6])
    moved = after.filter(pl.col("osm_id") == STATION)["lat"].to_list()
    was = before.filter(pl.col("osm_id") == STATION)["lat"].to_list()
    assert moved and was and moved[0] == pytest.approx(was[0] + 0.004, abs=1e-6)

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


def test_sensor_recomputes_the_changed_partition_in_one_run(env: dict, station: tuple) -> None:
    """The daemon's path, without a daemon: after the nightly observation applied a change in
    Helsinki, refresh_stale_partitions requests ONE run for Helsinki, from osm_features through
    the embeddings (not one tick per layer); once it ran, nothing is stale and nothing more is
    requested. Monaco is never requested."""
    root, instance = env["root"], env["instance"]
    settings = _settings(env, True)
    defs = build_definitions(settings)
    _osc(env["changes"] / "0001.osc", modify=_moved(station, 1, 0.004))
    launcher = Launcher(settings, instance)
    launcher.run("refresh_sources")  # what the nightly schedule launches
    before = _versions(root)
    ctx = dg.build_sensor_context(instance=instance, definitions=defs)
    (request,) = refresh_stale_partitions(ctx).run_requests
    assert (request.job_name, request.partition_key) == ("partition_pipeline", HELSINKI_L6)
    assets = [k.to_user_string() for k in request.asset_selection]
    assert assets == TABLES
    # the same staleness is requested once (run keys), and a run does what it asked
    again = refresh_stale_partitions(dg.build_sensor_context(instance=instance, definitions=defs))
    assert [r.run_key for r in again.run_requests] == [request.run_key]
    launcher.run(request.job_name, request.partition_key, assets)
    after = refresh_stale_partitions(dg.build_sensor_context(instance=instance, definitions=defs))
    assert not after.run_requests
    assert all(stale_partitions(instance, defs, t) == {} for t in TABLES)
    # every table got exactly one new commit: the one run wrote each stage once
    assert _versions(root) == {t: v + 1 for t, v in before.items()}


def test_bad_change_files_apply_nothing(
    env: dict, station: tuple, helsinki_pbf: Path, capsys
) -> None:
    root, instance = env["root"], env["instance"]
    ledger = oc.read_ledger(root, helsinki_pbf)
    versions = _versions(root)
    env["changes"].mkdir()
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
    """Weekly training, then the nightly run: a new model version makes every embedding
    partition stale, and the refresh recomputes exactly those."""
    root, instance = env["root"], env["instance"]
    settings = _settings(env, False)
    defs = build_definitions(settings)
    assert stale_partitions(instance, defs, "cell_embeddings") == {}
    materialize(
        settings,
        [HELSINKI_L6, MONACO_L6],
        ["mae_model"],
        instance,
        op_config={"mae_model": {**TINY, "seed": 7}},
    )
    stale = stale_partitions(instance, defs, "cell_embeddings")
    assert set(stale) == {HELSINKI_L6, MONACO_L6}
    assert all("mae_model" in " ".join(why) for why in stale.values())
    assert stale_partitions(instance, defs, "cell_features") == {}
    versions = _versions(root)
    report = refresh(settings, instance)
    assert report.recomputed == {
        "osm_features": [],
        "cell_features": [],
        "raster_tiles": [],
        "cell_embeddings": [MONACO_L6, HELSINKI_L6],
        "image_embeddings": [MONACO_L6, HELSINKI_L6],
    }
    after = _versions(root)
    assert {t: after[t] for t in TABLES[:3]} == {t: versions[t] for t in TABLES[:3]}


def test_status_names_what_is_stale_and_why(env: dict, station: tuple, capsys) -> None:
    """After the nightly observation applied a change in Helsinki (and before any recompute),
    `s2vec status` shows Helsinki's osm_features stale because of osm_sources, everything else
    up to date, and the change file each source last applied."""
    root, instance = env["root"], env["instance"]
    _osc(env["changes"] / "0001.osc", modify=_moved(station, 1, 0.004))
    Launcher(_settings(env, True), instance).run("refresh_sources")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(instance.root_directory))
        assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(tuple(TABLES))]
    rows = {tuple(line.split()[:3]): line for line in lines}
    helsinki = rows[("osm_features", str(_versions(root)["osm_features"]), HELSINKI_L6)]
    assert "stale" in helsinki and "osm_sources" in helsinki
    others = [line for key, line in rows.items() if key[2] == MONACO_L6 or key[0] != "osm_features"]
    assert others and all(line.endswith("up to date") for line in others)
    assert "0001.osc" in out and len(rows) == 2 * len(TABLES)


def test_change_outside_every_source_is_reported_not_applied(env: dict, capsys) -> None:
    """A change file creating a node in Paris belongs to neither bundled extract: the refresh
    applies it to none, says so, and recomputes nothing."""
    root, instance = env["root"], env["instance"]
    _osc(env["changes"] / "0001.osc", create=_node(99_000_000_001, 1, 48.8566, 2.3522))
    versions = _versions(root)
    report = refresh(_settings(env, True), instance)
    assert report.applied == {} and report.outside == ["0001.osc"]
    assert all(v == [] for v in report.recomputed.values())
    assert _versions(root) == versions
    args = ["refresh", "--root", str(root), "--changes", str(env["changes"])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(instance.root_directory))
        assert main(args) == 0
    assert "applied: no new change file" in capsys.readouterr().out  # reported once, skipped after


def test_status_reports_embeddings_of_two_models(env: dict, capsys) -> None:
    """A re-embedding interrupted after one partition leaves two models in cell_embeddings:
    `s2vec status` says so, naming the partitions and models."""
    root, instance = env["root"], env["instance"]
    settings = _settings(env, False)
    materialize(
        settings,
        [HELSINKI_L6],
        ["mae_model"],
        instance,
        op_config={"mae_model": {**TINY, "seed": 7}},
    )
    materialize(settings, [HELSINKI_L6], ["cell_embeddings", "image_embeddings"], instance)
    models = delta_store.read_partitions(root, "cell_embeddings", columns=["model_version"])
    assert models["model_version"].n_unique() == 2  # the independent look at the table
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(instance.root_directory))
        assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "warning: embeddings of several models" in out
    for m in models["model_version"].unique().to_list():
        assert m in out


def _refresh_in_child(root: str, changes: str, home: str, out: str) -> None:
    with dg.DagsterInstance.from_config(home) as instance:
        report = refresh(PipelineSettings(root=root, changes_dir=changes), instance)
    Path(out).write_text(f"{sum(map(len, report.applied.values()))} {len(report.run_ids)}")


def test_concurrent_refreshes_apply_and_recompute_once(env: dict, station: tuple) -> None:
    """Three `s2vec refresh` of one root at once: the change is applied by one of them and its
    partition recomputed once (one run, one commit per table); the others find nothing to do."""
    import multiprocessing as mp

    root, instance = env["root"], env["instance"]
    _osc(env["changes"] / "0001.osc", modify=_moved(station, 1, 0.004))
    before = _versions(root)
    ctx = mp.get_context("spawn")
    outs = [env["root"].parent / f"refresh{i}" for i in range(3)]
    home = str(instance.root_directory)
    procs = [
        ctx.Process(target=_refresh_in_child, args=(str(root), str(env["changes"]), home, str(o)))
        for o in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    # each: files applied, runs launched (the observation, then one run per stale partition)
    results = sorted(o.read_text() for o in outs)
    assert results == ["0 1", "0 1", "1 2"]
    assert _versions(root) == {t: v + 1 for t, v in before.items()}
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="partition_pipeline"))
    assert [r.tags["dagster/partition"] for r in runs] == [HELSINKI_L6]
