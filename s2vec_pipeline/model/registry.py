"""The model registry: finished models under ``<root>/models/<model_version>/``.

``list_models`` (the finished versions, oldest first), ``load_model`` (weights and card, with
compatibility checks against a table's contract), ``ModelCard`` (everything about one model,
``model_card.json``, read and written through pydantic). A model is finished when its card
exists: training writes it last. No torch import at module level: status, evaluation and the
CLI list models without it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from s2vec_pipeline.errors import S2VecError, validation_problem
from s2vec_pipeline.storage import delta_store, fs

if TYPE_CHECKING:
    from s2vec_pipeline.model.mae import S2VecMAE

RASTER_TABLE = "raster_tiles"
MODELS_DIR = "models"
#: A model is finished when its card exists: training writes it last.
CARD_FILE = "model_card.json"
#: Bump when the architecture or training code changes what a config produces.
#: 2: tiles stream in a content-determined order from one snapshot; one partition hash.
MODEL_CODE_VERSION = "s2vec-mae-2"
_VERSION_RE = re.compile(r"^[0-9a-f]{8,64}$")


class ModelNotFoundError(S2VecError):
    """No finished model of that version under the root."""


class IncompatibleModelError(S2VecError):
    """A model was trained on tiles of another taxonomy, channel set or image side."""


# --- the model card --------------------------------------------------------------------


class InvalidModelCardError(S2VecError):
    """A ``model_card.json`` that is not a card this code wrote: damaged, or another file."""


class ModelCard(BaseModel):
    """Everything about one trained model; saved as ``model_card.json`` (``save``, ``load``).

    Fields this code does not know (a card of a later version) are ignored when read. Two
    cards are equal when everything saved is: ``directory`` is where this one was read from.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    model_version: str
    config: dict[str, Any]
    profile: str | None
    image_level: int | None
    pixel_level: int | None
    side: int
    taxonomy_version: str
    channels: list[str]
    partitions: dict[str, str]  # training partition -> its data version at the snapshot
    normalization: dict[str, list[float]]
    n_train: int
    n_val: int
    train_loss: float | None
    val_loss: float | None
    loss_history: dict[str, list]
    hardware: dict[str, Any]
    duration_s: float
    images_seen: int
    images_per_s: float
    #: epochs trained (the last one possibly cut short by max_steps)
    epochs_completed: int
    steps: int
    resumed_from: dict[str, int] | None
    created: str
    #: the Delta version of raster_tiles the model was trained on (its snapshot)
    raster_tiles_version: int | None = None
    #: training processes (DDP ranks); the batch per step is world_size × batch_size
    world_size: int = 1
    code_version: str = MODEL_CODE_VERSION
    directory: str = Field(default="", exclude=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelCard):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def to_json(self) -> str:
        """The card as written to ``model_card.json`` (sorted keys, indented)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``model_card.json`` into ``directory`` (whole or not at all)."""
        fs.write_text(fs.join(directory, CARD_FILE), self.to_json())

    @classmethod
    def untrained(cls, contract: dict[str, Any], config: dict[str, Any]) -> ModelCard:
        """A card for a model that was never trained, fitting a raster table's ``contract``:
        what ``load_model`` would return for it (benchmarks embed with such models)."""
        return cls(
            model_version="0" * 16,
            config=config,
            profile=contract["profile"],
            image_level=contract["image_level"],
            pixel_level=contract["pixel_level"],
            side=contract["side"],
            taxonomy_version=contract["taxonomy_version"],
            channels=contract["channels"],
            partitions={},
            normalization={},
            n_train=0,
            n_val=0,
            train_loss=None,
            val_loss=None,
            loss_history={},
            hardware={},
            duration_s=0.0,
            images_seen=0,
            images_per_s=0.0,
            epochs_completed=0,
            steps=0,
            resumed_from=None,
            created="",
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ModelCard:
        """The card in ``directory``; :class:`InvalidModelCardError` (one line: which file,
        what is wrong, what to do) when it is damaged or not a model card."""
        location = fs.join(directory, CARD_FILE)
        raw = fs.read_bytes(location)
        if raw is None:
            raise FileNotFoundError(f"no {CARD_FILE} in {directory}")
        try:
            card = cls.model_validate_json(raw)
        except ValidationError as e:
            raise InvalidModelCardError(
                f"{location} is not a readable model card ({validation_problem(e)}): it is damaged "
                f"or was not written by s2vec. Remove {directory} and train again (s2vec "
                "materialize --stages train)"
            ) from None
        name = os.fspath(directory).rstrip("/").rsplit("/", 1)[-1]
        if _VERSION_RE.match(name) and card.model_version != name:
            raise InvalidModelCardError(
                f"{location} describes model {card.model_version}, not {name}: it was copied "
                f"from another model. Remove {directory} and train again (s2vec materialize "
                "--stages train)"
            )
        card.directory = str(directory)
        return card

    @property
    def checkpoint(self) -> Path | str:
        """The weights file: a local path, or a URI on an object-store root."""
        location = fs.join(self.directory, "model.ckpt")
        return location if fs.is_object_store(location) else Path(location)


def check_compatible(card: ModelCard, contract: dict[str, Any], table: str = RASTER_TABLE) -> None:
    """Refuse a model trained on tiles of another taxonomy, channel set or side."""
    problems = []
    if contract.get("taxonomy_version") != card.taxonomy_version:
        problems.append(
            f"taxonomy version {contract.get('taxonomy_version')!r} (model: "
            f"{card.taxonomy_version!r})"
        )
    channels = list(contract.get("channels", []))
    if len(channels) != len(card.channels):
        problems.append(f"{len(channels)} channels (model: {len(card.channels)})")
    elif channels != card.channels:
        problems.append("channels in another order or with other names than the model's")
    if contract.get("side") != card.side:
        problems.append(f"image side {contract.get('side')} (model: {card.side})")
    if problems:
        raise IncompatibleModelError(
            f"model {card.model_version} does not fit the {table} table: it has "
            + "; ".join(problems)
            + ". Train a model on this table (s2vec materialize --stages train) or use the root "
            "it was trained on."
        )


def models_dir(root: str | os.PathLike) -> str:
    """``<root>/models`` (a local path or an object-store URI)."""
    return fs.join(root, MODELS_DIR)


def list_models(root: str | os.PathLike) -> list[str]:
    """Finished model versions under ``root`` (those with a model card), oldest first."""
    cards = [
        e
        for e in fs.list_files(models_dir(root))
        if e.relative.count("/") == 1
        and e.relative.endswith(f"/{CARD_FILE}")
        and not e.relative.startswith(".")  # a training's work folder
    ]
    return [e.relative.split("/")[0] for e in sorted(cards, key=lambda e: e.mtime)]


def check_model_exists(root: str | os.PathLike, version: str) -> str:
    """The finished model's folder; :class:`ModelNotFoundError` naming the models there (and
    a partial training of ``version``) when there is none."""
    final = fs.join(models_dir(root), version)
    card_file = fs.join(final, CARD_FILE)
    if not _VERSION_RE.match(version) or not fs.is_file(card_file):
        available = list_models(root)
        hint = f"available: {', '.join(available)}" if available else "none trained yet"
        partial = fs.local_cache(root, MODELS_DIR, f".{version}.partial").exists()
        raise ModelNotFoundError(
            f"no finished model {version!r} under {models_dir(root)} ({hint})"
            + (
                "; a partial training of it exists: rerun s2vec materialize --stages train "
                "to resume it"
                if partial
                else ". Train one first: s2vec materialize --stages train"
            )
        )
    return final


def load_model(
    root: str | os.PathLike, version: str, table: str | None = RASTER_TABLE
) -> tuple[S2VecMAE, ModelCard]:
    """The trained model (eval mode, on CPU: ``embed`` moves it to its device) and its card.

    With ``table`` (default ``raster_tiles``), refuse a model that does not fit that table's
    contract (taxonomy version, channels, side) when the table exists.
    """
    final = check_model_exists(root, version)
    card = ModelCard.load(final)
    if table is not None:
        contract = delta_store.table_contract(root, table)
        if contract is not None:
            check_compatible(card, contract, table)
    from s2vec_pipeline.model.mae import S2VecMAE

    with fs.local_copy(fs.join(final, "model.ckpt")) as checkpoint:
        model = S2VecMAE.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    model.eval()
    return model, card
