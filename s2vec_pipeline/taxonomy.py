"""The feature taxonomy: which OSM tags feed which channel of the per-cell feature tensor.

The taxonomy is data (``taxonomy.yaml``, format described at its top). :func:`load_taxonomy`
validates it and compiles it into a :class:`Taxonomy`, whose :meth:`Taxonomy.match` maps an OSM
object's tags to the indices of the channels it feeds. Matching is per tag: every ``(key,
value)`` pair's channels are precomputed, so an object costs one or two dict look-ups per tag.

Matching rules (they are part of :data:`SEMANTICS_VERSION`, which enters the taxonomy version):

- an object matches a channel if any of the channel's selectors matches one of its tags;
- ``{key: K, values: [...]}`` matches the listed values of K exactly;
- ``{key: K}`` matches any value of K except ``exclude`` values and ``no``/``none``;
- ``{key: K, other: true}`` matches any value of K (except ``exclude`` values and
  ``no``/``none``) that no other channel of the same measure matches through K;
- a value containing ``;`` that no selector lists verbatim matches through each of its parts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

import numpy as np
import yaml
from osmium.osm import TagList

from s2vec_pipeline.errors import TaxonomyError

Measure = Literal["count", "length_m", "area_m2"]
MEASURES: tuple[str, ...] = get_args(Measure)

#: Bump when the matching rules change: it is hashed into every taxonomy's version.
SEMANTICS_VERSION = 1

#: Values that never match an any-value or ``other`` selector.
NEVER_ANY: frozenset[str] = frozenset({"no", "none"})

DEFAULT_TAXONOMY_RESOURCE = "taxonomy.yaml"

# An osmium TagList with more tags than this is read key by key (one call per taxonomy key)
# instead of tag by tag: a call that builds a Tag costs about as much as two key look-ups.
_ITERATE_MAX_TAGS = 10

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TOP_FIELDS = ("name", "channels")
_CHANNEL_FIELDS = ("name", "measure", "group", "selectors")
_SELECTOR_FIELDS = ("key", "values", "exclude", "other")


@dataclass(frozen=True)
class Channel:
    name: str
    measure: Measure
    group: str


# --------------------------------------------------------------------------- YAML reading


class _Loader(yaml.SafeLoader):
    """Safe YAML loader where only true/false are booleans (``yes``/``no``/``on``/``off`` stay
    strings: they are common OSM values) and duplicate mapping keys are an error."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
            mark = exc.problem_mark
            detail = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
            if exc.context:
                detail += f" ({exc.context}"
                if exc.context_mark is not None:
                    detail += f" started on line {exc.context_mark.line + 1}"
                detail += ")"
        raise TaxonomyError(
            f"taxonomy {source}: YAML syntax error: {detail}. Fix the file's YAML syntax."
        ) from exc


# --------------------------------------------------------------------------- validation


_Err = Callable[[str], NoReturn]


def _str_list(value: Any, what: str, err: _Err) -> list[str]:
    if not isinstance(value, list):
        err(f"{what} must be a list of strings, got {type(value).__name__} {value!r}")
    if not value:
        err(f"{what} is an empty list")
    for item in value:
        if not isinstance(item, str) or not item:
            err(
                f"{what} holds {item!r} ({type(item).__name__}), not a non-empty string; "
                "quote it in the YAML"
            )
    return sorted(set(value))


def _normalize_selector(raw: Any, err: _Err) -> dict[str, Any]:
    if not isinstance(raw, dict):
        err(f"must be a mapping like {{key: K, values: [v1, v2]}}, got {raw!r}")
    unknown = sorted(str(k) for k in raw if k not in _SELECTOR_FIELDS)
    if unknown:
        err(f"unknown field(s) {unknown}; allowed: {list(_SELECTOR_FIELDS)}")
    key = raw.get("key")
    if key is None:
        err("has no 'key'")
    if not isinstance(key, str) or not key.strip():
        err(f"'key' must be a non-empty string, got {key!r}")
    sel: dict[str, Any] = {"key": key}
    other = raw.get("other", False)
    if not isinstance(other, bool):
        err(f"'other' must be true or false, got {other!r}")
    if "values" in raw:
        if other:
            err("'other: true' cannot be combined with 'values'")
        if "exclude" in raw:
            err("'exclude' only applies to selectors without 'values'")
        sel["values"] = _str_list(raw["values"], "'values'", err)
    else:
        if "exclude" in raw:
            sel["exclude"] = _str_list(raw["exclude"], "'exclude'", err)
        if other:
            sel["other"] = True
    return sel


def _normalize(data: Any, source: str) -> dict[str, Any]:
    """Validate parsed YAML and return the canonical taxonomy spec (JSON-compatible)."""

    def fail(msg: str) -> NoReturn:
        raise TaxonomyError(f"taxonomy {source}: {msg}")

    if not isinstance(data, dict):
        fail(
            "the file must be a mapping with 'name' and 'channels', got "
            f"{type(data).__name__}; the file is empty or not a taxonomy"
        )
    unknown = sorted(str(k) for k in data if k not in _TOP_FIELDS)
    if unknown:
        fail(f"unknown top-level field(s) {unknown}; allowed: {list(_TOP_FIELDS)}")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        fail(f"top-level 'name' must be a non-empty string, got {name!r}")
    raw_channels = data.get("channels")
    if raw_channels is None or raw_channels == []:
        fail("no channels at all: 'channels' must be a non-empty list")
    if not isinstance(raw_channels, list):
        fail(f"'channels' must be a list, got {type(raw_channels).__name__}")

    channels: list[dict[str, Any]] = []
    first_index: dict[str, int] = {}
    other_owner: dict[tuple[str, str], str] = {}
    for i, raw in enumerate(raw_channels):
        label = f"channel {i}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            label = f"channel {i} ({raw['name']!r})"

        def err(msg: str, label: str = label) -> NoReturn:
            raise TaxonomyError(f"taxonomy {source}: {label}: {msg}")

        if not isinstance(raw, dict):
            err(f"must be a mapping with {list(_CHANNEL_FIELDS)}, got {raw!r}")
        unknown = sorted(str(k) for k in raw if k not in _CHANNEL_FIELDS)
        if unknown:
            err(f"unknown field(s) {unknown}; allowed: {list(_CHANNEL_FIELDS)}")
        cname = raw.get("name")
        if cname is None:
            err("has no 'name'")
        if not isinstance(cname, str) or not _NAME_RE.match(cname):
            err(f"name {cname!r} is not snake_case (lower-case letters, digits, '_')")
        if cname in first_index:
            err(f"duplicate channel name {cname!r} (also channel {first_index[cname]})")
        first_index[cname] = i
        measure = raw.get("measure")
        if measure not in MEASURES:
            err(f"unknown measure {measure!r}; expected one of {list(MEASURES)}")
        group = raw.get("group")
        if not isinstance(group, str) or not group.strip():
            err(f"'group' must be a non-empty string, got {group!r}")
        raw_selectors = raw.get("selectors")
        if raw_selectors is None or raw_selectors == []:
            err("empty selector list: 'selectors' must list at least one {key: ...}")
        if not isinstance(raw_selectors, list):
            err(f"'selectors' must be a list, got {type(raw_selectors).__name__}")
        selectors: list[dict[str, Any]] = []
        for j, raw_sel in enumerate(raw_selectors):

            def sel_err(msg: str, j: int = j, err: _Err = err) -> NoReturn:
                err(f"selector {j}: {msg}")

            sel = _normalize_selector(raw_sel, sel_err)
            if sel.get("other"):
                owner = other_owner.setdefault((sel["key"], measure), cname)
                if owner != cname:
                    sel_err(
                        f"channel {owner!r} already is the 'other' channel for key "
                        f"{sel['key']!r} and measure {measure!r}"
                    )
            selectors.append(sel)
        channels.append({"name": cname, "measure": measure, "group": group, "selectors": selectors})
    return {"semantics": SEMANTICS_VERSION, "name": name, "channels": channels}


def _canonical_json(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# --------------------------------------------------------------------------- compiled form

_KeyEntry = tuple[dict[str, tuple[int, ...]], tuple[int, ...]]


def _compile(channels: list[dict[str, Any]]) -> dict[str, _KeyEntry]:
    """key -> ({value: channel indices}, channel indices of any value not in the dict)."""
    measures = [c["measure"] for c in channels]
    by_value: dict[str, dict[str, set[int]]] = {}
    any_value: dict[str, list[tuple[int, frozenset[str]]]] = {}
    other: dict[str, list[tuple[int, frozenset[str]]]] = {}
    special: dict[str, set[str]] = {}
    for idx, ch in enumerate(channels):
        for sel in ch["selectors"]:
            key = sel["key"]
            special.setdefault(key, set(NEVER_ANY))
            if "values" in sel:
                for v in sel["values"]:
                    by_value.setdefault(key, {}).setdefault(v, set()).add(idx)
                special[key].update(sel["values"])
            else:
                exclude = frozenset(sel.get("exclude", ()))
                special[key].update(exclude)
                target = other if sel.get("other") else any_value
                target.setdefault(key, []).append((idx, exclude))

    table: dict[str, _KeyEntry] = {}
    for key, values in special.items():

        def result(v: str | None, key: str = key) -> tuple[int, ...]:
            found = set(by_value.get(key, {}).get(v, ())) if v is not None else set()
            if v not in NEVER_ANY:
                found.update(i for i, ex in any_value.get(key, ()) if v not in ex)
                seen = {measures[i] for i in found}
                found.update(
                    i for i, ex in other.get(key, ()) if measures[i] not in seen and v not in ex
                )
            return tuple(sorted(found))

        table[key] = ({v: result(v) for v in sorted(values)}, result(None))
    return table


class Taxonomy:
    """A validated, compiled, immutable taxonomy. Build it with :func:`load_taxonomy`."""

    __slots__ = (
        "name",
        "channels",
        "version",
        "keys",
        "channel_names",
        "_spec",
        "_table",
        "_by_measure",
        "_index",
    )

    name: str
    channels: tuple[Channel, ...]
    version: str
    keys: tuple[str, ...]
    channel_names: tuple[str, ...]

    def __init__(self, spec: Mapping[str, Any]) -> None:
        """``spec`` is the canonical form made by the loader (see :func:`load_taxonomy`)."""
        canonical = _canonical_json(spec)
        spec = json.loads(canonical)  # private deep copy
        channels = tuple(Channel(c["name"], c["measure"], c["group"]) for c in spec["channels"])
        table = _compile(spec["channels"])
        by_measure = {}
        for m in MEASURES:
            arr = np.asarray([i for i, c in enumerate(channels) if c.measure == m], np.int32)
            arr.flags.writeable = False
            by_measure[m] = arr
        setattr_ = object.__setattr__
        setattr_(self, "name", spec["name"])
        setattr_(self, "channels", channels)
        setattr_(self, "channel_names", tuple(c.name for c in channels))
        setattr_(self, "version", hashlib.sha256(canonical.encode()).hexdigest()[:16])
        setattr_(self, "keys", tuple(sorted(table)))
        setattr_(self, "_spec", spec)
        setattr_(self, "_table", table)
        setattr_(self, "_by_measure", by_measure)
        setattr_(self, "_index", {c.name: i for i, c in enumerate(channels)})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Taxonomy is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Taxonomy is immutable (cannot delete {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Taxonomy, (self._spec,))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Taxonomy):
            return NotImplemented
        return self.version == other.version and self._spec == other._spec

    def __hash__(self) -> int:
        return hash(self.version)

    def __len__(self) -> int:
        return len(self.channels)

    def __repr__(self) -> str:
        counts = ", ".join(f"{m}={len(self._by_measure[m])}" for m in MEASURES)
        return f"Taxonomy(name={self.name!r}, version={self.version}, {counts})"

    def index(self, name: str) -> int:
        """The tensor index of the channel called ``name`` (KeyError if there is none)."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"taxonomy {self.name!r} has no channel {name!r}") from None

    def indices(self, measure: Measure) -> np.ndarray:
        """Indices (ascending, read-only np.int32) of the channels with this measure."""
        try:
            return self._by_measure[measure]
        except KeyError:
            raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES}") from None

    def match(self, tags: TagList | Mapping[str, str] | Iterable[Any]) -> tuple[int, ...]:
        """Ascending indices of the channels an object with these tags feeds (all measures).

        ``tags``: an osmium TagList, a mapping key -> value, or an iterable of (key, value)
        pairs / objects with ``.k`` and ``.v``.
        """
        tp = type(tags)
        if tp is dict:
            pairs: Iterable[Any] = tags.items()  # type: ignore[union-attr]
        elif tp is TagList:
            # Every call into pyosmium costs far more than the matching itself, so read the
            # tags with as few calls as possible: one per tag (Tag is a NamedTuple (k, v)) for
            # the usual short tag lists, one per taxonomy key for long ones.
            try:
                data = tags._pyosmium_data  # type: ignore[union-attr]
                n = data.tags_size()
            except AttributeError:  # another pyosmium layout: its public iterator
                pairs = tags
            else:
                if n <= _ITERATE_MAX_TAGS:
                    it = data.tags_begin()
                    nxt = data.tags_next
                    pairs = [nxt(it) for _ in range(n)]
                else:
                    get = data.tags_get_value_by_key
                    pairs = [(k, v) for k in self.keys if (v := get(k, None)) is not None]
        elif isinstance(tags, Mapping):
            pairs = tags.items()
        else:
            pairs = (t if isinstance(t, tuple) else (t.k, t.v) for t in tags)
        table = self._table
        first: tuple[int, ...] = ()
        union: set[int] | None = None
        for k, v in pairs:
            entry = table.get(k)
            if entry is None:
                continue
            found = entry[0].get(v)
            if found is None:
                found = entry[1] if ";" not in v else _match_multi(entry, v)
            if not found:
                continue
            if not first:
                first = found
            elif union is None:
                union = set(first)
                union.update(found)
            else:
                union.update(found)
        if union is not None:
            return tuple(sorted(union))
        return first


def _match_multi(entry: _KeyEntry, value: str) -> tuple[int, ...]:
    by_value, default = entry
    found: set[int] = set()
    for part in value.split(";"):
        part = part.strip()
        if part:
            found.update(by_value.get(part, default))
    return tuple(sorted(found))


# --------------------------------------------------------------------------- loading


def _parse(text: str, source: str) -> Taxonomy:
    return Taxonomy(_normalize(_read_yaml(text, source), source))


@functools.lru_cache(maxsize=1)
def _default_taxonomy() -> Taxonomy:
    resource = resources.files("s2vec_pipeline").joinpath(DEFAULT_TAXONOMY_RESOURCE)
    return _parse(resource.read_text(encoding="utf-8"), str(resource))


def load_taxonomy(path: str | os.PathLike[str] | None = None) -> Taxonomy:
    """Load and validate a taxonomy YAML; ``None`` = the packaged ``taxonomy.yaml`` (cached:
    every call returns the same object). Raises :class:`TaxonomyError` if it is malformed."""
    if path is None:
        return _default_taxonomy()
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaxonomyError(
            f"taxonomy {source}: file not found; give the path of a taxonomy YAML file, or "
            "none to use the packaged taxonomy"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaxonomyError(f"taxonomy {source}: cannot read it as UTF-8 text: {exc}") from exc
    return _parse(text, source)
