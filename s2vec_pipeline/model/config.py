"""The one training configuration: a pydantic model used by the CLI, the Dagster launchpad
(``train_model`` job, ``mae_model`` asset) and the trainer.

Every entry point builds a :class:`TrainConfig` before a run starts, so a bad value (batch size
0, a NaN learning rate, an embedding width the heads do not divide) is refused with one line
(:class:`InvalidTrainConfigError`, exit 2 in the CLI) and nothing is written. No torch import
here: the CLI and the Dagster code location validate without loading it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from s2vec_pipeline.errors import S2VecError


class InvalidTrainConfigError(S2VecError, ValueError):
    """A training setting is out of range or inconsistent with another.

    ``problems``: (field or "", what is wrong) pairs; ``describe`` names the fields as the
    caller's user knows them (``--batch-size`` in the CLI).
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(self.describe())

    def describe(self, label: Callable[[str], str] = str) -> str:
        parts = [f"{label(f)}: {msg}" if f else msg for f, msg in self.problems]
        return "training settings: " + "; ".join(parts)


def _problems(e: ValidationError) -> list[tuple[str, str]]:
    """(field, message) per error of pydantic's, without its URLs."""
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or not where else f" (got {value!r})"
        out.append((where, f"{msg[:1].lower()}{msg[1:]}{shown}"))
    return out


class TrainConfig(BaseModel):
    """Training settings. Fields in ``RUNTIME_FIELDS`` do not enter the model version
    (except through the resolved number of training processes, see ``world_size``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    epochs: int = Field(
        20,
        ge=1,
        description="Training epochs (launchpad default: the profile's; city 20, paper 10)",
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Images per batch and device (launchpad default: the profile's; city 32, "
        "paper 256)",
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, cosine schedule)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the steps with a linear learning-rate warm-up"
    )
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of initialisation, split and masks")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of images held out for validation (by token hash)"
    )
    mask_ratio: float = Field(
        0.75, ge=0, lt=1, description="Share of pixels masked (S2Vec paper: 0.75)"
    )
    patch_size: int = Field(1, ge=1, description="Pixels per token side (1: a token a pixel)")
    embed_dim: int = Field(256, ge=4, description="Encoder width = embedding size")
    depth: int = Field(6, ge=1, description="Encoder transformer blocks")
    num_heads: int = Field(8, ge=1, description="Encoder attention heads")
    decoder_embed_dim: int = Field(128, ge=4, description="Decoder width")
    decoder_depth: int = Field(2, ge=1, description="Decoder transformer blocks")
    decoder_num_heads: int = Field(4, ge=1, description="Decoder attention heads")
    mlp_ratio: float = Field(4.0, gt=0, description="Transformer MLP width / model width")
    # No effect since the indexed tile cache (each epoch is one seeded permutation); kept so
    # that model versions stay what they were.
    shuffle_buffer: int = Field(2048, ge=0)
    # Levers of docs/quality.md; at their defaults they stay out of the model version.
    augment: bool = Field(
        False,
        description="Train on a random one of the 8 rotations/reflections of each image "
        "(docs/quality.md: no measurable effect on the bundled extracts)",
    )
    empty_pixel_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Loss weight of masked pixels with no data, in [0, 1] (1: plain MSE)",
    )
    input_norm: Literal["channel", "global"] = Field(
        "channel",
        description="Input normalization of log1p values: channel (each channel standardized by "
        "its own statistics) or global (one mean and std for all channels)",
    )
    tile_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Values of the decoded tile cache: float32 (exact) or float16 (half the "
        "bytes per batch, 11 significant bits: a different model)",
    )
    held_out_channels: tuple[str, ...] = Field(
        (), description="Channels zeroed in the model's input (to probe them as labels)"
    )
    # runtime only
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (spawned)")
    devices: int | Literal["auto"] = Field(
        "auto",
        description="Devices to train on: GPUs with DDP (ddp_spawn, which works inside a step), "
        "or CPU processes without a GPU; auto: every GPU, one CPU process without",
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = Field(
        "auto", description="Where to train: auto (the GPU when there is one), cpu, gpu, cuda"
    )
    progress_bar: bool = False
    pin_memory: bool | None = Field(
        None, description="Page-locked host batches (empty: when training on CUDA)"
    )
    tiles_on_device: bool = Field(
        False,
        description="Copy the decoded tiles to the training device once and gather batches "
        "there (when they fit in its memory); the loader then moves only indices",
    )
    log_every_n_steps: int | None = Field(
        None, ge=1, description="Steps between logged losses (empty: ~4 per epoch, at most 50)"
    )

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
        "num_workers",
        "devices",
        "accelerator",
        "progress_bar",
        "pin_memory",
        "tiles_on_device",
        "log_every_n_steps",
    )

    #: Fields added after models were trained: left out of the version at these values, so
    #: earlier models keep their versions.
    OPTIONAL_FIELDS: ClassVar[dict[str, Any]] = {
        "augment": False,
        "empty_pixel_weight": 1.0,
        "input_norm": "channel",
        "held_out_channels": (),
        "tile_dtype": "float32",
    }
    INPUT_NORMS: ClassVar[tuple[str, ...]] = ("channel", "global")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise InvalidTrainConfigError(_problems(e)) from None

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v != -1 and v < 1:
            raise ValueError("must be 'auto', -1 or at least 1")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> TrainConfig:
        # What S2VecMAE's blocks and sin-cos positions need, checked before any run.
        for width, heads in (
            ("embed_dim", "num_heads"),
            ("decoder_embed_dim", "decoder_num_heads"),
        ):
            w, h = getattr(self, width), getattr(self, heads)
            if w % h:
                raise ValueError(f"{width} {w} must be divisible by {heads} {h}")
            if w % 4:
                raise ValueError(f"{width} {w} must be divisible by 4 (2-D sin-cos positions)")
        return self

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> TrainConfig:
        """Defaults per resolution profile; ``overrides`` replace any field (None: default)."""
        defaults: dict[str, Any] = {
            # A city extract gives a few hundred 16×16 images: small batches, more epochs.
            "city": {"epochs": 20, "batch_size": 32},
            # Paper-scale areas give many more images.
            "paper": {"epochs": 10, "batch_size": 256},
        }.get(profile, {})
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**defaults, **given})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, validated like a new config."""
        return TrainConfig(**{**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-shaped (the held-out channels as a list)."""
        return {**self.model_dump(), "held_out_channels": list(self.held_out_channels)}

    def version_dict(self) -> dict[str, Any]:
        d = self.as_dict()
        return {
            k: v
            for k, v in d.items()
            if k not in self.RUNTIME_FIELDS
            and not (k in self.OPTIONAL_FIELDS and v == self.OPTIONAL_FIELDS[k])
            and not (k == "held_out_channels" and not v)
        }

    def check_raster(self, contract: dict[str, Any]) -> None:
        """What can be checked once the ``raster_tiles`` table is known: the patch size must
        divide the tiles' side, and the held-out channels must be among its channels."""
        side, channels = int(contract["side"]), list(contract["channels"])
        if side % self.patch_size:
            raise InvalidTrainConfigError(
                [
                    (
                        "patch_size",
                        f"{self.patch_size} must divide the image side {side} of raster_tiles",
                    )
                ]
            )
        unknown = [c for c in self.held_out_channels if c not in channels]
        if unknown:
            raise InvalidTrainConfigError(
                [
                    (
                        "held_out_channels",
                        f"{', '.join(unknown)} not among the raster channels "
                        f"({', '.join(channels)})",
                    )
                ]
            )

    def uses_cuda(self) -> bool:
        import torch

        return torch.cuda.is_available() and self.accelerator in ("auto", "gpu", "cuda")

    def pins_memory(self) -> bool:
        """``pin_memory``, else whether training runs on CUDA (page-locked batches copy
        asynchronously to the GPU; on the CPU they only cost)."""
        return self.pin_memory if self.pin_memory is not None else self.uses_cuda()

    def world_size(self) -> int:
        """Training processes this config starts: one per device."""
        import torch

        d = self.devices
        cuda = self.uses_cuda()
        if d == "auto":
            return max(1, torch.cuda.device_count()) if cuda else 1
        if d == -1:
            return torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
        return int(d)

    def steps_between_logs(self, steps_per_epoch: int) -> int:
        """``log_every_n_steps``, else about four loss records per epoch, at most every 50
        steps: Lightning reads the logged loss back to the host (a device sync) each time."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return max(1, min(50, steps_per_epoch // 4))
