"""Top-k cosine similarity over a Delta table of embeddings: which SQL engine is fast enough?

Writes N synthetic embeddings (default 1,000,000 x 256, float32, as ``list<float32>``) into a
``cell_embeddings`` Delta table (kept under ``--root`` for reruns), then times the same top-10
query in each engine and prints a markdown table (median of ``--repeats`` runs after one
warm-up):

- DuckDB over ``DeltaTable.to_pyarrow_dataset()`` with a ``SubTreeFileSystem`` (what
  the sql module uses), with ``list_cosine_similarity`` and ``array_cosine_similarity``,
  the query vector as a parameter and looked up by token inside the query (the recipe);
- DataFusion through deltalake's ``QueryBuilder`` with ``cosine_distance``;
- polars SQL (no cosine function: reported as not expressible).

    python benchmarks/bench_sql.py --rows 1000000 --dim 256 --root /tmp/s2vec_bench_sql
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s2vec_pipeline.analysis.sql import SIMILAR_CELLS_SQL, run_sql  # noqa: E402
from s2vec_pipeline.storage import delta_store  # noqa: E402

TABLE = "cell_embeddings"


def make_table(root: Path, rows: int, dim: int, partitions: int, seed: int = 0) -> None:
    """Write the synthetic table in chunks (memory stays ~ one chunk)."""
    rng = np.random.default_rng(seed)
    keys = [f"{0x4690 + 2 * i:04x}" for i in range(partitions)]
    per = -(-rows // partitions)
    for p, key in enumerate(keys):
        n = min(per, rows - p * per)
        if n <= 0:
            break
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        ids = (np.int64(p) << 40) + np.arange(n, dtype=np.int64) * 2 + 1
        offsets = np.arange(0, n * dim + 1, dim, dtype=np.int32)
        table = pa.table(
            {
                "parent_l6": pa.array([key] * n, pa.string()),
                "image_token": pa.array([f"{key}{i // 256:06x}" for i in range(n)]),
                "cell_token": pa.array([f"{i:016x}" for i in ids]),
                "cell_id": pa.array(ids, pa.int64()),
                "level": pa.array(np.full(n, 17, np.int8)),
                "model_version": pa.array(["bench"] * n),
                "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(emb.ravel())),
            }
        )
        delta_store.write_partitions(root, TABLE, table, [key], {"table": TABLE, "bench": dim})


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (file cache, plan caches)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--root", type=Path, default=Path("/tmp/s2vec_bench_sql"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    root = args.root / f"{args.rows}x{args.dim}"
    if not delta_store.table_exists(root, TABLE):
        t0 = time.perf_counter()
        make_table(root, args.rows, args.dim, args.partitions)
        print(f"wrote {args.rows:,} x {args.dim} embeddings in {time.perf_counter() - t0:.1f} s")
    size = sum(f.stat().st_size for f in (root / TABLE).rglob("*.parquet"))
    print(f"table: {root / TABLE} ({size / 2**20:.0f} MiB of Parquet)")

    token = delta_store.read_partitions(root, TABLE, columns=["cell_token"]).row(12345)[0]
    qvec = (
        delta_store.scan_table(root, TABLE)
        .filter(delta_store.pl.col("cell_token") == token)
        .select("embedding")
        .collect()
        .item(0, 0)
        .to_list()
    )
    d = args.dim
    results: list[tuple[str, str, float | None, str]] = []

    def record(engine: str, how: str, fn) -> None:
        try:
            t, out = timed(fn, args.repeats)
            top = pa.table(out) if not isinstance(out, pa.Table) else out
            first = top.column(0)[0].as_py()
            ok = "yes" if first == token else f"NO (top-1 {first})"
            results.append((engine, how, t, ok))
        except Exception as e:  # noqa: BLE001 - report every engine, whatever fails
            results.append((engine, how, None, f"error: {str(e).splitlines()[0][:80]}"))

    # DuckDB through s2vec_pipeline.analysis.sql (pyarrow dataset with SubTreeFileSystem).
    q_list = (
        f"SELECT cell_token, list_cosine_similarity(embedding, $q::FLOAT[]) AS similarity "
        f"FROM {TABLE} ORDER BY similarity DESC LIMIT 10"
    )
    q_array = (
        f"SELECT cell_token, array_cosine_similarity(embedding::FLOAT[{d}], $q::FLOAT[{d}]) "
        f"AS similarity FROM {TABLE} ORDER BY similarity DESC LIMIT 10"
    )
    record(
        "DuckDB",
        "list_cosine_similarity, vector as parameter",
        lambda: run_sql(root, q_list, params={"q": qvec}),
    )
    record(
        "DuckDB",
        "array_cosine_similarity (cast to FLOAT[d]), parameter",
        lambda: run_sql(root, q_array, params={"q": qvec}),
    )
    record(
        "DuckDB",
        "recipe SIMILAR_CELLS_SQL (query cell looked up by token)",
        lambda: run_sql(root, SIMILAR_CELLS_SQL, params={"cell_token": token, "k": 10}),
    )

    # One session, the table cached in DuckDB memory: load once, then query repeatedly.
    from s2vec_pipeline.analysis.sql import SQLSession

    t0 = time.perf_counter()
    session = SQLSession(root, cache=[TABLE])
    load_s = time.perf_counter() - t0
    record(
        "DuckDB",
        f"SQLSession(cache=[{TABLE!r}]): per query, after a one-off load of {load_s:.1f} s",
        lambda: session.sql(q_list, params={"q": qvec}),
    )
    record(
        "DuckDB",
        "SQLSession cached: recipe SIMILAR_CELLS_SQL",
        lambda: session.sql(SIMILAR_CELLS_SQL, params={"cell_token": token, "k": 10}),
    )

    # Thread scaling, and DuckDB over a pyarrow dataset instead of its own Parquet reader.
    import duckdb

    from s2vec_pipeline.analysis.sql import _register_delta

    def duckdb_with(threads: int, native: bool):
        con = duckdb.connect(config={"threads": threads})
        if native:
            _register_delta(con, root, TABLE)
        else:
            con.register(TABLE, delta_store.dataset(root, TABLE))
        try:
            return con.sql(q_list, params={"q": qvec}).to_arrow_table()
        finally:
            con.close()

    cores = os.cpu_count() or 1
    for n in sorted({1, cores}):
        record(
            "DuckDB",
            f"list_cosine_similarity, own Parquet reader, {n} thread(s)",
            lambda n=n: duckdb_with(n, True),
        )
    record(
        "DuckDB",
        f"list_cosine_similarity over to_pyarrow_dataset() (SubTreeFileSystem), {cores} threads",
        lambda: duckdb_with(cores, False),
    )

    def floor():
        emb = delta_store.dataset(root, TABLE).to_table(columns=["cell_token", "embedding"])
        return pa.table({"cell_token": [token]}) if emb.num_rows else emb

    record("(floor) pyarrow", "decode cell_token + embedding columns only, no query", floor)
    session.close()

    # DataFusion via deltalake's QueryBuilder.
    from deltalake import DeltaTable, QueryBuilder

    literal = "make_array(" + ",".join(f"{x:.9g}" for x in qvec) + ")"
    q_df = (
        f"SELECT cell_token, 1 - cosine_distance(embedding, {literal}) AS similarity "
        f"FROM {TABLE} ORDER BY similarity DESC LIMIT 10"
    )
    q_df_self = (
        f"SELECT c.cell_token, 1 - cosine_distance(c.embedding, q.embedding) AS similarity "
        f"FROM {TABLE} c, (SELECT embedding FROM {TABLE} WHERE cell_token = '{token}') q "
        f"ORDER BY similarity DESC LIMIT 10"
    )

    def datafusion(q: str):
        qb = QueryBuilder().register(TABLE, DeltaTable(str(root / TABLE)))
        return pa.table(qb.execute(q).read_all())

    record(
        "DataFusion (QueryBuilder)", "cosine_distance, vector as literal", lambda: datafusion(q_df)
    )
    record(
        "DataFusion (QueryBuilder)",
        "cosine_distance, query cell looked up by token",
        lambda: datafusion(q_df_self),
    )

    # polars SQL: no cosine / list arithmetic function in its SQL dialect.
    def polars_sql():
        import polars as pl

        ctx = pl.SQLContext({TABLE: delta_store.scan_table(root, TABLE)})
        return (
            ctx.execute(
                "SELECT cell_token, list_cosine_similarity(embedding, embedding) AS s "
                f"FROM {TABLE} "
                "ORDER BY s DESC LIMIT 10"
            )
            .collect()
            .to_arrow()
        )

    record("polars SQL", "list_cosine_similarity (not in its dialect)", polars_sql)

    print(
        f"\nTop-10 cosine over {args.rows:,} x {d} float32 embeddings, median of "
        f"{args.repeats} warm runs, {os.cpu_count()} CPU cores\n"
    )
    print(
        "DuckDB rows without a reader named use run_sql: DuckDB's own Parquet reader over the "
        "Delta log's current file list.\n"
    )
    print("| engine | query | seconds | top-1 is the query cell |")
    print("|---|---|---:|---|")
    for engine, how, t, ok in results:
        print(f"| {engine} | {how} | {'—' if t is None else f'{t:.2f}'} | {ok} |")


if __name__ == "__main__":
    main()
