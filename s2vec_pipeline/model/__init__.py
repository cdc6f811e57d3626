"""The S2Vec model: MAE (``mae``), the training config (``config``), ``raster_tiles`` at one
snapshot and the train/val split (``data``), its tiles decoded once (``tile_cache``) and
batched by index (``datamodule``), training with versioned model directories (``train``, with
``callbacks``, ``checkpoint``, ``quiet`` and ``loss_curve``), the finished models
(``registry``), batch inference into embedding tables (``embed``) and fake tiles for tests
and benchmarks (``synthetic``).

Names are imported lazily so that ``import s2vec_pipeline.model`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "S2VecMAE": "mae",
    "RasterTileDataModule": "datamodule",
    "stream_raster_tiles": "data",
    "read_raster_partition": "data",
    "raster_partition_versions": "data",
    "raster_snapshot": "data",
    "raster_partition_keys": "data",
    "synthetic_raster_tiles": "synthetic",
    "TrainConfig": "config",
    "InvalidTrainConfigError": "config",
    "ModelCard": "registry",
    "InvalidModelCardError": "registry",
    "ModelNotFoundError": "registry",
    "IncompatibleModelError": "registry",
    "model_version": "train",
    "train_model": "train",
    "load_model": "registry",
    "list_models": "registry",
    "check_compatible": "registry",
    "embed_partition": "embed",
    "encode_batches": "embed",
    "resolve_device": "embed",
    "iter_embeddings": "embed",
    "write_embeddings": "embed",
    "embedding_contract": "embed",
    "CELL_TABLE": "embed",
    "IMAGE_TABLE": "embed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
