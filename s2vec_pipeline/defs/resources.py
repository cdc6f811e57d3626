"""The one resource every asset reads: where tables live and what to build them from."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from s2vec_pipeline.settings import PipelineSettings


class S2VecResource(dg.ConfigurableResource):
    """Storage root, resolution profile, OSM sources and taxonomy of this deployment."""

    root: str = Field(description="Directory (later: object-store URI) holding the Delta tables")
    profile: str = Field(default="city", description="Resolution profile: paper, city, custom:I:P")
    sources: list[str] = Field(description="OSM .osm.pbf extracts to read")
    taxonomy_path: str | None = Field(
        default=None, description="Feature taxonomy YAML (None: packaged)"
    )
    changes_dir: str | None = Field(
        default=None,
        description="Folder of OSM change files (.osc/.osc.gz) the nightly refresh applies",
    )

    @classmethod
    def from_settings(cls, settings: PipelineSettings) -> S2VecResource:
        return cls(
            root=settings.root,
            profile=settings.profile_name,
            sources=list(settings.sources),
            taxonomy_path=settings.taxonomy_path,
            changes_dir=settings.changes_dir,
        )

    def settings(self) -> PipelineSettings:
        return PipelineSettings(
            root=self.root,
            profile_name=self.profile,
            sources=tuple(self.sources),
            taxonomy_path=self.taxonomy_path,
            changes_dir=self.changes_dir,
        )
