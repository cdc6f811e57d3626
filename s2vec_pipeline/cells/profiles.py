"""Resolution profiles: which S2 levels are images and pixels.

Partitions are always S2 level-6 cells. An image is a cell at ``image_level``; its pixels are
its descendants at ``pixel_level``, laid out on an S×S grid with S = 2^(pixel − image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from s2vec_pipeline.errors import InvalidProfileError

PARTITION_LEVEL = 6
MAX_SIDE = 64


@dataclass(frozen=True)
class ResolutionProfile:
    name: str
    image_level: int
    pixel_level: int

    def __post_init__(self) -> None:
        il, pl_ = self.image_level, self.pixel_level
        if not (isinstance(il, int) and isinstance(pl_, int)):
            raise InvalidProfileError(f"profile {self.name!r}: levels must be integers")
        if il <= PARTITION_LEVEL:
            raise InvalidProfileError(
                f"profile {self.name!r}: image level {il} must be greater than the partition "
                f"level {PARTITION_LEVEL} (images are children of level-6 partition cells)"
            )
        if pl_ <= il:
            raise InvalidProfileError(
                f"profile {self.name!r}: pixel level {pl_} must be greater than image level {il}"
            )
        if pl_ > 30:
            raise InvalidProfileError(f"profile {self.name!r}: pixel level {pl_} exceeds 30")
        if 2 ** (pl_ - il) > MAX_SIDE:
            raise InvalidProfileError(
                f"profile {self.name!r}: image side 2^({pl_}-{il}) = {2 ** (pl_ - il)} exceeds "
                f"{MAX_SIDE}; keep pixel_level - image_level <= 6"
            )

    @property
    def side(self) -> int:
        """S: pixels along one side of an image."""
        return 2 ** (self.pixel_level - self.image_level)

    def to_dict(self) -> dict:
        return {**asdict(self), "side": self.side}


PROFILES: dict[str, ResolutionProfile] = {
    # As in the paper: ~4 km² pixels (level 12) in images at level 8.
    "paper": ResolutionProfile("paper", image_level=8, pixel_level=12),
    # For city-sized extracts such as the bundled ones: ~70 m pixels (level 17), images at 13.
    "city": ResolutionProfile("city", image_level=13, pixel_level=17),
}


def get_profile(name: str) -> ResolutionProfile:
    """Look up a named profile, or parse ``custom:IMAGE:PIXEL`` (e.g. ``custom:10:14``)."""
    if name in PROFILES:
        return PROFILES[name]
    if name.startswith("custom:"):
        try:
            _, il, pl_ = name.split(":")
            return ResolutionProfile(name, int(il), int(pl_))
        except ValueError:
            pass
    raise InvalidProfileError(
        f"unknown profile {name!r}: choose one of {sorted(PROFILES)} or 'custom:IMAGE:PIXEL'"
    )
