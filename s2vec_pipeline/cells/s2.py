"""Vectorized S2 cell math in numpy, bit-exact with the official S2 library.

Conventions
-----------
* A cell is its raw 64-bit S2 ``CellId`` held as ``np.uint64`` (3 face bits, 2 bits per level of
  Hilbert position, then a trailing 1 bit that marks the level).
* ``to_signed`` / ``from_signed`` bit-cast to and from ``int64``: Parquet, Delta, Polars and
  BigQuery have no unsigned 64-bit integer, and BigQuery's ``S2_CELLIDFROMPOINT`` stores the same
  bits as a signed INT64. Cells on faces 4 and 5 (top bit set) are therefore negative.
* Tokens are the official ones: lower-case hex with trailing zeros stripped, ``"X"`` for id 0.
* Elementwise functions accept scalars or array-likes and return arrays of the broadcast input
  shape (0-d for scalars); ``children_grid`` and ``cell_corners_latlng`` treat ids as 1-D.
* ``latlng_to_cell_id`` follows the official floating-point path step by step (degrees ->
  radians as ``deg * (pi / 180)``, libm ``sin``/``cos``, face = largest absolute component with
  strict ``>`` comparisons, quadratic UV->ST, ``floor(2**30 * s)``), so ids are identical to
  ``S2CellId(S2LatLng::FromDegrees(lat, lng)).parent(level)``. On exact face-boundary ties (two
  largest ``|x|, |y|, |z|`` equal, e.g. longitude exactly 45) the official rule picks the lower
  axis (x before y before z); the ``s2cell`` package breaks those ties differently.
* ``cover_bbox`` returns exactly the cells that intersect the box (the official exact test
  ``S2LatLngRect::Intersects(S2Cell)``); the official ``S2RegionCoverer`` at a fixed level returns
  the same cells plus, rarely, a corner cell whose lat/lng bound but not the cell touches the box.
  Why not call ``S2RegionCoverer`` from the ``s2geometry`` bindings (checked November 2026 with
  ``pip download --only-binary=:all: --platform ... s2geometry==0.14.0`` for CPython 3.11-3.13):
  0.14.0 has wheels only for manylinux_2_28 x86_64 and macOS (arm64, x86_64), none for Windows
  or Linux aarch64 (ARM servers, GH200-class GPU hosts), and no sdist, while osmium, deltalake,
  polars and duckdb all have wheels for both. And at a fixed level its extra corner
  cells do not touch the box: as partitions they would cover no data. So the cover stays here,
  exact, and ``s2geometry`` stays a test-only oracle (``test_s2.py`` compares against it).
* The Hilbert curve uses lookup tables built from the standard S2 ones (``kPosToIJ`` /
  ``kPosToOrientation``), widened to 6 levels (6 bits of i and of j) per lookup.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from s2vec_pipeline.errors import InvalidBoundingBoxError, InvalidCellError

__all__ = [
    "MAX_LEVEL",
    "cell_center_latlng",
    "cell_corners_latlng",
    "cell_id_from_face_ij",
    "cell_level",
    "child_position",
    "children_grid",
    "cover_bbox",
    "face_ij",
    "from_signed",
    "from_token",
    "is_valid",
    "latlng_to_cell_id",
    "parent",
    "to_signed",
    "to_token",
]

MAX_LEVEL = 30
_LIMIT_IJ = 1 << MAX_LEVEL
_U64 = np.uint64
_DEG_TO_RAD = math.pi / 180  # S1Angle::Degrees multiplies by (M_PI / 180)
_RAD_TO_DEG = 180 / math.pi  # S1Angle::degrees()
_DBL_EPSILON = float(np.finfo(np.float64).eps)
_MAX_GRID_CELLS = 1 << 28  # children_grid output limit (2 GiB of ids)
_BLOCK = 1 << 15  # points per block in latlng_to_cell_id (keeps temporaries in cache)

# ---------------------------------------------------------------------------------------------
# Hilbert curve lookup tables
# ---------------------------------------------------------------------------------------------
_SWAP_MASK = 1
_INVERT_MASK = 2
_POS_TO_IJ = np.array([[0, 1, 3, 2], [0, 2, 3, 1], [3, 2, 0, 1], [3, 1, 0, 2]], dtype=np.uint32)
_POS_TO_ORIENTATION = np.array([_SWAP_MASK, 0, 0, _INVERT_MASK | _SWAP_MASK], dtype=np.uint32)
_LOOKUP_BITS = 6  # levels (bits of i and of j) resolved per table lookup
_CHUNK_MASK = (1 << _LOOKUP_BITS) - 1
_POS_MASK = (1 << (2 * _LOOKUP_BITS)) - 1
_ORIENT_SHIFT = 2 * _LOOKUP_BITS
_ORIENT_FIELD = 3 << _ORIENT_SHIFT


def _build_hilbert_tables(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Tables for ``bits`` Hilbert levels at once, for each of the 4 start orientations.

    ``fwd[(o << 2b) | (i << b) | j] = pos | (o' << 2b)`` and
    ``inv[(o << 2b) | pos] = (i << b) | j | (o' << 2b)`` where ``o'`` is the orientation after the
    ``bits`` levels. Storing ``o'`` at bit ``2b`` lets it be OR-ed straight into the next index.
    """
    orig = np.arange(4, dtype=np.uint32)
    i = np.zeros(4, dtype=np.uint32)
    j = np.zeros(4, dtype=np.uint32)
    pos = np.zeros(4, dtype=np.uint32)
    orient = orig.copy()
    digits = np.arange(4, dtype=np.uint32)
    for _ in range(bits):
        r = _POS_TO_IJ[orient]  # (m, 4): ij of the child at each position digit
        i = ((i[:, None] << 1) | (r >> 1)).ravel()
        j = ((j[:, None] << 1) | (r & 1)).ravel()
        pos = ((pos[:, None] << 2) | digits[None, :]).ravel()
        orient = (orient[:, None] ^ _POS_TO_ORIENTATION[None, :]).ravel()
        orig = np.repeat(orig, 4)
    shift = 2 * bits
    fwd = np.empty(4 << shift, dtype=np.uint32)
    inv = np.empty(4 << shift, dtype=np.uint32)
    fwd[(orig << shift) | (i << bits) | j] = pos | (orient << shift)
    inv[(orig << shift) | pos] = (i << bits) | j | (orient << shift)
    return fwd, inv


_FWD, _INV = _build_hilbert_tables(_LOOKUP_BITS)


def _hilbert_pos(i: np.ndarray, j: np.ndarray, orient: np.ndarray, nbits: int) -> np.ndarray:
    """Hilbert position (``2 * nbits`` bits, uint64) of cell (i, j) on an ``nbits``-level grid.

    ``orient`` is the start orientation (0..3). Bits are consumed ``_LOOKUP_BITS`` at a time from
    the top; a partial last chunk is padded with zero bits at the bottom whose position bits are
    then shifted away.
    """
    n_chunks = -(-nbits // _LOOKUP_BITS)
    pos = np.zeros(np.shape(i), dtype=_U64)
    if n_chunks == 0:
        return pos
    pad = n_chunks * _LOOKUP_BITS - nbits
    i = np.asarray(i, dtype=np.uint32) << np.uint32(pad)
    j = np.asarray(j, dtype=np.uint32) << np.uint32(pad)
    state = np.asarray(orient, dtype=np.uint32) << np.uint32(_ORIENT_SHIFT)
    idx = np.empty(np.shape(i), dtype=np.uint32)
    tmp = np.empty_like(idx)
    for c in range(n_chunks - 1, -1, -1):
        sh = np.uint32(c * _LOOKUP_BITS)
        np.right_shift(i, sh, out=idx)
        idx &= np.uint32(_CHUNK_MASK)
        idx <<= np.uint32(_LOOKUP_BITS)
        np.right_shift(j, sh, out=tmp)
        tmp &= np.uint32(_CHUNK_MASK)
        idx |= tmp
        idx |= state
        val = np.take(_FWD, idx)
        pos <<= _U64(2 * _LOOKUP_BITS)
        pos |= val & np.uint32(_POS_MASK)
        state = val & np.uint32(_ORIENT_FIELD)
    if pad:
        pos >>= _U64(2 * pad)
    return pos


def _hilbert_ij(
    pos: np.ndarray, face: np.ndarray, nbits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``_hilbert_pos`` for the S2 start orientation ``face & 1``.

    Returns (i, j, orientation after ``nbits`` levels). Partial chunks are padded at the top with
    zero position digits: for start orientations 0 and 1 each such level maps to (0, 0) and just
    toggles the swap bit, so the start orientation is toggled once per padding level instead.
    """
    n_chunks = -(-nbits // _LOOKUP_BITS)
    pad = n_chunks * _LOOKUP_BITS - nbits
    state = (np.asarray(face, dtype=np.uint32) & np.uint32(1)) ^ np.uint32(pad & 1)
    state <<= np.uint32(_ORIENT_SHIFT)
    i = np.zeros(np.shape(pos), dtype=np.uint32)
    j = np.zeros(np.shape(pos), dtype=np.uint32)
    for c in range(n_chunks - 1, -1, -1):
        chunk = (pos >> _U64(c * 2 * _LOOKUP_BITS)).astype(np.uint32)
        chunk &= np.uint32(_POS_MASK)
        chunk |= state
        val = np.take(_INV, chunk)
        i <<= np.uint32(_LOOKUP_BITS)
        i |= (val >> np.uint32(_LOOKUP_BITS)) & np.uint32(_CHUNK_MASK)
        j <<= np.uint32(_LOOKUP_BITS)
        j |= val & np.uint32(_CHUNK_MASK)
        state = val & np.uint32(_ORIENT_FIELD)
    return i, j, state >> np.uint32(_ORIENT_SHIFT)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------
def _check_level(level: object, name: str = "level") -> int:
    if isinstance(level, bool) or not isinstance(level, numbers.Integral):
        raise InvalidCellError(f"{name} must be an integer in 0..30, got {level!r}")
    value = int(level)
    if not 0 <= value <= MAX_LEVEL:
        raise InvalidCellError(f"{name} must be an integer in 0..30, got {value}")
    return value


def _as_ids(ids: object) -> np.ndarray:
    """Cell ids as a uint64 array; int64 input is bit-cast (see ``from_signed``)."""
    arr = np.asarray(ids)
    if arr.dtype == _U64:
        return arr
    if arr.dtype.kind == "i":
        return arr.astype(np.int64, copy=False).view(_U64)
    if arr.dtype.kind == "u":
        return arr.astype(_U64)
    if arr.size == 0:
        return arr.astype(_U64)
    if arr.dtype.kind == "O" or (arr.dtype.kind == "f" and not isinstance(ids, np.ndarray)):
        # Python ints (numpy turns a list mixing ids below and above 2**63 into float64).
        values = np.asarray(ids, dtype=object)
        flat = values.ravel().tolist()
        for k, v in enumerate(flat):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise InvalidCellError(
                    f"cell id {v!r} at index {k} is not an integer: cell ids are 64-bit integers"
                )
            if not -(1 << 63) <= v < (1 << 64):
                raise InvalidCellError(f"cell id {v} at index {k} does not fit in 64 bits")
        return np.array([int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in flat], dtype=_U64).reshape(
            values.shape
        )
    raise InvalidCellError(
        f"cell ids must be 64-bit integers (uint64, or int64 as from to_signed), "
        f"got an array of dtype {arr.dtype}"
    )


def _lowest_bit(ids: np.ndarray) -> np.ndarray:
    return ids & (~ids + _U64(1))


def _first_bad(mask: np.ndarray) -> int:
    """Flat index of the first True in ``mask``."""
    return int(np.flatnonzero(np.ravel(mask))[0])


def _require_valid(ids: np.ndarray) -> np.ndarray:
    """Validate ids and return their levels (int64 array of the same shape)."""
    lsb = _lowest_bit(ids)
    ok = ((ids >> _U64(61)) < _U64(6)) & ((lsb & _U64(0x1555555555555555)) != 0)
    if not ok.all():
        k = _first_bad(~ok)
        bad = int(np.ravel(ids)[k])
        raise InvalidCellError(
            f"{bad} (0x{bad:016x}) at index {k} is not a valid S2 cell id: a valid id has face "
            f"bits 0..5 in the top 3 bits and its lowest set bit at an even position 0..60"
        )
    return MAX_LEVEL - (np.bitwise_count(lsb - _U64(1)).astype(np.int64) >> 1)


# ---------------------------------------------------------------------------------------------
# Cell ids, levels, parents
# ---------------------------------------------------------------------------------------------
def is_valid(ids: object) -> np.ndarray:
    """True where the id is a valid S2 cell id (``S2CellId::is_valid``)."""
    ids = _as_ids(ids)
    return ((ids >> _U64(61)) < _U64(6)) & ((_lowest_bit(ids) & _U64(0x1555555555555555)) != 0)


def cell_level(ids: object) -> np.ndarray:
    """Level (0..30) of each cell; raises InvalidCellError for invalid ids."""
    return _require_valid(_as_ids(ids))


def parent(ids: object, level: int) -> np.ndarray:
    """Ancestor of each cell at ``level`` (a cell at ``level`` is its own parent)."""
    level = _check_level(level)
    ids = _as_ids(ids)
    levels = _require_valid(ids)
    if levels.size and int(levels.min()) < level:
        k = _first_bad(levels < level)
        raise InvalidCellError(
            f"cannot take the level-{level} parent of cell {to_token(np.ravel(ids)[k])} "
            f"(index {k}), which is at level {int(np.ravel(levels)[k])}: level must be <= the "
            f"cell's own level"
        )
    lsb = _U64(1 << (2 * (MAX_LEVEL - level)))
    return (ids & (~lsb + _U64(1))) | lsb


def to_signed(ids: object) -> np.ndarray:
    """Bit-cast uint64 ids to int64 (BigQuery convention; faces 4 and 5 become negative)."""
    return np.ascontiguousarray(_as_ids(ids)).view(np.int64)


def from_signed(ids: object) -> np.ndarray:
    """Inverse of ``to_signed``: bit-cast int64 ids back to uint64."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu" and arr.size:
        raise InvalidCellError(f"signed cell ids must be int64, got an array of dtype {arr.dtype}")
    return np.ascontiguousarray(arr.astype(np.int64, copy=False)).view(_U64)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
_HEX_CODEPOINTS = np.array([ord(c) for c in "0123456789abcdef"], dtype=np.uint32)
_HEX_VALUE = np.full(129, 255, dtype=np.uint8)  # code point -> nibble, 255 = not hex
for _k, _c in enumerate("0123456789abcdef"):
    _HEX_VALUE[ord(_c)] = _k
    _HEX_VALUE[ord(_c.upper())] = _k


def to_token(ids: object) -> np.ndarray:
    """Official S2 tokens (hex, trailing zeros stripped; ``"X"`` for id 0), dtype ``<U16``."""
    ids = _as_ids(ids)
    flat = np.ravel(ids)
    n = flat.size
    octets = flat.astype(">u8").view(np.uint8).reshape(n, 8)  # most significant byte first
    nibbles = np.empty((n, 16), dtype=np.uint8)
    np.right_shift(octets, 4, out=nibbles[:, 0::2])
    np.bitwise_and(octets, 15, out=nibbles[:, 1::2])
    codes = _HEX_CODEPOINTS[nibbles]
    # Strip countr_zero(id) // 4 trailing zero digits (all 16 for id 0, which becomes "X").
    n_zero = np.bitwise_count(_lowest_bit(flat) - _U64(1)).astype(np.intp) >> 2
    codes[np.arange(16)[None, :] >= (16 - n_zero)[:, None]] = 0  # NUL ends a numpy str
    out = codes.view(np.dtype("U16")).reshape(ids.shape)
    if (flat == 0).any():
        out[ids == 0] = "X"
    return out


def from_token(tokens: object) -> np.ndarray:
    """Parse S2 tokens to uint64 ids (vectorized). Raises InvalidCellError naming the first bad
    token (empty, longer than 16 characters, not hex, or not a valid cell id)."""
    arr = np.asarray(tokens)
    if arr.dtype.kind != "U":
        arr = arr.astype(np.str_)
    shape = arr.shape
    flat = np.ascontiguousarray(arr.ravel()).astype(arr.dtype.newbyteorder("="), copy=False)
    n = flat.size
    if n == 0:
        return np.zeros(shape, dtype=_U64)
    width = flat.dtype.itemsize // 4
    lengths = np.strings.str_len(flat)
    codes = np.zeros((n, 16), dtype=np.uint32)
    if width:
        chars = flat.view(np.uint32).reshape(n, width)[:, :16]
        codes[:, : chars.shape[1]] = chars
    nibbles = _HEX_VALUE[np.minimum(codes, 128)]
    inside = np.arange(16)[None, :] < lengths[:, None]
    not_hex = ((nibbles > 15) & inside).any(axis=1)
    bad = (lengths == 0) | (lengths > 16) | not_hex
    nibbles[~inside] = 0
    octets = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    ids = np.ascontiguousarray(octets).view(">u8").ravel().astype(_U64)
    bad |= ~is_valid(ids)
    if bad.any():
        k = _first_bad(bad)
        if lengths[k] == 0:
            why = "it is empty"
        elif lengths[k] > 16:
            why = f"it has {lengths[k]} characters"
        elif not_hex[k]:
            why = "it is not hexadecimal"
        else:
            why = "it does not encode a valid cell id"
        raise InvalidCellError(
            f"invalid S2 cell token {str(flat[k])!r} at index {k} ({why}): a token is 1-16 hex "
            f"digits (trailing zeros stripped, e.g. '4693') that encode a valid cell id"
        )
    return ids.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Points -> cells
# ---------------------------------------------------------------------------------------------
def _uv_to_ij(u: np.ndarray, out: np.ndarray) -> None:
    """IJ = clamp(floor(2**30 * UVtoST(u)), 0, 2**30 - 1), quadratic projection, into uint32.

    UVtoST is ``0.5 * sqrt(1 + 3u)`` for u >= 0 and ``1 - 0.5 * sqrt(1 - 3u)`` otherwise. Both
    ``1 - 3u == 1 + 3|u|`` and the scalings by powers of two are exact, and so is the subtraction
    (Sterbenz), hence ``2**30 * s`` equals ``w`` or ``2**30 - w`` bit for bit, with
    ``w = 2**29 * sqrt(1 + 3|u|)``.
    """
    w = np.abs(u)
    w *= 3.0
    w += 1.0
    np.sqrt(w, out=w)
    w *= float(1 << 29)
    scaled = np.where(u >= 0, w, float(_LIMIT_IJ) - w)
    out[...] = scaled  # truncation == floor since scaled >= 0
    np.minimum(out, np.uint32(_LIMIT_IJ - 1), out=out)


def _latlng_block(lat: np.ndarray, lng: np.ndarray, level: int, out: np.ndarray) -> None:
    phi = lat * _DEG_TO_RAD
    theta = lng * _DEG_TO_RAD
    cos_phi = np.cos(phi)
    z = np.sin(phi, out=phi)
    x = np.cos(theta)
    x *= cos_phi
    y = np.sin(theta, out=theta)
    y *= cos_phi
    ax = np.abs(x)
    ay = np.abs(y, out=cos_phi)
    az = np.abs(z)
    # S2Point::LargestAbsComponent: (ax > ay) ? ((ax > az) ? 0 : 2) : ((ay > az) ? 1 : 2)
    axis0 = ax > ay
    axis0 &= ax > az
    axis1 = ay >= ax  # == not (ax > ay): no NaN here
    axis1 &= ay > az
    axis01 = axis0 | axis1
    main = np.where(axis0, x, np.where(axis1, y, z))
    # (u, v) numerators of the positive faces 0, 1, 2: (y, z), (-x, z), (-x, -y);
    # the negative faces 3, 4, 5 use the same pair swapped (see S2::ValidFaceXYZtoUV).
    np.negative(x, out=ax)
    np.negative(y, out=ay)
    a = np.where(axis0, y, ax)
    b = np.where(axis01, z, ay)
    a /= main
    b /= main
    n = lat.shape[0]
    i = np.empty(n, dtype=np.uint32)
    j = np.empty(n, dtype=np.uint32)
    _uv_to_ij(a, i)
    _uv_to_ij(b, j)
    # On the negative faces (i, j) = (IJ(b), IJ(a)). Rather than swapping, walk (IJ(a), IJ(b))
    # with the swap bit of the start orientation toggled: the Hilbert position is the same.
    # Start orientation face & 1 = (axis & 1) ^ negative, toggled on negative faces = axis & 1.
    negative = main < 0
    shift = MAX_LEVEL - level
    if shift:
        i >>= np.uint32(shift)
        j >>= np.uint32(shift)
    pos = _hilbert_pos(i, j, axis1.view(np.uint8), level)
    pos <<= _U64(2 * shift + 1)
    pos |= _U64(1 << (2 * shift))
    # face = axis + 3 * negative, axis = 2 - 2 * axis0 - axis1
    face = np.full(n, 2, dtype=np.uint8)
    face -= axis0.view(np.uint8) << np.uint8(1)
    face -= axis1.view(np.uint8)
    face += negative.view(np.uint8) * np.uint8(3)
    pos |= face.astype(_U64) << _U64(61)
    out[...] = pos


def _check_latlng(lat: np.ndarray, lng: np.ndarray, offset: int) -> None:
    ok_lat = (lat >= -90.0) & (lat <= 90.0)
    if not ok_lat.all():
        k = _first_bad(~ok_lat)
        raise InvalidCellError(
            f"latitude {float(lat[k])!r} at index {offset + k} is invalid: latitude must be a "
            f"finite number of degrees in [-90, 90]"
        )
    ok_lng = np.isfinite(lng)
    if not ok_lng.all():
        k = _first_bad(~ok_lng)
        raise InvalidCellError(
            f"longitude {float(lng[k])!r} at index {offset + k} is invalid: longitude must be a "
            f"finite number of degrees (any finite value; it wraps around)"
        )


def latlng_to_cell_id(lat_deg: object, lng_deg: object, level: int = 30) -> np.ndarray:
    """Cell ids at ``level`` of points given in degrees; bit-exact with
    ``S2CellId(S2LatLng::FromDegrees(lat, lng)).parent(level)``."""
    level = _check_level(level)
    lat = np.asarray(lat_deg, dtype=np.float64)
    lng = np.asarray(lng_deg, dtype=np.float64)
    if lat.shape != lng.shape:
        lat, lng = np.broadcast_arrays(lat, lng)
    shape = lat.shape
    lat = np.ravel(lat)
    lng = np.ravel(lng)
    out = np.empty(lat.shape[0], dtype=_U64)
    for start in range(0, lat.shape[0], _BLOCK):
        stop = start + _BLOCK
        la, ln = lat[start:stop], lng[start:stop]
        _check_latlng(la, ln, start)
        _latlng_block(la, ln, level, out[start:stop])
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Face / (i, j) coordinates
# ---------------------------------------------------------------------------------------------
def _decode(ids: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face, i, j) of valid ids at their own levels, as int64 arrays."""
    face = (ids >> _U64(61)).astype(np.int64)
    if levels.size == 0:
        empty = np.zeros(ids.shape, dtype=np.int64)
        return face, empty, empty.copy()
    lo, hi = int(levels.min()), int(levels.max())
    if lo == hi:  # common case: walk only the levels needed
        pos = (ids >> _U64(61 - 2 * lo)) & _U64((1 << (2 * lo)) - 1)
        i, j, _ = _hilbert_ij(pos, face, lo)
        return face, i.astype(np.int64), j.astype(np.int64)
    pos = (ids >> _U64(1)) & _U64((1 << 60) - 1)
    i, j, _ = _hilbert_ij(pos, face, MAX_LEVEL)
    shift = (MAX_LEVEL - levels).astype(np.uint32)
    return face, (i >> shift).astype(np.int64), (j >> shift).astype(np.int64)


def face_ij(ids: object, level: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face, i, j) of each cell, i and j in [0, 2**L) at the cell's own level L, or at ``level``
    (which must be <= every cell's level) if given."""
    ids = _as_ids(ids)
    levels = _require_valid(ids)
    face, i, j = _decode(ids, levels)
    if level is not None:
        level = _check_level(level)
        if levels.size and int(levels.min()) < level:
            k = _first_bad(levels < level)
            raise InvalidCellError(
                f"level {level} is finer than cell {to_token(np.ravel(ids)[k])} (index {k}, "
                f"level {int(np.ravel(levels)[k])}): level must be <= the cell's own level"
            )
        shift = levels - level
        i >>= shift
        j >>= shift
    return face, i, j


def cell_id_from_face_ij(face: object, i: object, j: object, level: int) -> np.ndarray:
    """Cell ids at ``level`` from face (0..5) and i, j in [0, 2**level); inverse of face_ij."""
    level = _check_level(level)
    face_a, i_a, j_a = np.broadcast_arrays(np.asarray(face), np.asarray(i), np.asarray(j))
    size = 1 << level
    for name, arr, limit in (("face", face_a, 6), ("i", i_a, size), ("j", j_a, size)):
        if arr.size and arr.dtype.kind not in "iu":
            raise InvalidCellError(f"{name} must be integers, got an array of dtype {arr.dtype}")
        ok = (arr >= 0) & (arr < limit)
        if not ok.all():
            k = _first_bad(~ok)
            raise InvalidCellError(
                f"{name} = {np.ravel(arr)[k]} at index {k} is out of range: {name} must be in "
                f"0..{limit - 1}" + ("" if name == "face" else f" at level {level}")
            )
    face_u = face_a.astype(_U64)
    pos = _hilbert_pos(i_a.astype(np.uint32), j_a.astype(np.uint32), face_u & _U64(1), level)
    shift = MAX_LEVEL - level
    return (face_u << _U64(61)) | (pos << _U64(2 * shift + 1)) | _U64(1 << (2 * shift))


def child_position(ids: object, ancestor_level: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each cell inside its ancestor at ``ancestor_level``: row = i - i0 and
    col = j - j0 with (i0, j0) the ancestor's first descendant at the cell's level."""
    ancestor_level = _check_level(ancestor_level, "ancestor_level")
    ids = _as_ids(ids)
    levels = _require_valid(ids)
    if levels.size and int(levels.min()) < ancestor_level:
        k = _first_bad(levels < ancestor_level)
        raise InvalidCellError(
            f"ancestor_level {ancestor_level} is finer than cell {to_token(np.ravel(ids)[k])} "
            f"(index {k}, level {int(np.ravel(levels)[k])}): it must be <= the cell's level"
        )
    _, i, j = _decode(ids, levels)
    mask = (np.int64(1) << (levels - ancestor_level)) - 1
    return i & mask, j & mask


def _uniform_level(ids: np.ndarray, levels: np.ndarray, what: str) -> int:
    if levels.size == 0:
        return -1
    lo, hi = int(levels.min()), int(levels.max())
    if lo != hi:
        raise InvalidCellError(
            f"{what} needs cells of a single level; got levels {lo}..{hi} "
            f"(e.g. {to_token(ids[np.argmin(levels)])} and {to_token(ids[np.argmax(levels)])})"
        )
    return lo


def children_grid(ids: object, level: int) -> np.ndarray:
    """Descendants at ``level`` of each cell, shape (n, S, S) with S = 2**(level - cell level):
    ``grid[k, row, col]`` is the descendant of ``ids[k]`` at that child_position."""
    level = _check_level(level)
    ids = np.ravel(_as_ids(ids))
    levels = _require_valid(ids)
    cell_lvl = _uniform_level(ids, levels, "children_grid")
    if cell_lvl < 0:
        return np.zeros((0, 0, 0), dtype=_U64)
    if level < cell_lvl:
        raise InvalidCellError(
            f"level {level} is coarser than the cells' level {cell_lvl}: children_grid needs "
            f"level >= the cell level"
        )
    d = level - cell_lvl
    side = 1 << d
    if ids.size * side * side > _MAX_GRID_CELLS:
        raise InvalidCellError(
            f"children_grid of {ids.size:,} level-{cell_lvl} cells at level {level} would hold "
            f"{ids.size * side * side:,} ids (limit {_MAX_GRID_CELLS:,}): pass fewer cells or a "
            f"coarser level"
        )
    face = (ids >> _U64(61)).astype(np.int64)
    pos = (ids >> _U64(61 - 2 * cell_lvl)) & _U64((1 << (2 * cell_lvl)) - 1)
    _, _, orient = _hilbert_ij(pos, face, cell_lvl)
    # Hilbert position of each (row, col) inside a cell, for each of the 4 orientations.
    rows = np.repeat(np.arange(side, dtype=np.uint32), side)
    cols = np.tile(np.arange(side, dtype=np.uint32), side)
    sub = np.stack(
        [_hilbert_pos(rows, cols, np.full(rows.shape, o, np.uint32), d) for o in range(4)]
    ).reshape(4, side, side)
    lsb_cell = _U64(1 << (2 * (MAX_LEVEL - cell_lvl)))
    lsb_child = _U64(1 << (2 * (MAX_LEVEL - level)))
    begin = ids - lsb_cell + lsb_child  # S2CellId::child_begin(level)
    return begin[:, None, None] + (sub[orient.astype(np.intp)] << _U64(2 * (MAX_LEVEL - level) + 1))


# ---------------------------------------------------------------------------------------------
# Geometry: centers, corners
# ---------------------------------------------------------------------------------------------
# S2::FaceUVtoXYZ as coefficients: xyz[f] = C0[f] + CU[f] * u + CV[f] * v (each sum exact)
_FACE_C0 = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]], dtype=np.float64
)
_FACE_CU = np.array(
    [[0, 1, 0], [-1, 0, 0], [-1, 0, 0], [0, 0, -1], [0, 0, -1], [0, 1, 0]], dtype=np.float64
)
_FACE_CV = np.array(
    [[0, 0, 1], [0, 0, 1], [0, -1, 0], [0, -1, 0], [1, 0, 0], [1, 0, 0]], dtype=np.float64
)


def _st_to_uv(s: np.ndarray) -> np.ndarray:
    """S2::STtoUV, quadratic projection."""
    t = 1 - s
    return np.where(s >= 0.5, (1 / 3.0) * (4 * s * s - 1), (1 / 3.0) * (1 - 4 * t * t))


def _face_uv_to_xyz(
    face: np.ndarray, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c0, cu, cv = _FACE_C0[face], _FACE_CU[face], _FACE_CV[face]
    return tuple(c0[..., k] + cu[..., k] * u + cv[..., k] * v for k in range(3))  # type: ignore[return-value]


def _xyz_to_latlng_rad(
    x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """S2LatLng::Latitude / Longitude (the ``+ 0.0`` turns -0.0 into 0.0)."""
    lat = np.arctan2(z + 0.0, np.sqrt(x * x + y * y))
    lng = np.arctan2(y + 0.0, x + 0.0)
    return lat, lng


def _normalized_latlng_deg(
    x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    norm = np.sqrt(x * x + y * y + z * z)
    inv = 1.0 / norm
    lat, lng = _xyz_to_latlng_rad(x * inv, y * inv, z * inv)
    return _RAD_TO_DEG * lat, _RAD_TO_DEG * lng


def cell_center_latlng(ids: object) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lng) in degrees of each cell's center (``S2Cell::GetCenter``)."""
    ids = _as_ids(ids)
    levels = _require_valid(ids)
    face, i, j = _decode(ids, levels)
    scale = np.ldexp(1.0, -(levels + 1))
    u = _st_to_uv((2 * i + 1) * scale)
    v = _st_to_uv((2 * j + 1) * scale)
    return _normalized_latlng_deg(*_face_uv_to_xyz(face, u, v))


def cell_corners_latlng(ids: object) -> np.ndarray:
    """Vertices of each cell, shape (n, 4, 2) of [lat, lng] degrees, in ``S2Cell::GetVertex``
    order (counter-clockwise: (u_lo, v_lo), (u_hi, v_lo), (u_hi, v_hi), (u_lo, v_hi))."""
    ids = np.ravel(_as_ids(ids))
    levels = _require_valid(ids)
    face, i, j = _decode(ids, levels)
    scale = np.ldexp(1.0, -levels)
    u_lo, u_hi = _st_to_uv(i * scale), _st_to_uv((i + 1) * scale)
    v_lo, v_hi = _st_to_uv(j * scale), _st_to_uv((j + 1) * scale)
    u = np.stack([u_lo, u_hi, u_hi, u_lo], axis=1)
    v = np.stack([v_lo, v_lo, v_hi, v_hi], axis=1)
    lat, lng = _normalized_latlng_deg(*_face_uv_to_xyz(face[:, None], u, v))
    return np.stack([lat, lng], axis=-1)


# ---------------------------------------------------------------------------------------------
# Covering a lat/lng rectangle
# ---------------------------------------------------------------------------------------------
_PI = math.pi
_HALF_PI = math.pi / 2  # M_PI_2
_QUARTER_PI = math.pi / 4  # M_PI_4
_POLE_MIN_LAT = math.asin(math.sqrt(1.0 / 3)) - 0.5 * _DBL_EPSILON
_U_AXIS_Z_IS_ZERO = np.array([True, True, True, False, False, True])  # S2::GetUAxis(f)[2] == 0
_V_AXIS_Z_IS_ZERO = np.array([False, False, True, True, True, True])  # S2::GetVAxis(f)[2] == 0

Vec3 = tuple[np.ndarray, np.ndarray, np.ndarray]


class _Rect:
    """An S2LatLngRect in radians (longitude as an S1Interval: lo > hi means inverted)."""

    def __init__(self, lat_lo: float, lat_hi: float, lng_lo: float, lng_hi: float) -> None:
        self.lat_lo, self.lat_hi, self.lng_lo, self.lng_hi = lat_lo, lat_hi, lng_lo, lng_hi

    def contains_latlng(self, lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
        lat_ok = (lat >= self.lat_lo) & (lat <= self.lat_hi)
        return lat_ok & _s1_contains(self.lng_lo, self.lng_hi, lng)

    def center_point(self) -> tuple[float, float, float]:
        lat = 0.5 * (self.lat_lo + self.lat_hi)
        lng = 0.5 * (self.lng_lo + self.lng_hi)
        if self.lng_lo > self.lng_hi:  # S1Interval::GetCenter of an inverted interval
            lng = lng + _PI if lng <= 0 else lng - _PI
        return _latlng_to_point(lat, lng)

    def vertex_points(self) -> list[tuple[float, float, float]]:
        lats = (self.lat_lo, self.lat_hi)
        lngs = (self.lng_lo, self.lng_hi)
        return [_latlng_to_point(lats[k >> 1], lngs[(k >> 1) ^ (k & 1)]) for k in range(4)]


def _latlng_to_point(lat: float, lng: float) -> tuple[float, float, float]:
    """S2LatLng::ToPoint (radians)."""
    cos_lat = math.cos(lat)
    return math.cos(lng) * cos_lat, math.sin(lng) * cos_lat, math.sin(lat)


def _s1_contains(lo: object, hi: object, p: object) -> np.ndarray:
    """S1Interval(lo, hi).Contains(p), broadcasting."""
    p = np.where(np.equal(p, -_PI), _PI, p)
    inverted = np.greater(lo, hi)
    empty = np.equal(lo, _PI) & np.equal(hi, -_PI)
    return np.where(inverted, ((p >= lo) | (p <= hi)) & ~empty, (p >= lo) & (p <= hi))


def _s1_remainder(x: np.ndarray) -> np.ndarray:
    """IEEE remainder(x, 2*pi) for |x| < 3*pi (exact, like the C library)."""
    return np.where(x > _PI, x - 2 * _PI, np.where(x < -_PI, x + 2 * _PI, x))


def _s1_from_point_pair(p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p1 = np.where(p1 == -_PI, _PI, p1)
    p2 = np.where(p2 == -_PI, _PI, p2)
    d = p2 - p1
    dist = np.where(d >= 0, d, (p2 + _PI) - (p1 - _PI))  # PositiveDistance(p1, p2)
    keep = dist <= _PI
    return np.where(keep, p1, p2), np.where(keep, p2, p1)


def _s1_expanded(lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """S1Interval::Expanded for margin >= 0 on non-empty intervals."""
    length = hi - lo
    length = np.where(length >= 0, length, length + 2 * _PI)
    length = np.where(length > 0, length, -1.0)
    full = length + 2 * margin + 2 * _DBL_EPSILON >= 2 * _PI
    new_lo = _s1_remainder(lo - margin)
    new_hi = _s1_remainder(hi + margin)
    # S1Interval(lo, hi) constructor normalisation of -pi, then "if (lo <= -pi) lo = pi".
    fixed_lo = np.where((new_lo == -_PI) & (new_hi != _PI), _PI, new_lo)
    fixed_hi = np.where((new_hi == -_PI) & (new_lo != _PI), _PI, new_hi)
    fixed_lo = np.where(fixed_lo <= -_PI, _PI, fixed_lo)
    return np.where(full, -_PI, fixed_lo), np.where(full, _PI, fixed_hi)


def _s1_intersects(lo: float, hi: float, y_lo: np.ndarray, y_hi: np.ndarray) -> np.ndarray:
    """S1Interval(lo, hi).Intersects(y) for non-empty intervals y."""
    y_inverted = y_lo > y_hi
    if lo > hi:  # inverted: every non-empty inverted interval contains pi
        return y_inverted | (y_lo <= hi) | (y_hi >= lo)
    return np.where(y_inverted, (y_lo <= hi) | (y_hi >= lo), (y_lo <= hi) & (y_hi >= lo))


def _r1_intersects(lo: float, hi: float, y_lo: np.ndarray, y_hi: np.ndarray) -> np.ndarray:
    """R1Interval(lo, hi).Intersects(y)."""
    return np.where(lo <= y_lo, (y_lo <= hi) & (y_lo <= y_hi), (lo <= y_hi) & (lo <= hi))


def _face_rect_bounds() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S2Cell::GetRectBound for the 6 face cells, expanded by (DBL_EPSILON, 0)."""
    q, h, p = _QUARTER_PI, _HALF_PI, _POLE_MIN_LAT
    lat = [(-q, q), (-q, q), (p, h), (-q, q), (-q, q), (-h, -p)]
    lng = [(-q, q), (q, 3 * q), (-_PI, _PI), (3 * q, -3 * q), (-3 * q, -q), (-_PI, _PI)]
    lat_lo = np.maximum(np.array([a for a, _ in lat]) - _DBL_EPSILON, -_HALF_PI)
    lat_hi = np.minimum(np.array([b for _, b in lat]) + _DBL_EPSILON, _HALF_PI)
    lng_lo, lng_hi = _s1_expanded(np.array([a for a, _ in lng]), np.array([b for _, b in lng]), 0.0)
    return lat_lo, lat_hi, lng_lo, lng_hi


def _uv_bounds(
    i: np.ndarray, j: np.ndarray, level: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S2CellId::IJLevelToBoundUV: (u_lo, u_hi, v_lo, v_hi)."""
    scale = math.ldexp(1.0, -level)  # IJtoSTMin, exact
    return (
        _st_to_uv(i * scale),
        _st_to_uv((i + 1) * scale),
        _st_to_uv(j * scale),
        _st_to_uv((j + 1) * scale),
    )


def _cell_rect_bounds(
    face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S2Cell::GetRectBound for cells at ``level`` >= 1 (same floating-point steps)."""
    u_lo, u_hi, v_lo, v_hi = _uv_bounds(i, j, level)
    u = u_lo + u_hi
    v = v_lo + v_hi
    ci = np.where(_U_AXIS_Z_IS_ZERO[face], u < 0, u > 0)
    cj = np.where(_V_AXIS_Z_IS_ZERO[face], v < 0, v > 0)
    ua, ub = np.where(ci, u_hi, u_lo), np.where(ci, u_lo, u_hi)  # u[i], u[1-i]
    va, vb = np.where(cj, v_hi, v_lo), np.where(cj, v_lo, v_hi)  # v[j], v[1-j]
    lat1, _ = _xyz_to_latlng_rad(*_face_uv_to_xyz(face, ua, va))
    lat2, _ = _xyz_to_latlng_rad(*_face_uv_to_xyz(face, ub, vb))
    _, lng1 = _xyz_to_latlng_rad(*_face_uv_to_xyz(face, ua, vb))
    _, lng2 = _xyz_to_latlng_rad(*_face_uv_to_xyz(face, ub, va))
    margin = 2 * _DBL_EPSILON
    lat_lo = np.maximum(np.minimum(lat1, lat2) - margin, -_HALF_PI)
    lat_hi = np.minimum(np.maximum(lat1, lat2) + margin, _HALF_PI)
    lng_lo, lng_hi = _s1_expanded(*_s1_from_point_pair(lng1, lng2), margin)
    polar = (lat_lo == -_HALF_PI) | (lat_hi == _HALF_PI)  # PolarClosure
    return lat_lo, lat_hi, np.where(polar, -_PI, lng_lo), np.where(polar, _PI, lng_hi)


def _cross(a: Vec3, b: Vec3) -> Vec3:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Vec3, b: Vec3) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _normalize(a: Vec3) -> Vec3:
    norm = np.sqrt(_dot(a, a))
    inv = np.where(norm != 0, 1.0 / norm, 0.0)
    return a[0] * inv, a[1] * inv, a[2] * inv


def _cell_contains_point(
    face: np.ndarray, uv: tuple[np.ndarray, ...], p: tuple[float, float, float]
) -> np.ndarray:
    """S2Cell::Contains(p) for one point and many cells: S2::FaceXYZtoUV, then the (u, v) bound
    expanded by DBL_EPSILON."""
    x, y, z = p
    main = np.array([x, y, z, x, y, z])[face]
    num_u = np.array([y, -x, -x, z, z, -y])[face]
    num_v = np.array([z, z, -y, y, -x, -x])[face]
    on_face = np.where(face < 3, main > 0, main < 0)
    u = num_u / np.where(on_face, main, 1.0)
    v = num_v / np.where(on_face, main, 1.0)
    u_lo, u_hi, v_lo, v_hi = uv
    eps = _DBL_EPSILON
    return on_face & (u >= u_lo - eps) & (u <= u_hi + eps) & (v >= v_lo - eps) & (v <= v_hi + eps)


def _crosses(a: Vec3, b: Vec3, c: Vec3, d: Vec3) -> np.ndarray:
    """S2::CrossingSign(a, b, c, d) > 0: the edges AB and CD cross at an interior point (plain
    floating-point orientation tests; ties count as no crossing)."""
    ab = _cross(a, b)
    cd = _cross(c, d)
    acb = -np.sign(_dot(ab, c))
    bda = np.sign(_dot(ab, d))
    cbd = -np.sign(_dot(cd, b))
    dac = np.sign(_dot(cd, a))
    return (acb != 0) & (acb == bda) & (acb == cbd) & (acb == dac)


def _intersects_lat_edge(a: Vec3, b: Vec3, lat: float, rect: _Rect) -> np.ndarray:
    """S2LatLngRect::IntersectsLatEdge: does the geodesic edge AB cross the line of latitude
    ``lat`` inside the rectangle's longitude interval?"""
    n = _cross(_add(b, a), _sub(b, a))  # RobustCrossProd(a, b) for distinct a, b
    z = _normalize(n)
    flip = np.where(z[2] < 0, -1.0, 1.0)
    z = (z[0] * flip, z[1] * flip, z[2] * flip)
    y = _normalize((z[1], -z[0], np.zeros_like(z[0])))  # z x (0, 0, 1)
    x = _cross(y, z)
    sin_lat = math.sin(lat)
    reaches = abs(sin_lat) < x[2]  # False when the great circle stays below the latitude
    cos_theta = sin_lat / np.where(reaches, x[2], 1.0)
    sin_theta = np.sqrt(np.maximum(1 - cos_theta * cos_theta, 0.0))
    theta = np.arctan2(sin_theta, cos_theta)
    ab_lo, ab_hi = _s1_from_point_pair(
        np.arctan2(_dot(a, y), _dot(a, x)), np.arctan2(_dot(b, y), _dot(b, x))
    )
    hit = np.zeros(theta.shape, dtype=bool)
    for sign in (1.0, -1.0):
        isect_x = x[0] * cos_theta + sign * (y[0] * sin_theta)
        isect_y = x[1] * cos_theta + sign * (y[1] * sin_theta)
        lng = np.arctan2(isect_y, isect_x)
        hit |= _s1_contains(ab_lo, ab_hi, sign * theta) & _s1_contains(
            rect.lng_lo, rect.lng_hi, lng
        )
    return reaches & hit


def _add(a: Vec3, b: Vec3) -> Vec3:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _sub(a: Vec3, b: Vec3) -> Vec3:
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def _rect_intersects_cells(
    rect: _Rect, face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int
) -> np.ndarray:
    """S2LatLngRect::Intersects(S2Cell) -- the exact test -- for cells at ``level`` whose bound
    is already known to intersect the rectangle."""
    uv = _uv_bounds(i, j, level)
    u_lo, u_hi, v_lo, v_hi = uv
    scale = math.ldexp(1.0, -(level + 1))
    # The rectangle contains the cell's center, or the cell contains the rectangle's center.
    center = _face_uv_to_xyz(face, _st_to_uv((2 * i + 1) * scale), _st_to_uv((2 * j + 1) * scale))
    hit = rect.contains_latlng(*_xyz_to_latlng_rad(*center))
    hit |= _cell_contains_point(face, uv, rect.center_point())
    # A vertex of one lies in the other.
    verts = [
        _normalize(_face_uv_to_xyz(face, uu, vv))
        for uu, vv in ((u_lo, v_lo), (u_hi, v_lo), (u_hi, v_hi), (u_lo, v_hi))
    ]
    lls = [_xyz_to_latlng_rad(*vert) for vert in verts]
    for k in range(4):
        hit |= rect.contains_latlng(*lls[k])
    for p in rect.vertex_points():
        hit |= _cell_contains_point(face, uv, p)
    # The boundaries cross.
    lng_edge_ends = [
        (lng, _latlng_to_point(rect.lat_lo, lng), _latlng_to_point(rect.lat_hi, lng))
        for lng in (rect.lng_lo, rect.lng_hi)
    ]
    for k in range(4):
        a, b = verts[k], verts[(k + 1) & 3]
        edge_lo, edge_hi = _s1_from_point_pair(lls[k][1], lls[(k + 1) & 3][1])
        near = ~hit & _s1_intersects(rect.lng_lo, rect.lng_hi, edge_lo, edge_hi)
        if not near.any():
            continue
        for lng, c, d in lng_edge_ends:
            cc = tuple(np.full(face.shape, t) for t in c)
            dd = tuple(np.full(face.shape, t) for t in d)
            hit |= near & _s1_contains(edge_lo, edge_hi, lng) & _crosses(a, b, cc, dd)
        for lat in (rect.lat_lo, rect.lat_hi):
            hit |= near & _intersects_lat_edge(a, b, lat, rect)
    return hit


def _bbox_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidBoundingBoxError(f"{name} must be a number of degrees, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidBoundingBoxError(f"{name} must be a finite number of degrees, got {out!r}")
    return out


def cover_bbox(
    min_lat: float,
    min_lng: float,
    max_lat: float,
    max_lng: float,
    level: int = 6,
    *,
    max_cells: int = 100_000,
) -> np.ndarray:
    """Sorted uint64 ids of exactly the cells at ``level`` that intersect a lat/lng rectangle.

    Corners are in degrees; ``min_lng > max_lng`` means the box crosses the antimeridian; a
    point (min == max) or a box touching a pole is fine. The rectangle is the official
    ``S2LatLngRect(FromDegrees(min_lat, min_lng), FromDegrees(max_lat, max_lng))`` and boxes
    sharing an edge both get the cells on that edge (closed sets).

    Approach: starting from the 6 face cells, cells are subdivided level by level and kept
    while their lat/lng bound (``S2Cell::GetRectBound``, same floating-point steps and safety
    margins) intersects the rectangle -- a conservative test, exactly the one the official
    ``S2RegionCoverer`` uses (``S2LatLngRect::MayIntersect``). The cells left at ``level`` then
    get the official exact test, ``S2LatLngRect::Intersects(S2Cell)`` (center and vertex
    containment both ways, then edge crossings), vectorized. The official coverer with
    ``min_level = max_level = level`` returns the same cells except that it may keep a cell near
    a corner of the box whose bound, but not the cell itself, reaches the box.

    Raises InvalidBoundingBoxError for malformed boxes or more than ``max_cells`` cells.
    """
    level = _check_level(level)
    lat0 = _bbox_value("min_lat", min_lat)
    lng0 = _bbox_value("min_lng", min_lng)
    lat1 = _bbox_value("max_lat", max_lat)
    lng1 = _bbox_value("max_lng", max_lng)
    for name, value in (("min_lat", lat0), ("max_lat", lat1)):
        if not -90.0 <= value <= 90.0:
            raise InvalidBoundingBoxError(f"{name} = {value} is outside [-90, 90] degrees")
    for name, value in (("min_lng", lng0), ("max_lng", lng1)):
        if not -180.0 <= value <= 180.0:
            raise InvalidBoundingBoxError(
                f"{name} = {value} is outside [-180, 180] degrees (for a box crossing the "
                f"antimeridian pass min_lng > max_lng, e.g. 170 and -170)"
            )
    if lat0 > lat1:
        raise InvalidBoundingBoxError(
            f"min_lat = {lat0} is greater than max_lat = {lat1}: pass the southern edge first "
            f"(min_lat <= max_lat)"
        )
    a, b = _DEG_TO_RAD * lng0, _DEG_TO_RAD * lng1
    # S1Interval(lo, hi) constructor: -180 stands for 180 unless the interval is full.
    rect = _Rect(
        _DEG_TO_RAD * lat0,
        _DEG_TO_RAD * lat1,
        _PI if (a == -_PI and b != _PI) else a,
        _PI if (b == -_PI and a != _PI) else b,
    )
    if rect.lng_lo == _PI and rect.lng_hi == -_PI:
        raise InvalidBoundingBoxError(
            "min_lng = 180 with max_lng = -180 is an empty longitude range: pass -180 and 180 "
            "for all longitudes, or 180 and 180 for the antimeridian line"
        )
    lng_span = rect.lng_hi - rect.lng_lo
    if lng_span < 0:
        lng_span += 2 * _PI
    area = lng_span * (math.sin(rect.lat_hi) - math.sin(rect.lat_lo))
    avg_cell_area = 4 * _PI / (6 * 4.0**level)
    if area > avg_cell_area * max_cells:
        fits = level + math.floor(math.log(max_cells * avg_cell_area / area, 4))
        raise InvalidBoundingBoxError(
            f"box ({lat0}, {lng0}) - ({lat1}, {lng1}) needs about {area / avg_cell_area:,.0f} "
            f"level-{level} cells, more than max_cells = {max_cells:,}: use a smaller box or a "
            f"coarser level (level {max(fits, 0)} or less)"
        )

    def keep(bounds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        lat_lo, lat_hi, lng_lo, lng_hi = bounds
        return _r1_intersects(rect.lat_lo, rect.lat_hi, lat_lo, lat_hi) & _s1_intersects(
            rect.lng_lo, rect.lng_hi, lng_lo, lng_hi
        )

    with np.errstate(invalid="ignore", divide="ignore"):
        face = np.arange(6, dtype=np.int64)
        i = np.zeros(6, dtype=np.int64)
        j = np.zeros(6, dtype=np.int64)
        sel = keep(_face_rect_bounds())
        face, i, j = face[sel], i[sel], j[sel]
        for k in range(1, level + 1):
            face = np.repeat(face, 4)
            i = np.repeat(2 * i, 4) + np.tile([0, 0, 1, 1], i.size)
            j = np.repeat(2 * j, 4) + np.tile([0, 1, 0, 1], j.size)
            sel = keep(_cell_rect_bounds(face, i, j, k))
            face, i, j = face[sel], i[sel], j[sel]
            if face.size > 4 * max_cells:
                raise InvalidBoundingBoxError(
                    f"box ({lat0}, {lng0}) - ({lat1}, {lng1}) needs more than max_cells = "
                    f"{max_cells:,} cells at level {level}: use a smaller box or a coarser level"
                )
        sel = _rect_intersects_cells(rect, face, i, j, level)
    face, i, j = face[sel], i[sel], j[sel]
    if face.size > max_cells:
        raise InvalidBoundingBoxError(
            f"box ({lat0}, {lng0}) - ({lat1}, {lng1}) intersects {face.size:,} level-{level} "
            f"cells, more than max_cells = {max_cells:,}: use a smaller box or a coarser level"
        )
    return np.sort(cell_id_from_face_ij(face, i, j, level))
