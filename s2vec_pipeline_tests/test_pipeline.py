"""End to end through a real Dagster instance: both bundled extracts, city profile, real Delta."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from s2vec_pipeline.cells.features import aggregate_cell_features
from s2vec_pipeline.cells.profiles import PROFILES
from s2vec_pipeline.cells.raster import tensor_array
from s2vec_pipeline.cli import main
from s2vec_pipeline.osm.taxonomy import load_taxonomy
from s2vec_pipeline.service.runner import materialize, parse_stages
from s2vec_pipeline.settings import PipelineSettings
from s2vec_pipeline.storage import delta_store
from s2vec_pipeline_tests.conftest import DATA_STAGES, HELSINKI_L6, MONACO_L6
from s2vec_pipeline_tests.contract_checks import data_layer_problems

TABLES = ["osm_features", "cell_features", "raster_tiles"]


def test_tables_and_contracts(materialized_root: Path) -> None:
    tax = load_taxonomy()
    city = PROFILES["city"]
    for name in TABLES:
        assert delta_store.partition_keys(materialized_root, name) == [MONACO_L6, HELSINKI_L6]
        contract = delta_store.table_contract(materialized_root, name)
        assert contract["taxonomy_version"] == tax.version
        assert (contract["image_level"], contract["pixel_level"], contract["side"]) == (13, 17, 16)
    raster_contract = delta_store.table_contract(materialized_root, "raster_tiles")
    assert raster_contract["channels"] == list(tax.channel_names)

    features = delta_store.read_partitions(materialized_root, "osm_features")
    cells = delta_store.read_partitions(materialized_root, "cell_features")
    raster = delta_store.read_partitions(materialized_root, "raster_tiles")
    # cell_features is exactly the aggregation of what osm_features holds
    again = aggregate_cell_features(features, tax, city)
    assert cells.sort("cell_id").equals(again.sort("cell_id"))
    # one raster row per image with data, pixel counts agreeing
    per_image = cells.group_by("image_token").len()
    joined = raster.join(per_image, on="image_token")
    assert joined.height == raster.height == per_image.height
    assert (joined["nonempty_pixels"] == joined["len"]).all()
    tensors = tensor_array(raster, len(tax.channels), city.side)
    assert tensors.shape == (raster.height, len(tax.channels), 16, 16)
    # Helsinki's extract (~1 x 1.7 km) spans a few level-13 images, hundreds of 70 m pixels
    helsinki = raster.filter(pl.col("parent_l6") == HELSINKI_L6)
    assert helsinki.height >= 4 and helsinki["nonempty_pixels"].sum() > 200


def test_independent_contract_check(materialized_root: Path) -> None:
    """The data-layer contract, checked without the project's S2 or raster code."""
    assert data_layer_problems(materialized_root, 13, 17) == []


def _partition_files(root: Path, table: str, token: str) -> dict[str, float]:
    part = root / table / f"parent_l6={token}"
    return {p.name: p.stat().st_mtime for p in part.glob("*.parquet")}


@pytest.mark.slow
def test_rerun_is_idempotent_and_isolated(tmp_path: Path) -> None:
    settings = PipelineSettings(root=str(tmp_path / "root"), profile_name="city")
    assets = parse_stages(DATA_STAGES)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        first = materialize(settings, [HELSINKI_L6, MONACO_L6], assets, instance)
        assert len(first.run_ids) == 3  # the sources' observation, then one run per partition
        before = {t: delta_store.read_partitions(settings.root, t) for t in TABLES}
        versions = {t: delta_store.table_version(settings.root, t) for t in TABLES}
        helsinki_files = {t: _partition_files(tmp_path / "root", t, HELSINKI_L6) for t in TABLES}

        # Unchanged inputs, code and settings: nothing is recomputed, nothing committed.
        again = materialize(settings, [MONACO_L6], assets, instance)
        assert again.up_to_date["data_layer"] == [MONACO_L6]
        assert {t: delta_store.table_version(settings.root, t) for t in TABLES} == versions
        materialize(settings, [MONACO_L6], assets, instance, force=True)
        for t in TABLES:
            after = delta_store.read_partitions(settings.root, t)
            assert after.height == before[t].height  # replaced, never duplicated
            key = "image_id" if t == "raster_tiles" else "cell_id"
            sort = [key] if t != "osm_features" else ["cell_id", "channel", "osm_type", "osm_id"]
            assert after.sort(sort).equals(before[t].sort(sort))
            assert delta_store.table_version(settings.root, t) == versions[t] + 1
            # Helsinki's files were not rewritten by Monaco's rerun
            assert _partition_files(tmp_path / "root", t, HELSINKI_L6) == helsinki_files[t]

        # one materialization per partition and run, each with its own data version
        records = instance.fetch_materializations(dg.AssetKey("osm_features"), limit=20).records
        assert sorted(r.partition_key for r in records) == [MONACO_L6, MONACO_L6, HELSINKI_L6]
        monaco = [r.asset_materialization for r in records if r.partition_key == MONACO_L6]
        assert monaco[0].metadata["dagster/row_count"].value == (
            before["osm_features"].filter(pl.col("parent_l6") == MONACO_L6).height
        )
        # re-extracting an unchanged source gives the same per-partition data version
        versions = {m.tags["dagster/data_version"] for m in monaco}
        assert len(versions) == 1
        helsinki = [r for r in records if r.partition_key == HELSINKI_L6][0]
        assert helsinki.asset_materialization.tags["dagster/data_version"] not in versions


def _cli(*args: str) -> int:
    return main(["materialize", *args])


@pytest.fixture(scope="module")
def monaco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_root")
    assert (
        _cli("--root", str(root), "--cells", MONACO_L6, "--stages", "extract,features,raster") == 0
    )
    return root


def _versions(root: Path) -> dict[str, int | None]:
    return {t: delta_store.table_version(root, t) for t in TABLES}


def test_cli_prints_what_it_wrote(monaco_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        _cli("--root", str(monaco_root), "--cells", MONACO_L6, "--stages", "features,raster") == 0
    )
    out = capsys.readouterr().out
    assert "partitions: 12cd" in out
    assert (
        "cell_features" in out
        and "raster_tiles" in out
        and "osm_features" not in out.split("table")[1]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cells", "zz"], "invalid S2 cell token 'zz'"),
        (["--cells", "4693"], "outside every configured source"),
        (["--cells", "12cf"], "outside every configured source"),
        (["--cells", "12cc"], "at S2 level 5"),
        (["--cells", "12cd4"], "level-6 parent is 12cd"),
        (["--profile", "huge"], "unknown profile"),
        (["--profile", "custom:13:12"], "must be greater than image level"),
        (["--profile", "custom:5:9"], "must be greater than the partition level"),
        (["--profile", "custom:8:15"], "exceeds 64"),
        (["--stages", "extract,bake"], "unknown stage"),
        (["--source", "/nonexistent/x.osm.pbf"], "does not exist"),
    ],
)
def test_cli_bad_input(
    monaco_root: Path,
    monaco_pbf: Path,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    before = _versions(monaco_root)
    base = ["--root", str(monaco_root)]
    if "--source" not in args:
        base += ["--source", str(monaco_pbf)]
    assert _cli(*base, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert _versions(monaco_root) == before


def test_truncated_source_leaves_tables_untouched(
    monaco_root: Path, monaco_pbf: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = monaco_pbf.read_bytes()
    bad = tmp_path / "monaco-truncated.osm.pbf"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    before = _versions(monaco_root)
    rows = delta_store.read_partitions(monaco_root, "osm_features").height
    assert _cli("--root", str(monaco_root), "--source", str(bad), "--cells", MONACO_L6) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert _versions(monaco_root) == before
    assert delta_store.read_partitions(monaco_root, "osm_features").height == rows


def test_other_profile_on_same_root_is_refused(
    monaco_root: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _versions(monaco_root)
    assert _cli("--root", str(monaco_root), "--cells", MONACO_L6, "--profile", "paper") == 2
    err = capsys.readouterr().err
    assert "written with different settings" in err and "another --root" in err
    assert _versions(monaco_root) == before


def test_no_matching_features(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import osmium

    src = tmp_path / "nothing.osm.pbf"
    with osmium.SimpleWriter(str(src)) as w:
        w.add_node(osmium.osm.mutable.Node(id=1, location=(7.42, 43.73), tags={"note": "x"}))
    root = tmp_path / "root"
    assert _cli("--root", str(root), "--source", str(src)) == 2
    assert "matches the taxonomy" in capsys.readouterr().err
    assert not (root / "osm_features").exists()


@pytest.mark.slow
def test_parallel_partitions_fail_alone(
    tmp_path: Path, helsinki_pbf: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two partitions in two worker processes; one source is truncated. Its partition fails
    with the user's error (exit 2), the other partition is written."""
    data = helsinki_pbf.read_bytes()
    bad = tmp_path / "helsinki-truncated.osm.pbf"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    root = tmp_path / "root"
    args = ["--root", str(root), "--source", str(monaco_pbf), "--source", str(bad)]
    rc = _cli(
        *args, "--cells", f"{MONACO_L6},{HELSINKI_L6}", "--workers", "2", "--stages", "extract"
    )
    assert rc == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert delta_store.partition_keys(root, "osm_features") == [MONACO_L6]
    monaco = delta_store.read_partitions(root, "osm_features", [MONACO_L6])
    assert monaco.height > 0 and set(monaco["parent_l6"]) == {MONACO_L6}


def test_workers_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _cli("--root", str(tmp_path), "--workers", "0") == 2
    assert "--workers must be a whole number" in capsys.readouterr().err
    assert not (tmp_path / "osm_features").exists()


def test_rerun_on_unchanged_inputs_commits_nothing(
    monaco_root: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture
) -> None:
    """The CLI's second run over the same source, settings and code skips every partition
    (an independent look: Delta versions and file listings), and --force recomputes."""
    before = _versions(monaco_root)
    files = {t: sorted(p.name for p in (monaco_root / t).rglob("*.parquet")) for t in TABLES}
    args = ["--root", str(monaco_root), "--source", str(monaco_pbf), "--cells", MONACO_L6]
    assert _cli(*args, "--stages", "extract,features,raster") == 0
    assert f"up to date, skipped (data_layer): {MONACO_L6}" in capsys.readouterr().out
    assert _versions(monaco_root) == before
    assert files == {
        t: sorted(p.name for p in (monaco_root / t).rglob("*.parquet")) for t in TABLES
    }
    assert _cli(*args, "--stages", "extract", "--force") == 0
    assert _versions(monaco_root)["osm_features"] == before["osm_features"] + 1


@pytest.mark.slow
def test_root_remembers_its_sources(
    tmp_path: Path, monaco_pbf: Path, capsys: pytest.CaptureFixture
) -> None:
    """Built from one extract, the root is refreshed and shown from that extract without
    --source (not the bundled defaults); the manifest's hash is the file's."""
    import hashlib
    import json
    import shutil

    src = tmp_path / "elsewhere" / "mc.osm.pbf"
    src.parent.mkdir()
    shutil.copy(monaco_pbf, src)
    root = tmp_path / "root"
    assert _cli("--root", str(root), "--source", str(src), "--stages", "extract") == 0
    manifest = json.loads((root / "s2vec_root.json").read_text())
    assert list(manifest["sources"]) == [str(src.resolve())]
    entry = manifest["sources"][str(src.resolve())]
    assert entry["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert str(src.resolve()) in out and "helsinki" not in out
    assert main(["refresh", "--root", str(root)]) == 0  # no --source: the recorded one
    assert "osm_features: []" in capsys.readouterr().out
    # the recorded source gone: a clear error, nothing falls back to the bundled extracts
    src.rename(src.with_suffix(".moved"))
    assert main(["refresh", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "no longer exist" in err and str(src.resolve()) in err
    # a --source that does not cover the root's partitions is refused
    helsinki = Path(str(monaco_pbf).replace("monaco", "helsinki"))
    assert main(["refresh", "--root", str(root), "--source", str(helsinki)]) == 2
    assert "outside every configured source" in capsys.readouterr().err
