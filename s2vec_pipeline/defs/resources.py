"""The one resource every asset reads: the pipeline settings, configurable at launch."""

from __future__ import annotations

import dagster as dg

from s2vec_pipeline.settings import PipelineSettings


class S2VecResource(dg.ConfigurableResource, PipelineSettings):
    """Storage root, resolution profile, OSM sources and taxonomy of this deployment.

    A run launched by s2vec materialize carries these settings in its run config, so
    re-executing it from the UI reads and writes the same root.
    """

    # The fields are PipelineSettings' own: defined once, in settings.py.

    @classmethod
    def from_settings(cls, settings: PipelineSettings) -> S2VecResource:
        return cls(**settings.settings_dict())

    def settings(self) -> PipelineSettings:
        """Plain settings (no Dagster), for the pure modules and worker processes."""
        return PipelineSettings(**self.settings_dict())


def resource_run_config(settings: PipelineSettings) -> dict:
    """The ``resources`` section of a run config that sets every field of the resource."""
    return {"s2vec": {"config": settings.settings_dict()}}
