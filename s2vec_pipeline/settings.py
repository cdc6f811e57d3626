"""Pipeline settings: storage root, resolution profile, OSM sources, taxonomy.

One plain object used by the CLI, the Dagster resource and the tests. Embedded defaults make
a fresh clone work: tables under ``./s2vec_data``, the ``city`` profile and the bundled
Helsinki and Monaco extracts. Environment variables override them for ``dagster dev``.

This module is the only one that reads the environment for configuration: every ``S2VEC_*``
variable (and ``DAGSTER_HOME``, which decides where the CLI records its runs) is named and read
below, and the rest of the package (CLI defaults, schedules, executor, local cache) asks here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from s2vec_pipeline.cells import s2
from s2vec_pipeline.cells.profiles import PARTITION_LEVEL, ResolutionProfile, get_profile
from s2vec_pipeline.errors import InvalidCellError, S2VecError
from s2vec_pipeline.osm.taxonomy import Taxonomy, load_taxonomy
from s2vec_pipeline.storage.fs import check_object_root, is_object_store, normalize_root

# -- the environment: every variable the package reads, and the one place that reads it --
ENV_ROOT = "S2VEC_ROOT"
ENV_SOURCES = "S2VEC_SOURCES"  # os.pathsep-separated list of .osm.pbf paths
ENV_PROFILE = "S2VEC_PROFILE"
ENV_TAXONOMY = "S2VEC_TAXONOMY"
ENV_CHANGES = "S2VEC_CHANGES"  # folder of OSM change files (.osc / .osc.gz) for the refresh
ENV_WORKERS = "S2VEC_WORKERS"  # worker processes for partitioned extraction
ENV_CACHE_DIR = "S2VEC_CACHE_DIR"  # local working files of an object-store root
ENV_EXECUTOR = "S2VEC_EXECUTOR"  # "k8s": every step in its own pod (service/k8s.py)
ENV_REFRESH_CRON = "S2VEC_REFRESH_CRON"  # the schedules' cron expressions (UTC)
ENV_TRAIN_CRON = "S2VEC_TRAIN_CRON"
ENV_MAINTAIN_CRON = "S2VEC_MAINTAIN_CRON"
ENV_DAGSTER_HOME = "DAGSTER_HOME"  # Dagster's own: the instance the CLI records runs in
SCHEDULE_CRON_VARIABLES = (ENV_REFRESH_CRON, ENV_TRAIN_CRON, ENV_MAINTAIN_CRON)
SPLIT_CACHE_DIR = "_split"  # under a local root: large sources cut once per version
DEFAULT_ROOT = "s2vec_data"
DEFAULT_PROFILE = "city"


def _env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of a variable, None when it is unset or blank (a blank one is not a setting)."""
    value = (os.environ if environ is None else environ).get(name, "")
    return value if value.strip() else None


def default_root(environ: Mapping[str, str] | None = None) -> str:
    """The storage root when none is given: ``$S2VEC_ROOT``, else ``./s2vec_data`` (as given:
    callers normalise it)."""
    return _env(ENV_ROOT, environ) or DEFAULT_ROOT


def default_workers() -> int:
    """Worker processes (partitions at once, extraction workers): ``$S2VEC_WORKERS``, else one
    per core."""
    value = _env(ENV_WORKERS)
    return parse_workers(value) if value else (os.cpu_count() or 1)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Base of the local working files of object-store roots: ``$S2VEC_CACHE_DIR``, else
    ``~/.cache/s2vec``."""
    value = _env(ENV_CACHE_DIR, environ)
    return Path(value) if value else Path.home() / ".cache" / "s2vec"


def executor_name(environ: Mapping[str, str] | None = None) -> str:
    """``$S2VEC_EXECUTOR`` in lower case, "" when unset (``service.k8s`` says which exist)."""
    return (_env(ENV_EXECUTOR, environ) or "").strip().lower()


def schedule_cron(variable: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """A schedule's cron expression: ``$variable`` (one of ``SCHEDULE_CRON_VARIABLES``), else
    ``default``."""
    if variable not in SCHEDULE_CRON_VARIABLES:
        raise ValueError(f"{variable} is not a schedule's variable: {SCHEDULE_CRON_VARIABLES}")
    return _env(variable, environ) or default


def dagster_home(environ: Mapping[str, str] | None = None) -> str | None:
    """``$DAGSTER_HOME`` when set: the Dagster instance runs are recorded in (else the CLI keeps
    one under the root)."""
    return _env(ENV_DAGSTER_HOME, environ)


def parse_workers(value: object, what: str = ENV_WORKERS) -> int:
    """A worker count >= 1, or an error naming the bad value."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise S2VecError(f"{what} must be a whole number of worker processes >= 1, got {value!r}")
    return n


def bundled_source(name: str) -> Path:
    """Path of a bundled extract: ``helsinki`` or ``monaco`` (© OSM contributors, ODbL)."""
    return Path(str(resources.files("s2vec_pipeline") / "data" / "osm" / f"{name}.osm.pbf"))


def bundled_sources() -> list[str]:
    return [str(bundled_source("helsinki")), str(bundled_source("monaco"))]


class PipelineSettings(pydantic.BaseModel):
    """Where tables live and what to build them from: the one definition of these settings.

    The Dagster resource (``defs/resources.py``) *is* a ``PipelineSettings`` (it inherits these
    fields), so the launchpad, the CLI and the tests share one set of names, defaults and
    descriptions.
    """

    model_config = pydantic.ConfigDict(frozen=True)

    root: str = pydantic.Field(
        default=DEFAULT_ROOT,
        description="Storage root: the folder holding the Delta tables, or an object-store URI "
        "(s3://bucket/prefix, gs://…, az://…) configured by the provider's environment",
    )
    profile_name: str = pydantic.Field(
        default=DEFAULT_PROFILE,
        description="Resolution profile: paper (images level 8, pixels 12), city (13, 17) or "
        "custom:IMAGE:PIXEL",
    )
    sources: list[str] = pydantic.Field(
        default_factory=bundled_sources,
        description="OSM .osm.pbf extracts to read (default: the bundled Helsinki and Monaco)",
    )
    taxonomy_path: str | None = pydantic.Field(
        default=None, description="Feature taxonomy YAML (default: the packaged taxonomy)"
    )
    changes_dir: str | None = pydantic.Field(
        default=None,
        description="Folder of OSM change files (.osc / .osc.gz) the nightly refresh applies",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PipelineSettings:
        """The settings ``dagster dev`` and the deployments configure: ``$S2VEC_ROOT``,
        ``$S2VEC_PROFILE``, ``$S2VEC_SOURCES``, ``$S2VEC_TAXONOMY``, ``$S2VEC_CHANGES``."""
        sources = _env(ENV_SOURCES, environ)
        return cls(
            root=normalize_root(default_root(environ)),
            profile_name=_env(ENV_PROFILE, environ) or DEFAULT_PROFILE,
            sources=[s for s in sources.split(os.pathsep) if s] if sources else bundled_sources(),
            taxonomy_path=_env(ENV_TAXONOMY, environ),
            changes_dir=_env(ENV_CHANGES, environ),
        )

    def settings_dict(self) -> dict[str, Any]:
        """The fields alone (what a Dagster run config or a worker process needs)."""
        return {name: getattr(self, name) for name in PipelineSettings.model_fields}

    @cached_property
    def profile(self) -> ResolutionProfile:
        return get_profile(self.profile_name)

    @cached_property
    def taxonomy(self) -> Taxonomy:
        return load_taxonomy(self.taxonomy_path)

    def contract(self, table: str, **extra: Any) -> dict[str, Any]:
        """What a table written under these settings must agree on with earlier writes."""
        return {
            "table": table,
            "profile": self.profile.name,
            "image_level": self.profile.image_level,
            "pixel_level": self.profile.pixel_level,
            "side": self.profile.side,
            "taxonomy_version": self.taxonomy.version,
            **extra,
        }

    @property
    def split_cache_dir(self) -> Path:
        """Local folder where large sources are cut into group files once per source version
        (``osm.split.cached_split``): ``<root>/_split``, or for an object-store root (osmium-tool
        writes local files) the root's local cache (``storage.local_cache``)."""
        from s2vec_pipeline.storage.fs import local_cache

        return local_cache(self.root, SPLIT_CACHE_DIR)


def parse_partition_tokens(tokens: Sequence[str]) -> list[str]:
    """Validate user-given level-6 tokens; a finer cell is answered with its level-6 parent."""
    out: list[str] = []
    for raw in tokens:
        tok = raw.strip().lower()
        if not tok:
            continue
        ids = s2.from_token(np.array([tok]))  # raises InvalidCellError naming the token
        level = int(s2.cell_level(ids)[0])
        if level != PARTITION_LEVEL:
            hint = (
                f"its level-6 parent is {s2.to_token(s2.parent(ids, PARTITION_LEVEL))[0]}"
                if level > PARTITION_LEVEL
                else "pick one of its level-6 children"
            )
            raise InvalidCellError(
                f"cell {raw!r} is at S2 level {level}; partitions are level-6 cells ({hint})"
            )
        out.append(tok)
    return sorted(set(out))


def check_root_writable(root: str) -> None:
    """Fail before any run when a storage root cannot be created or written (a run would
    otherwise fail half-way through its first write): a local folder, or an object store's
    bucket (missing bucket, wrong credentials or endpoint)."""
    import tempfile

    from s2vec_pipeline.errors import RootNotWritableError

    if is_object_store(root):
        check_object_root(root)
        return
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".s2vec-write-check-"):
            pass
    except OSError as e:
        raise RootNotWritableError(
            f"storage root {root} is not writable ({e.strerror or e}): pass a writable --root "
            f"(or S2VEC_ROOT) or fix its permissions"
        ) from None
