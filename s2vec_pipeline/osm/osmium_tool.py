"""The osmium-tool command (``osmium``), which cuts large sources into group files: the one
place that looks for it."""

from __future__ import annotations

import shutil

from s2vec_pipeline.errors import S2VecError

OSMIUM_TOOL = "osmium"


class OsmiumToolMissingError(S2VecError):
    """osmium-tool is needed to split a large source."""


def find_osmium_tool() -> str | None:
    """Path of the ``osmium`` command on ``PATH``, or None."""
    return shutil.which(OSMIUM_TOOL)


def osmium_tool(why: str = "large sources are split with it") -> str:
    """Path of the ``osmium`` command, or an error saying why it is needed and how to install
    it."""
    path = find_osmium_tool()
    if path is None:
        raise OsmiumToolMissingError(
            f"osmium-tool is not installed, and {why}: install it with "
            f"`apt-get install osmium-tool` (or `conda install osmium-tool`)"
        )
    return path
