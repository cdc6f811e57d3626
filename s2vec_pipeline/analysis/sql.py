"""SQL over the pipeline's Delta tables (DuckDB), plus the documented query recipes.

Every Delta table directly under the storage root is a SQL table named after its directory
(``cell_embeddings``, ``image_embeddings``, ``cell_features``, ``raster_tiles``,
``osm_features``...), as a view over the files of the table's current Delta snapshot read by
DuckDB's own multi-threaded Parquet reader (partition values from the paths, kept as text):
column projections and ``parent_l6`` filters are pushed down, so a query reads only the
partitions and columns it needs. ``SQLSession`` keeps one connection for many queries and can
cache tables in memory.

Why DuckDB: measured in ``benchmarks/bench_sql.py`` against DataFusion (deltalake's
``QueryBuilder``) and polars SQL, it was the fastest on top-k cosine similarity, it has
``list_cosine_similarity`` in SQL (polars SQL has no cosine at all), and it can join a user's
Parquet/CSV file, which ``QueryBuilder`` cannot register. A full scan of 1M×256 embeddings is
bound by decoding the ``list<float32>`` Parquet column (~1.5-2 s on 2 cores, in every engine);
cached in a session the same top-10 takes ~0.3 s.

The recipes below are the exact SQL the docs show; the convenience functions run them.
Parameters are DuckDB named parameters (``$name``), passed with ``params=``.

Two S2 functions are registered in every session for the recipes on cells of images without
data: ``s2_parent_token(token, level)`` (the ancestor's token) and ``s2_child_index(token,
level)`` (row·S + col of the cell inside its ancestor at ``level``, S = 2^(cell level -
level): the ``pixel`` of ``empty_image_embeddings`` when ``level`` is the image level).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from s2vec_pipeline.errors import DamagedTableError, InvalidCellError, S2VecError
from s2vec_pipeline.storage import delta_store, fs

ENGINE = "duckdb"
EMBEDDING_TABLES = ("cell_embeddings", "image_embeddings")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"^[0-9a-f]{1,16}$")
_TEXT_COLUMNS = ("cell_token", "image_token", "parent_l6", "model_version")


class SQLError(S2VecError):
    """A query failed: invalid SQL, an unknown column or function, bad parameters."""


class UnknownTableError(SQLError):
    """A query names a table that is neither a Delta table under the root nor an extra table."""


class NoTablesError(SQLError):
    """The storage root holds no Delta table to query."""


# --- Recipes (DuckDB SQL; the docs quote these constants) ---------------------------------

#: Embeddings of one region given by its level-6 partition token (``$parent_l6``).
REGION_BY_PARENT_SQL = """\
SELECT parent_l6, image_token, cell_token, cell_id, level, model_version, embedding
FROM cell_embeddings
WHERE parent_l6 = $parent_l6
ORDER BY cell_token"""

#: Embeddings of the cells inside a region given as S2 cell tokens of any level at or above
#: the pixel level (a covering). ``region(id_min, id_max)`` holds each token's range of
#: descendant ids (signed int64, like ``cell_id``); ``region_embeddings`` builds it.
REGION_BY_TOKENS_SQL = """\
SELECT e.parent_l6, e.image_token, e.cell_token, e.cell_id, e.level, e.model_version,
       e.embedding
FROM cell_embeddings AS e
WHERE EXISTS (SELECT 1 FROM region AS r WHERE e.cell_id BETWEEN r.id_min AND r.id_max)
ORDER BY e.cell_token"""

#: The ``$k`` cells most similar to cell ``$cell_token`` by cosine similarity of their
#: embeddings, among cells embedded by the same model version. The cell itself comes first
#: (similarity 1).
SIMILAR_CELLS_SQL = """\
WITH query AS (
    SELECT embedding, model_version FROM cell_embeddings WHERE cell_token = $cell_token LIMIT 1
)
SELECT c.cell_token, c.image_token, c.parent_l6, c.level,
       list_cosine_similarity(c.embedding, query.embedding) AS similarity
FROM cell_embeddings AS c, query
WHERE c.model_version = query.model_version
ORDER BY similarity DESC, c.cell_token
LIMIT $k"""

#: The same for whole images (one embedding per image: the mean of its pixel embeddings).
SIMILAR_IMAGES_SQL = SIMILAR_CELLS_SQL.replace("cell_embeddings", "image_embeddings")

#: A user's labels (any table ``labels`` with a ``cell_token`` column, e.g. a CSV passed as
#: ``extra_tables={"labels": "labels.csv"}``) joined to the cell embeddings.
LABEL_JOIN_SQL = """\
SELECT l.*, e.level, e.model_version, e.embedding
FROM labels AS l
JOIN cell_embeddings AS e ON e.cell_token = l.cell_token
ORDER BY l.cell_token"""


#: Every labelled pixel cell (``labels`` with a ``cell_token`` column) of a partition embedded
#: with model ``$model_version``, with its embedding: the cell's row of ``cell_embeddings``
#: when its image has data, else the empty image's embedding at the cell's position
#: (``$image_level``: the root's image level, 13 in the city profile). Cells outside every
#: embedded partition have no ``empty_image_embeddings`` row and come out with a NULL
#: embedding (``embedded`` false): never silently dropped.
ANY_CELL_JOIN_SQL = """\
SELECT l.*, coalesce(e.embedding, x.embedding) AS embedding,
       e.cell_token IS NOT NULL AS image_has_data, x.parent_l6 IS NOT NULL AS embedded
FROM labels AS l
LEFT JOIN empty_image_embeddings AS x
  ON x.model_version = $model_version
 AND x.parent_l6 = s2_parent_token(l.cell_token, 6)
 AND x.pixel = s2_child_index(l.cell_token, $image_level)
LEFT JOIN cell_embeddings AS e
  ON e.model_version = $model_version AND e.cell_token = l.cell_token
ORDER BY l.cell_token"""

#: Area-weighted pooling of pixel embeddings per area: ``area_cells(area_index, cell_token,
#: area_m2)`` holds each area's pixel cells and the square metres of the area inside each
#: (``s2vec pool --cells-out``). Each dimension is sum(area_m2 * value) / sum(area_m2) over the
#: area's cells of embedded partitions; ``covered_m2`` (vs ``area_m2``) shows any part outside.
AREA_POOL_SQL = """\
WITH cells AS (
    SELECT a.area_index, a.area_m2, x.parent_l6 IS NOT NULL AS embedded,
           coalesce(e.embedding, x.embedding) AS embedding
    FROM area_cells AS a
    LEFT JOIN empty_image_embeddings AS x
      ON x.model_version = $model_version
     AND x.parent_l6 = s2_parent_token(a.cell_token, 6)
     AND x.pixel = s2_child_index(a.cell_token, $image_level)
    LEFT JOIN cell_embeddings AS e
      ON e.model_version = $model_version AND e.cell_token = a.cell_token
),
dims AS (
    SELECT area_index, area_m2, unnest(embedding) AS v, unnest(range(len(embedding))) AS k
    FROM cells WHERE embedded
),
pooled AS (
    SELECT area_index, k, sum(area_m2 * v) / sum(area_m2) AS v FROM dims GROUP BY ALL
),
sizes AS (
    SELECT area_index, sum(area_m2) AS area_m2,
           sum(CASE WHEN embedded THEN area_m2 ELSE 0 END) AS covered_m2
    FROM cells GROUP BY ALL
)
SELECT s.area_index, s.area_m2, s.covered_m2,
       (SELECT list(p.v ORDER BY p.k) FROM pooled AS p WHERE p.area_index = s.area_index)
         AS embedding
FROM sizes AS s
ORDER BY s.area_index"""


# --- Engine -------------------------------------------------------------------------------

TableSource = str | os.PathLike | pa.Table | pl.DataFrame


def list_tables(root: str | os.PathLike) -> list[str]:
    """Names of the Delta tables directly under ``root`` that are plain SQL identifiers (what
    ``run_sql`` can query)."""
    return [n for n in delta_store.list_tables(root) if _IDENTIFIER.match(n)]


def _quote(text: str, quote: str = "'") -> str:
    """A SQL string literal (') or identifier (\") with the quote doubled inside."""
    return quote + text.replace(quote, quote * 2) + quote


def _register_delta(
    con: duckdb.DuckDBPyConnection, root: str | os.PathLike, name: str, view: str | None = None
) -> None:
    """A view over the table's current files with DuckDB's own (multi-threaded) Parquet reader.

    The file list comes from the Delta log (the current snapshot, never stale or staging
    files); partition values come from the ``key=value`` paths, kept as text. An empty table
    is registered through its pyarrow dataset, which still has the schema.
    """
    view = view or name
    files = delta_store.data_files(root, name)
    if not files or fs.is_object_store(root):
        # DuckDB reads s3:// only through its httpfs extension, which it would download:
        # object-store tables are read through pyarrow (the same snapshot's files).
        con.register(view, delta_store.dataset(root, name))
        return
    columns = ", ".join(_quote(c, '"') for c in delta_store.table_schema(root, name).names)
    file_list = "[" + ", ".join(_quote(f) for f in files) + "]"
    quoted = _quote(view, '"')
    con.execute(
        f"CREATE VIEW {quoted} AS SELECT {columns} FROM read_parquet({file_list}, "
        "hive_partitioning = true, hive_types_autocast = false, union_by_name = true)"
    )


@contextlib.contextmanager
def _as_damage(root: str | os.PathLike, name: str) -> Iterator[None]:
    """DuckDB failing on a table's files while registering it: the table is damaged."""
    try:
        yield
    except duckdb.IOException as e:
        with delta_store.readable(root, name):
            raise FileNotFoundError(str(e).splitlines()[0]) from e


def _read_extra(con: duckdb.DuckDBPyConnection, name: str, source: TableSource) -> pa.Table:
    if isinstance(source, pl.DataFrame):
        return source.to_arrow()
    if isinstance(source, pa.Table):
        return source
    path = Path(source)
    if not path.is_file():
        raise SQLError(f"extra table {name!r}: file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return con.read_parquet(str(path)).to_arrow_table()
    if suffix in (".csv", ".tsv", ".txt"):
        # Tokens such as "4693" look like numbers to a CSV sniffer: keep token columns text.
        with path.open(newline="") as f:
            header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
        dtypes = {c: "VARCHAR" for c in header if c in _TEXT_COLUMNS}
        return con.read_csv(str(path), dtype=dtypes or None).to_arrow_table()
    raise SQLError(
        f"extra table {name!r}: unsupported file type {suffix!r} for {path}; "
        "give a .parquet, .csv or .tsv file, a pyarrow Table or a polars DataFrame"
    )


def _token_ids(tokens: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 ids, valid mask) of a token column; nulls are invalid."""
    from s2vec_pipeline.cells import s2

    text = np.asarray(tokens.to_pylist(), dtype=object)
    valid = np.array([t is not None for t in text], dtype=bool)
    ids = np.zeros(len(text), dtype=np.uint64)
    if valid.any():
        ids[valid] = s2.from_token(text[valid].astype(str))
    return ids, valid


def _one_level(levels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(levels.to_numpy(zero_copy_only=False), dtype=np.int64)


def _s2_parent_token(tokens: pa.Array, levels: pa.Array) -> pa.Array:
    from s2vec_pipeline.cells import s2

    ids, valid = _token_ids(tokens)
    lv = _one_level(levels)
    out = np.full(len(ids), None, dtype=object)
    for level in np.unique(lv[valid]):
        sel = valid & (lv == level)
        out[sel] = s2.to_token(s2.parent(ids[sel], int(level)))
    return pa.array(out.tolist(), pa.string())


def _s2_child_index(tokens: pa.Array, levels: pa.Array) -> pa.Array:
    from s2vec_pipeline.cells import s2

    ids, valid = _token_ids(tokens)
    lv = _one_level(levels)
    out = np.zeros(len(ids), dtype=np.int64)
    if valid.any():
        cell_level = s2.cell_level(ids[valid])
        for level in np.unique(lv[valid]):
            sel = lv[valid] == level
            row, col = s2.child_position(ids[valid][sel], int(level))
            side = np.int64(1) << (cell_level[sel] - int(level))
            out[np.flatnonzero(valid)[sel]] = row * side + col
    return pa.array(out, pa.int64(), mask=~valid)


def _register_s2_functions(con: duckdb.DuckDBPyConnection) -> None:
    """``s2_parent_token`` and ``s2_child_index`` (vectorized over Arrow; NULL in, NULL out)."""
    for name, fn, result in (
        ("s2_parent_token", _s2_parent_token, "VARCHAR"),
        ("s2_child_index", _s2_child_index, "BIGINT"),
    ):
        con.create_function(
            name, fn, ["VARCHAR", "INTEGER"], result, type="arrow", null_handling="special"
        )


class SQLSession:
    """One DuckDB connection over the Delta tables under ``root``, for many queries.

    ``cache`` names tables to load into DuckDB's memory once (a snapshot taken now): the
    first load costs a full read, later queries skip Parquet decoding (top-10 cosine over
    1M×256 drops from ~2 s to ~0.3 s on 2 cores, see ``benchmarks/bench_sql.py``).
    Other tables are read from Delta at each query. Use as a context manager.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        extra_tables: Mapping[str, TableSource] | None = None,
        cache: Sequence[str] = (),
        allow_external: bool = False,
    ) -> None:
        self.root = root
        self.allow_external = allow_external
        self.delta_tables = list_tables(root)
        extra = dict(extra_tables or {})
        if not self.delta_tables and not extra:
            raise NoTablesError(
                f"no Delta tables under {root}: run s2vec materialize --root {root} first, or "
                "point --root at an existing storage root"
            )
        unknown = [t for t in cache if t not in self.delta_tables]
        if unknown:
            raise UnknownTableError(
                f"cannot cache {', '.join(unknown)}: not Delta tables under {root} "
                f"(tables: {', '.join(self.delta_tables) or 'none'})"
            )
        self.extra: list[str] = []
        # tables that cannot be read: left out, named when a query needs them
        self.damaged: dict[str, DamagedTableError] = {}
        self.con = duckdb.connect()
        try:
            _register_s2_functions(self.con)
            for name in self.delta_tables:
                try:
                    with delta_store.readable(root, name), _as_damage(root, name):
                        if name in cache:
                            _register_delta(self.con, root, name, view=f"_delta_{name}")
                            self.con.execute(
                                f'CREATE TABLE "{name}" AS SELECT * FROM "_delta_{name}"'
                            )
                            self.con.execute(f'DROP VIEW "_delta_{name}"')
                        else:
                            _register_delta(self.con, root, name)
                except DamagedTableError as e:
                    self.damaged[name] = e
            self.delta_tables = [t for t in self.delta_tables if t not in self.damaged]
            for name, source in extra.items():
                self.register(name, source)
            if not allow_external:
                self._confine()
        except BaseException:
            self.con.close()
            raise

    def _confine(self) -> None:
        """From now on DuckDB reads only the root's tables' current files: no other file, no
        URL, no file writing (``COPY … TO``, ``ATTACH``, ``EXPORT``), and no ``SET`` to undo it.
        Extra tables were read into memory before, and ``--out`` is written by Python."""
        files: list[str] = []
        if not fs.is_object_store(self.root):
            for name in self.delta_tables:
                files += delta_store.data_files(self.root, name)
        self.con.execute("SET allowed_paths = ?", [files])
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    @property
    def tables(self) -> list[str]:
        """Every table a query can name."""
        return self.delta_tables + sorted(self.extra)

    def register(self, name: str, source: TableSource) -> None:
        """Add a table of your own: Parquet/CSV path, pyarrow Table or polars DataFrame."""
        if not _IDENTIFIER.match(name):
            raise SQLError(f"extra table name {name!r} is not a plain SQL identifier")
        if name in self.delta_tables:
            raise SQLError(
                f"extra table {name!r} would hide the Delta table of the same name under "
                f"{self.root}: choose another name"
            )
        # a connection of its own: this session's may be confined to the root's files
        with duckdb.connect() as reader:
            self.con.register(name, _read_extra(reader, name, source))
        if name not in self.extra:
            self.extra.append(name)

    def unregister(self, name: str) -> None:
        if name in self.extra:
            self.con.unregister(name)
            self.extra.remove(name)

    def sql(self, query: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run one query; ``params`` binds ``$name`` parameters. Returns a pyarrow Table."""
        available = ", ".join(self.tables)
        if not self.allow_external:
            _refuse_side_effects(query)
        named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query))
        for name, error in self.damaged.items():
            if name in named:
                raise error
        try:
            rel = self.con.sql(query, params=dict(params) if params else None)
            return rel.to_arrow_table() if rel is not None else pa.table({})
        except duckdb.PermissionException as e:  # the confinement of _confine
            first = str(e).splitlines()[0]
            raise SQLError(
                f"{first.removeprefix('Permission Error: ')}: s2vec sql reads only the tables "
                f"under the root (and --table files) and writes only --out; --allow-external "
                f"lifts this"
            ) from e
        except duckdb.IOException as e:  # a data file gone since the table was registered
            for name in self.delta_tables:
                if f"/{name}/" in str(e):
                    with delta_store.readable(self.root, name):
                        raise FileNotFoundError(str(e).splitlines()[0]) from e
            raise SQLError(f"query failed in {ENGINE}: {e}") from e
        except duckdb.CatalogException as e:
            raise UnknownTableError(
                f"{ENGINE}: {e}\nTables you can query under {self.root}: {available}"
            ) from e
        except duckdb.Error as e:
            raise SQLError(
                f"query failed in {ENGINE}: {e}\nTables you can query under {self.root}: "
                f"{available}"
            ) from e

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> SQLSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Statements that write files, reach outside the root or change the engine: refused unless
#: the session allows external access (DuckDB's own confinement refuses most of them too).
_REFUSED_STATEMENTS = {"COPY", "ATTACH", "DETACH", "EXPORT", "LOAD"}  # LOAD: also INSTALL


def _refuse_side_effects(query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error:
        return  # not SQL: the query itself fails with the engine's message and the tables
    for st in statements:
        kind = st.type.name
        if kind in _REFUSED_STATEMENTS:
            raise SQLError(
                f"{kind} statements are refused: s2vec sql reads only the tables under the root "
                f"(write results with --out; --allow-external lifts this)"
            )


def run_sql(
    root: str | os.PathLike,
    query: str,
    params: Mapping[str, Any] | None = None,
    extra_tables: Mapping[str, TableSource] | None = None,
    allow_external: bool = False,
) -> pa.Table:
    """Run one DuckDB query over the Delta tables under ``root``; returns a pyarrow Table.

    ``params`` binds ``$name`` parameters. ``extra_tables`` adds tables of your own by name:
    a Parquet or CSV path, a pyarrow Table or a polars DataFrame (e.g. labels to join by
    ``cell_token``). Errors name the engine's message and the tables that exist. For many
    queries use one ``SQLSession`` (optionally with cached tables).
    """
    with SQLSession(root, extra_tables, allow_external=allow_external) as session:
        return session.sql(query, params)


Target = str | os.PathLike | SQLSession


def _run(
    target: Target,
    query: str,
    params: Mapping[str, Any] | None = None,
    extra_tables: Mapping[str, TableSource] | None = None,
) -> pa.Table:
    """Run on a root (one-shot) or on an open session (extra tables added for this query)."""
    if not isinstance(target, SQLSession):
        return run_sql(target, query, params, extra_tables)
    added = []
    try:
        for name, source in (extra_tables or {}).items():
            if name in target.extra:
                raise SQLError(f"the session already has a table {name!r}")
            target.register(name, source)
            added.append(name)
        return target.sql(query, params)
    finally:
        for name in added:
            target.unregister(name)


def _root(target: Target) -> str | os.PathLike:
    return target.root if isinstance(target, SQLSession) else target


# --- Convenience functions: exactly the recipes -------------------------------------------


def _check_table(table: str) -> str:
    if table not in EMBEDDING_TABLES:
        raise SQLError(f"table must be one of {EMBEDDING_TABLES}, not {table!r}")
    return table


def _check_tokens(tokens: Sequence[str]) -> list[str]:
    bad = [t for t in tokens if not (isinstance(t, str) and _TOKEN.match(t)) or t.strip("0") == ""]
    if bad:
        raise InvalidCellError(
            f"not S2 cell tokens: {bad[:5]} (tokens are 1-16 lowercase hex digits, e.g. '4693')"
        )
    return list(tokens)


def token_ranges(tokens: Sequence[str]) -> pa.Table:
    """``(token, id_min, id_max)``: the signed-int64 id range of each token's descendants."""
    ids = np.array([int(t.ljust(16, "0"), 16) for t in _check_tokens(tokens)], dtype=np.uint64)
    lsb = ids & (~ids + np.uint64(1))  # lowest set bit = the level marker
    bad = [
        t
        for t, b, i in zip(tokens, lsb, ids, strict=True)
        if int(b).bit_length() % 2 == 0 or int(i) >> 61 > 5
    ]
    if bad:
        raise InvalidCellError(f"not valid S2 cell tokens: {bad[:5]}")
    lo = (ids - (lsb - np.uint64(1))).view(np.int64)
    hi = (ids + (lsb - np.uint64(1))).view(np.int64)
    return pa.table({"token": list(tokens), "id_min": lo, "id_max": hi})


def similar_cells(
    root: Target, cell_token: str, k: int = 10, table: str = "cell_embeddings"
) -> pa.Table:
    """The ``k`` most similar cells (or images, with ``table="image_embeddings"``) by cosine."""
    _check_tokens([cell_token])
    if k < 1:
        raise SQLError(f"k must be at least 1, not {k}")
    sql = SIMILAR_CELLS_SQL if _check_table(table) == "cell_embeddings" else SIMILAR_IMAGES_SQL
    out = _run(root, sql, params={"cell_token": cell_token, "k": k})
    if out.num_rows == 0:
        raise InvalidCellError(
            f"cell {cell_token!r} has no embedding in {table} under {_root(root)}: embed its "
            "partition first, or check the token's level (pixel level for cell_embeddings, "
            "image level for image_embeddings)"
        )
    return out


def region_embeddings(
    root: Target,
    parent_l6: str | None = None,
    tokens: Sequence[str] | None = None,
    table: str = "cell_embeddings",
) -> pa.Table:
    """Embeddings of a region: one level-6 partition, or the cells inside a list of tokens."""
    if (parent_l6 is None) == (tokens is None):
        raise SQLError("give exactly one of parent_l6 (a level-6 token) or tokens (a covering)")
    _check_table(table)
    if parent_l6 is not None:
        _check_tokens([parent_l6])
        sql = REGION_BY_PARENT_SQL.replace("cell_embeddings", table)
        return _run(root, sql, params={"parent_l6": parent_l6})
    sql = REGION_BY_TOKENS_SQL.replace("cell_embeddings", table)
    return _run(root, sql, extra_tables={"region": token_ranges(list(tokens or []))})


def join_labels(root: Target, labels: TableSource, table: str = "cell_embeddings") -> pa.Table:
    """Your labels (Parquet/CSV path or table with a ``cell_token`` column) with embeddings."""
    sql = LABEL_JOIN_SQL.replace("cell_embeddings", _check_table(table))
    return _run(root, sql, extra_tables={"labels": labels})


def join_labels_any_cell(
    root: Target, labels: TableSource, model_version: str, image_level: int
) -> pa.Table:
    """``ANY_CELL_JOIN_SQL``: every labelled pixel cell with its embedding of
    ``model_version``, cells of images without data included (NULL only outside every
    embedded partition)."""
    params = {"model_version": model_version, "image_level": int(image_level)}
    return _run(root, ANY_CELL_JOIN_SQL, params=params, extra_tables={"labels": labels})


def pool_areas_sql(
    root: Target, area_cells: TableSource, model_version: str, image_level: int
) -> pa.Table:
    """``AREA_POOL_SQL``: area-weighted mean embedding per ``area_index`` of ``area_cells``."""
    params = {"model_version": model_version, "image_level": int(image_level)}
    return _run(root, AREA_POOL_SQL, params=params, extra_tables={"area_cells": area_cells})
