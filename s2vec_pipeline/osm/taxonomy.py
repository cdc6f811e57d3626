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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import yaml
from osmium.osm import TagList
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

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
# The YAML schema as pydantic models (strict: no coercion, unknown fields refused). Their
# errors are turned into one message naming the entry (channel i ('name'), selector j) and what
# to fix; :meth:`_TaxonomySpec.canonical` gives the spec whose JSON hash is the version.


def _non_empty(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _not_null(value: Any, info: ValidationInfo) -> Any:
    # an explicit `values:` / `exclude:` with nothing after it is a mistake, not "absent"
    if value is None:
        raise ValueError(f"'{info.field_name}' must be a list of strings, got null")
    return value


class _Selector(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    values: list[str] | None = Field(default=None, min_length=1)
    exclude: list[str] | None = Field(default=None, min_length=1)
    other: bool = False

    _key = field_validator("key")(lambda v: _non_empty(v, "'key'"))
    _lists_not_null = field_validator("values", "exclude", mode="before")(_not_null)

    @field_validator("values", "exclude")
    @classmethod
    def _strings(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for item in value:
            if not item:
                raise ValueError(
                    f"'{info.field_name}' holds {item!r} (str), not a non-empty string; "
                    "quote it in the YAML"
                )
        return value

    @model_validator(mode="after")
    def _combination(self) -> _Selector:
        if self.values is not None and self.other:
            raise ValueError("'other: true' cannot be combined with 'values'")
        if self.values is not None and self.exclude is not None:
            raise ValueError("'exclude' only applies to selectors without 'values'")
        return self

    def canonical(self) -> dict[str, Any]:
        sel: dict[str, Any] = {"key": self.key}
        if self.values is not None:
            sel["values"] = sorted(set(self.values))
        else:
            if self.exclude is not None:
                sel["exclude"] = sorted(set(self.exclude))
            if self.other:
                sel["other"] = True
        return sel


class _ChannelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=_NAME_RE.pattern)
    measure: Measure
    group: str
    selectors: list[_Selector] = Field(min_length=1)

    _group = field_validator("group")(lambda v: _non_empty(v, "'group'"))

    def canonical(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measure": self.measure,
            "group": self.group,
            "selectors": [s.canonical() for s in self.selectors],
        }


class _TaxonomySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    channels: list[_ChannelSpec] = Field(min_length=1)

    _name = field_validator("name")(lambda v: _non_empty(v, "top-level 'name'"))

    @model_validator(mode="after")
    def _unique(self) -> _TaxonomySpec:
        first_index: dict[str, int] = {}
        other_owner: dict[tuple[str, str], str] = {}
        for i, ch in enumerate(self.channels):
            label = f"channel {i} ({ch.name!r})"
            if ch.name in first_index:
                raise ValueError(
                    f"{label}: duplicate channel name {ch.name!r} (also channel "
                    f"{first_index[ch.name]})"
                )
            first_index[ch.name] = i
            for j, sel in enumerate(ch.selectors):
                if not sel.other:
                    continue
                owner = other_owner.setdefault((sel.key, ch.measure), ch.name)
                if owner != ch.name:
                    raise ValueError(
                        f"{label}: selector {j}: channel {owner!r} already is the 'other' "
                        f"channel for key {sel.key!r} and measure {ch.measure!r}"
                    )
        return self

    def canonical(self) -> dict[str, Any]:
        return {
            "semantics": SEMANTICS_VERSION,
            "name": self.name,
            "channels": [c.canonical() for c in self.channels],
        }


_MISSING = {
    "name": "has no 'name'",
    "key": "has no 'key'",
    "measure": f"unknown measure None; expected one of {list(MEASURES)}",
    "group": "'group' must be a non-empty string, got None",
    "selectors": "empty selector list: 'selectors' must list at least one {key: ...}",
    "channels": "no channels at all: 'channels' must be a non-empty list",
}


def _where(loc: tuple[int | str, ...], data: Any) -> str:
    """'channel 3 ('poi_x'): selector 0: ' for an error location inside a channel."""
    if len(loc) < 2 or loc[0] != "channels" or not isinstance(loc[1], int):
        return ""
    i = loc[1]
    raw = data["channels"][i]
    label = f"channel {i}"
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        label = f"channel {i} ({raw['name']!r})"
    if len(loc) >= 4 and loc[2] == "selectors" and isinstance(loc[3], int):
        label += f": selector {loc[3]}"
    return label + ": "


def _explain(errors: list[ErrorDetails], data: Any) -> str:
    """One message for the first problem, in file order, worded as the schema's docs."""

    def order(e: ErrorDetails) -> tuple[int, int, int]:
        loc = e["loc"]
        chan = loc[1] if len(loc) > 1 and loc[0] == "channels" and isinstance(loc[1], int) else -1
        sel = loc[3] if len(loc) > 3 and isinstance(loc[3], int) else -1
        return chan, sel, 0 if e["type"] == "extra_forbidden" else 1

    err = min(errors, key=order)
    loc, typ, value = err["loc"], err["type"], err.get("input")
    where = _where(loc, data)
    field = next((x for x in reversed(loc) if isinstance(x, str)), "")
    if typ == "extra_forbidden":
        extra = sorted(
            str(e["loc"][-1]) for e in errors if e["type"] == typ and e["loc"][:-1] == loc[:-1]
        )
        if not where:
            return f"unknown top-level field(s) {extra}; allowed: {list(_TOP_FIELDS)}"
        allowed = _SELECTOR_FIELDS if "selectors" in loc[:-1] else _CHANNEL_FIELDS
        return f"{where}unknown field(s) {extra}; allowed: {list(allowed)}"
    if typ == "missing":
        return where + _MISSING.get(str(field), f"has no {field!r}")
    if typ in ("model_type", "dict_type"):
        if not loc:
            return (
                "the file must be a mapping with 'name' and 'channels', got "
                f"{type(value).__name__}; the file is empty or not a taxonomy"
            )
        if loc[-2:-1] == ("selectors",):
            return f"{where}must be a mapping like {{key: K, values: [v1, v2]}}, got {value!r}"
        return f"{where}must be a mapping with {list(_CHANNEL_FIELDS)}, got {value!r}"
    if typ == "string_pattern_mismatch":
        return f"{where}name {value!r} is not snake_case (lower-case letters, digits, '_')"
    if typ == "literal_error":
        return f"{where}unknown measure {value!r}; expected one of {list(MEASURES)}"
    if typ == "too_short":
        if field in _MISSING and field in ("selectors", "channels"):
            return where + _MISSING[str(field)]
        return f"{where}{field!r} is an empty list"
    if typ == "list_type":
        kind = " of strings" if field in ("values", "exclude") else ""
        return f"{where}{field!r} must be a list{kind}, got {type(value).__name__} {value!r}"
    if typ == "string_type":
        if isinstance(loc[-1], int):  # an item of values / exclude
            return (
                f"{where}{field!r} holds {value!r} ({type(value).__name__}), not a non-empty "
                "string; quote it in the YAML"
            )
        if field == "name" and where:
            return f"{where}name {value!r} is not snake_case (lower-case letters, digits, '_')"
        return f"{where}{field!r} must be a non-empty string, got {value!r}"
    if typ == "bool_type":
        return f"{where}{field!r} must be true or false, got {value!r}"
    if typ == "value_error":
        return where + str(err.get("ctx", {}).get("error", err["msg"]))
    return f"{where}{field!r}: {err['msg']}"


def _normalize(data: Any, source: str) -> dict[str, Any]:
    """Validate parsed YAML and return the canonical taxonomy spec (JSON-compatible)."""
    if isinstance(data, dict) and "name" not in data:
        data = {"name": Path(source).stem, **data}
    try:
        spec = _TaxonomySpec.model_validate(data)
    except ValidationError as exc:
        raise TaxonomyError(f"taxonomy {source}: {_explain(exc.errors(), data)}") from None
    return spec.canonical()


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
    resource = resources.files("s2vec_pipeline.osm").joinpath(DEFAULT_TAXONOMY_RESOURCE)
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
