"""Tests for the feature taxonomy: loading, versioning, matching, validation, real coverage."""

from __future__ import annotations

import pickle
import re
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import osmium
import pytest
import yaml

from s2vec_pipeline.errors import TaxonomyError
from s2vec_pipeline.osm.taxonomy import MEASURES, Channel, Taxonomy, load_taxonomy

OSM_DIR = Path(__file__).resolve().parents[1] / "s2vec_pipeline" / "data" / "osm"
HELSINKI = OSM_DIR / "helsinki.osm.pbf"
MONACO = OSM_DIR / "monaco.osm.pbf"


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return load_taxonomy()


def names(tax: Taxonomy, idx: tuple[int, ...]) -> set[str]:
    return {tax.channel_names[i] for i in idx}


def write(tmp_path: Path, text: str, name: str = "tax.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def packaged_yaml() -> str:
    return resources.files("s2vec_pipeline.osm").joinpath("taxonomy.yaml").read_text("utf-8")


# ----------------------------------------------------------------------------- the default


def test_default_loads_with_enough_unique_channels(tax: Taxonomy) -> None:
    assert isinstance(tax, Taxonomy)
    assert tax.name
    assert len(tax.channels) >= 80
    assert all(isinstance(c, Channel) for c in tax.channels)
    assert tax.channel_names == tuple(c.name for c in tax.channels)
    assert len(set(tax.channel_names)) == len(tax.channel_names)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in tax.channel_names)
    assert {c.measure for c in tax.channels} == set(MEASURES)
    assert len(tax) == len(tax.channels)
    assert all(tax.index(n) == i for i, n in enumerate(tax.channel_names))
    with pytest.raises(KeyError):
        tax.index("no_such_channel")


def test_default_channels_are_ordered_by_group(tax: Taxonomy) -> None:
    runs = [
        c.group
        for i, c in enumerate(tax.channels)
        if i == 0 or c.group != tax.channels[i - 1].group
    ]
    assert len(runs) == len(set(runs)), f"groups are not contiguous: {runs}"


def test_default_keys(tax: Taxonomy) -> None:
    spec = yaml.safe_load(packaged_yaml())
    used = {s["key"] for c in spec["channels"] for s in c["selectors"]}
    # read by a standard YAML 1.1 loader, every value is still a string (yes/no are quoted)
    for c in spec["channels"]:
        for s in c["selectors"]:
            assert all(isinstance(v, str) for v in s.get("values", []) + s.get("exclude", []))
    assert set(tax.keys) == used
    assert list(tax.keys) == sorted(set(tax.keys))
    assert {"amenity", "shop", "building", "highway", "landuse", "natural"} <= set(tax.keys)
    osmium.filter.KeyFilter(*tax.keys)  # usable as the C++ pre-filter


def test_default_is_cached_and_immutable(tax: Taxonomy) -> None:
    assert load_taxonomy() is tax
    assert load_taxonomy(None) is tax
    with pytest.raises(AttributeError):
        tax.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del tax.version  # type: ignore[misc]
    with pytest.raises(ValueError):
        tax.indices("count")[0] = 5
    with pytest.raises(AttributeError):
        tax.channels[0].name = "x"  # type: ignore[misc]


def test_pickle_roundtrip(tax: Taxonomy) -> None:
    copy = pickle.loads(pickle.dumps(tax))
    assert copy == tax and hash(copy) == hash(tax)
    assert copy.version == tax.version and copy.channels == tax.channels
    assert copy.match({"amenity": "cafe", "building": "yes"}) == tax.match(
        {"amenity": "cafe", "building": "yes"}
    )


def test_indices_partition_the_channels(tax: Taxonomy) -> None:
    parts = [tax.indices(m) for m in MEASURES]
    for m, arr in zip(MEASURES, parts, strict=True):
        assert arr.dtype == np.int32
        assert len(arr) > 0
        assert list(arr) == sorted(arr)
        assert all(tax.channels[i].measure == m for i in arr)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(tax.channels)))
    with pytest.raises(ValueError):
        tax.indices("volume_m3")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- version


def test_version_is_a_stable_content_hash(tax: Taxonomy, tmp_path: Path) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", tax.version)
    path = write(tmp_path, packaged_yaml())
    first, second = load_taxonomy(path), load_taxonomy(path)
    assert first is not second
    assert first.version == second.version == tax.version
    assert first == tax


def test_version_is_the_hash_of_the_documented_canonical_form(tax: Taxonomy) -> None:
    """Recompute the version independently of the loader: the YAML read by PyYAML, selectors
    normalized as the file's header documents, canonical JSON, SHA-256. Table contracts carry
    the version, so it must not move when the validation code changes."""
    import hashlib
    import json

    raw = yaml.safe_load(packaged_yaml())
    channels = []
    for c in raw["channels"]:
        selectors = []
        for sel in c["selectors"]:
            norm: dict[str, Any] = {"key": sel["key"]}
            if "values" in sel:
                norm["values"] = sorted(set(sel["values"]))
            else:
                if "exclude" in sel:
                    norm["exclude"] = sorted(set(sel["exclude"]))
                if sel.get("other"):
                    norm["other"] = True
            selectors.append(norm)
        channels.append({k: c[k] for k in ("name", "measure", "group")} | {"selectors": selectors})
    spec = {"semantics": 1, "name": raw["name"], "channels": channels}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert tax.version == hashlib.sha256(text.encode()).hexdigest()[:16]


def _reversed_mappings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _reversed_mappings(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reversed_mappings(x) for x in obj]
    return obj


def test_version_ignores_layout_comments_key_and_value_order(tax: Taxonomy, tmp_path: Path) -> None:
    spec = yaml.safe_load(packaged_yaml())
    for channel in spec["channels"]:
        for sel in channel["selectors"]:
            for field in ("values", "exclude"):
                if field in sel:
                    sel[field] = list(reversed(sel[field]))
    text = yaml.safe_dump(_reversed_mappings(spec), sort_keys=False, default_flow_style=False)
    text = "# a different comment\n\n" + text.replace("\nchannels:", "\n# more\nchannels:  # x")
    assert text != packaged_yaml()
    assert load_taxonomy(write(tmp_path, text)).version == tax.version


def test_version_changes_with_selectors_and_order(tax: Taxonomy, tmp_path: Path) -> None:
    text = packaged_yaml()
    changed_value = text.replace("values: [restaurant]", "values: [restaurant, canteen]", 1)
    assert changed_value != text
    assert load_taxonomy(write(tmp_path, changed_value, "a.yaml")).version != tax.version

    spec = yaml.safe_load(text)
    spec["channels"][0], spec["channels"][1] = spec["channels"][1], spec["channels"][0]
    swapped = load_taxonomy(write(tmp_path, yaml.safe_dump(spec), "b.yaml"))
    assert swapped.version != tax.version
    assert swapped.channel_names[:2] == tax.channel_names[1::-1]

    spec = yaml.safe_load(text)
    spec["channels"][0]["measure"] = "area_m2"
    assert load_taxonomy(write(tmp_path, yaml.safe_dump(spec), "c.yaml")).version != tax.version


# ----------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"amenity": "restaurant", "name": "Zetor", "cuisine": "finnish"}, {"poi_food_restaurant"}),
        (
            {"building": "yes", "amenity": "school", "name": "Koulu"},
            {"building_other_m2", "poi_education_school", "amenity_campus_m2"},
        ),
        ({"building": "apartments", "addr:street": "X"}, {"building_residential_m2"}),
        ({"highway": "primary", "name": "Mannerheimintie"}, {"road_primary_m"}),
        ({"highway": "primary_link"}, {"road_primary_m"}),
        ({"highway": "bus_stop"}, {"poi_transit_bus_stop"}),
        ({"shop": "weird_thing"}, {"poi_shop_other"}),
        ({"shop": "clothes"}, {"poi_shop_clothes_shoes"}),
        ({"shop": "vacant"}, set()),
        ({"shop": "no"}, set()),
        ({"building": "no"}, set()),
        ({"building": "none"}, set()),
        ({"craft": "brewery"}, {"poi_craft"}),
        ({"craft": "no"}, set()),
        ({"name": "Something", "source": "survey", "foo": "bar"}, set()),
        ({}, set()),
        ({"amenity": "parking"}, {"poi_transport_parking", "amenity_parking_m2"}),
        ({"amenity": "bar;restaurant"}, {"poi_food_bar_pub", "poi_food_restaurant"}),
        ({"natural": "water", "water": "pond"}, {"water_m2"}),
        ({"landuse": "forest"}, {"natural_wood_forest_m2"}),
        ({"landuse": "lane"}, {"landuse_other_m2"}),
        ({"highway": "trail"}, {"road_other_m"}),
        ({"highway": "platform"}, {"poi_transit_bus_stop"}),
        ({"highway": "proposed"}, set()),
    ],
)
def test_match(tax: Taxonomy, tags: dict[str, str], expected: set[str]) -> None:
    got = tax.match(tags)
    assert isinstance(got, tuple)
    assert list(got) == sorted(set(got))
    assert names(tax, got) == expected


def test_match_accepts_mappings_pairs_and_tag_objects(tax: Taxonomy) -> None:
    tags = {"amenity": "cafe", "building": "yes", "name": "Cafe"}
    want = tax.match(tags)
    assert want
    assert tax.match(MappingProxyType(tags)) == want
    assert tax.match(list(tags.items())) == want
    assert tax.match([osmium.osm.Tag(k, v) for k, v in tags.items()]) == want


def test_match_on_osmium_taglists_equals_dicts(tax: Taxonomy) -> None:
    lengths: set[int] = set()
    n = 0
    fp = osmium.FileProcessor(str(MONACO)).with_filter(osmium.filter.KeyFilter(*tax.keys))
    for obj in fp:
        assert tax.match(obj.tags) == tax.match(dict(obj.tags)), dict(obj.tags)
        lengths.add(len(obj.tags))
        n += 1
    assert n > 5000
    assert min(lengths) <= 2 and max(lengths) > 12  # both ways of reading a TagList ran


OTHER_YAML = """
name: other-test
channels:
  - {name: a, measure: count, group: g, selectors: [{key: shop, values: [food]}]}
  - {name: b, measure: count, group: g, selectors: [{key: shop, other: true}]}
  - {name: c, measure: area_m2, group: g, selectors: [{key: shop, values: [x]}]}
  - name: d
    measure: area_m2
    group: g
    selectors: [{key: shop, other: true, exclude: [bad]}]
  - {name: e, measure: count, group: g, selectors: [{key: amenity, exclude: [foo]}]}
  - {name: f, measure: length_m, group: g, selectors: [{key: amenity, other: true}]}
  - {name: h, measure: length_m, group: g, selectors: [{key: man_made, values: [yes, on, no]}]}
"""


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"shop": "food"}, "ad"),  # d: no area channel takes shop=food
        ({"shop": "x"}, "bc"),
        ({"shop": "bad"}, "b"),
        ({"shop": "zzz"}, "bd"),
        ({"shop": "no"}, ""),
        ({"shop": "none"}, ""),
        ({"amenity": "bar"}, "ef"),  # e is any-value, of another measure than f
        ({"amenity": "foo"}, "f"),
        ({"amenity": "no"}, ""),
        ({"shop": "food", "amenity": "bar"}, "adef"),
        ({"shop": "food;zzz"}, "abd"),
        ({"man_made": "yes"}, "h"),  # yes/on/no stay strings, not YAML booleans
        ({"man_made": "on"}, "h"),
        ({"man_made": "no"}, "h"),  # an explicit value list may name "no"
    ],
)
def test_other_and_any_value_semantics(tmp_path: Path, tags: dict[str, str], expected: str) -> None:
    tax = load_taxonomy(write(tmp_path, OTHER_YAML))
    assert "".join(sorted(names(tax, tax.match(tags)))) == expected
    assert tax.keys == ("amenity", "man_made", "shop")


# ----------------------------------------------------------------------------- malformed

GOOD = "  - {name: ok_one, measure: count, group: g, selectors: [{key: amenity}]}\n"


def one(selectors: str) -> str:
    """A taxonomy with one count channel poi_x with these selectors (YAML flow list items)."""
    return f"channels:\n  - {{name: poi_x, measure: count, group: g, selectors: [{selectors}]}}\n"


MALFORMED = {
    "missing_name": (
        "channels:\n" + GOOD + "  - {measure: count, group: g, selectors: [{key: shop}]}\n",
        ["channel 1", "no 'name'"],
    ),
    "duplicate_name": (
        "channels:\n" + GOOD + GOOD.replace("amenity", "shop"),
        ["'ok_one'", "duplicate channel name", "channel 0"],
    ),
    "bad_name": (
        "channels:\n  - {name: Bad-Name, measure: count, group: g, selectors: [{key: x}]}\n",
        ["'Bad-Name'", "snake_case"],
    ),
    "unknown_measure": (
        "channels:\n  - {name: poi_x, measure: volume, group: g, selectors: [{key: x}]}\n",
        ["'poi_x'", "unknown measure 'volume'"],
    ),
    "selector_without_key": (
        "channels:\n  - {name: poi_x, measure: count, group: g, selectors: [{values: [a]}]}\n",
        ["'poi_x'", "selector 0", "no 'key'"],
    ),
    "empty_selectors": (
        "channels:\n  - {name: poi_x, measure: count, group: g, selectors: []}\n",
        ["'poi_x'", "empty selector list"],
    ),
    "missing_selectors": (
        "channels:\n  - {name: poi_x, measure: count, group: g}\n",
        ["'poi_x'", "empty selector list"],
    ),
    "values_not_a_list": (
        "channels:\n"
        "  - {name: poi_x, measure: count, group: g, selectors: [{key: a, values: restaurant}]}\n",
        ["'poi_x'", "'values' must be a list"],
    ),
    "values_empty": (
        one("{key: a, values: []}"),
        ["'poi_x'", "empty list"],
    ),
    "value_not_a_string": (
        one("{key: a, values: [3]}"),
        ["'poi_x'", "quote it"],
    ),
    "unknown_selector_field": (
        one("{key: a, value: [b]}"),
        ["'poi_x'", "unknown field", "'value'"],
    ),
    "other_with_values": (
        "channels:\n"
        "  - {name: poi_x, measure: count, group: g,"
        " selectors: [{key: a, values: [b], other: true}]}\n",
        ["'poi_x'", "'other: true' cannot be combined"],
    ),
    "two_other_channels": (
        "channels:\n"
        "  - {name: poi_x, measure: count, group: g, selectors: [{key: a, other: true}]}\n"
        "  - {name: poi_y, measure: count, group: g, selectors: [{key: a, other: true}]}\n",
        ["channel 1 ('poi_y')", "'poi_x' already is the 'other' channel"],
    ),
    "missing_group": (
        "channels:\n  - {name: poi_x, measure: count, selectors: [{key: a}]}\n",
        ["'poi_x'", "'group'"],
    ),
    "channel_not_a_mapping": ("channels:\n" + GOOD + "  - just_a_string\n", ["channel 1"]),
    "selector_not_a_mapping": (one("amenity"), ["'poi_x'", "selector 0", "must be a mapping"]),
    "other_not_a_bool": (one("{key: a, other: yes}"), ["'poi_x'", "'other' must be true or false"]),
    "values_null": (one("{key: a, values: }"), ["'poi_x'", "'values' must be a list", "null"]),
    "blank_key": (one("{key: ' '}"), ["'poi_x'", "selector 0", "'key' must be a non-empty"]),
    "exclude_with_values": (
        one("{key: a, values: [b], exclude: [c]}"),
        ["'poi_x'", "'exclude' only applies to selectors without 'values'"],
    ),
    "top_level_list": ("- a\n- b\n", ["must be a mapping", "got list"]),
    "no_channels": ("name: empty\nchannels: []\n", ["no channels at all"]),
    "no_channels_key": ("name: empty\n", ["no channels at all"]),
    "empty_file": ("", ["must be a mapping"]),
    "unknown_top_level": ("chanels:\n" + GOOD, ["unknown top-level field", "'chanels'"]),
    "yaml_syntax": ("channels:\n  - {name: a, measure: count\n", ["YAML syntax error"]),
    "yaml_duplicate_key": (
        "channels:\n  - name: a\n    name: b\n    measure: count\n",
        ["YAML", "duplicate key"],
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_taxonomies_raise(tmp_path: Path, case: str) -> None:
    text, fragments = MALFORMED[case]
    path = write(tmp_path, text, f"{case}.yaml")
    with pytest.raises(TaxonomyError) as info:
        load_taxonomy(path)
    msg = str(info.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="not found"):
        load_taxonomy(tmp_path / "nope.yaml")


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    assert load_taxonomy(write(tmp_path, "channels:\n" + GOOD, "mine.yaml")).name == "mine"


# ----------------------------------------------------------------------------- real data


def test_coverage_on_helsinki(tax: Taxonomy) -> None:
    """How much of what is mapped in central Helsinki the taxonomy catches.

    Measured when the taxonomy was written (matched / matched by a specific, non-"other"
    channel): amenity objects 100% / 96.7%, shop objects 100% / 88.9% (the rest is mostly
    shop=yes), building ways+relations 99.8% (building=entrance is excluded), highway ways
    97.6% / 91.5% (unmatched: railway platforms, indoor corridors and lifts; "other" holds the
    extract's 159 non-standard highway=trail ways). Thresholds sit a little below.
    """
    count = set(tax.indices("count").tolist())
    length = set(tax.indices("length_m").tolist())
    area = set(tax.indices("area_m2").tolist())
    catch_all = {
        tax.index(n) for n in tax.channel_names if n.endswith(("_other", "_other_m", "_other_m2"))
    }
    stats: dict[str, list[int]] = {k: [0, 0, 0] for k in ("amenity", "shop", "building", "highway")}

    def add(kind: str, hit: set[int]) -> None:
        stats[kind][0] += 1
        stats[kind][1] += bool(hit)
        stats[kind][2] += bool(hit - catch_all)

    fp = osmium.FileProcessor(str(HELSINKI)).with_filter(osmium.filter.KeyFilter(*tax.keys))
    for obj in fp:
        tags = obj.tags
        got = set(tax.match(tags))
        for key in ("amenity", "shop"):
            if key in tags:
                add(key, got & count)
        if not obj.is_node() and "building" in tags:
            add("building", got & area)
        if obj.is_way() and "highway" in tags:
            add("highway", got & length)

    frac = {k: (m / n, s / n) for k, (n, m, s) in stats.items()}
    assert stats["amenity"][0] > 1000 and stats["highway"][0] > 2500
    assert frac["amenity"][0] >= 0.99 and frac["amenity"][1] >= 0.93, frac
    assert frac["shop"][0] >= 0.99 and frac["shop"][1] >= 0.85, frac
    assert frac["building"][0] >= 0.99, frac
    assert frac["highway"][0] >= 0.95 and frac["highway"][1] >= 0.90, frac
