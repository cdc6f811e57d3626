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
  shape (0-d for scalars); ``children_grid`` treats ids as 1-D.
* ``latlng_to_cell_id`` follows the official floating-point path step by step (degrees ->
  radians as ``deg * (pi / 180)``, libm ``sin``/``cos``, face = largest absolute component with
  strict ``>`` comparisons, quadratic UV->ST, ``floor(2**30 * s)``), so ids are identical to
  ``S2CellId(S2LatLng::FromDegrees(lat, lng)).parent(level)``. On exact face-boundary ties (two
  largest ``|x|, |y|, |z|`` equal, e.g. longitude exactly 45) the official rule picks the lower
  axis (x before y before z); the ``s2cell`` package breaks those ties differently.
* ``s2_geometry.cover_bbox`` (centres, corners and coverings live there) returns exactly the
  cells that intersect the box (the official exact test
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

from s2vec_pipeline.errors import InvalidCellError

__all__ = [
    "MAX_LEVEL",
    "cell_id_from_face_ij",
    "cell_level",
    "child_position",
    "children_grid",
    "face_ij",
    "from_signed",
    "from_token",
    "is_valid",
    "latlng_to_cell_id",
    "parent",
    "to_signed",
    "to_token",
    "to_token_utf8",
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


def _hex_digits(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) hex digit values of the ids, most significant first, and each id's count of
    trailing zero digits (countr_zero(id) // 4; 16 for id 0): what a token strips."""
    octets = flat.astype(">u8").view(np.uint8).reshape(flat.size, 8)  # most significant first
    nibbles = np.empty((flat.size, 16), dtype=np.uint8)
    np.right_shift(octets, 4, out=nibbles[:, 0::2])
    np.bitwise_and(octets, 15, out=nibbles[:, 1::2])
    n_zero = np.bitwise_count(_lowest_bit(flat) - _U64(1)).astype(np.int32) >> 2
    return nibbles, n_zero


def to_token(ids: object) -> np.ndarray:
    """Official S2 tokens (hex, trailing zeros stripped; ``"X"`` for id 0), dtype ``<U16``."""
    ids = _as_ids(ids)
    flat = np.ravel(ids)
    nibbles, n_zero = _hex_digits(flat)
    codes = _HEX_CODEPOINTS[nibbles]
    # Strip the trailing zero digits (all 16 for id 0, which becomes "X").
    codes[np.arange(16)[None, :] >= (16 - n_zero)[:, None]] = 0  # NUL ends a numpy str
    out = codes.view(np.dtype("U16")).reshape(ids.shape)
    if (flat == 0).any():
        out[ids == 0] = "X"
    return out


_HEX_ASCII = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def to_token_utf8(ids: object) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of ``ids`` (flattened) as ``(offsets, data)``: int32 offsets (n + 1) into
    one uint8 array of their ASCII bytes, the buffers of an Arrow string array. Same tokens as
    ``to_token``, at about half its cost (no numpy str array, one byte per character)."""
    flat = np.ravel(_as_ids(ids))
    nibbles, n_zero = _hex_digits(flat)
    chars = _HEX_ASCII[nibbles]
    lengths = 16 - n_zero  # id 0 (no set bit) is "X"
    zero = flat == 0
    if zero.any():
        chars[zero, 0] = ord("X")
        lengths[zero] = 1
    offsets = np.zeros(flat.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, chars[np.arange(16, dtype=np.int32)[None, :] < lengths[:, None]]


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
