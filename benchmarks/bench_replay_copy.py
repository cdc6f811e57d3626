"""Cost of the LZ4 Arrow IPC replay copy that ``delta_store`` keeps of a streamed write.

Raster-like rows (122 channels x 16 x 16 float32, 2% non-zero) teed into the copy exactly as
``delta_store._ReplayableData`` does, timed alone; compare with the Delta write of the same rows.

    python benchmarks/bench_replay_copy.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa

ROWS, WIDTH = 20_000, 122 * 256


def main() -> None:
    rng = np.random.default_rng(0)
    values = np.zeros((ROWS, WIDTH), np.float32)
    mask = rng.random((ROWS, WIDTH)) < 0.02
    values[mask] = rng.random(int(mask.sum()))
    flat = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), WIDTH)
    table = pa.table(
        {"parent_l6": pa.array(["a"] * ROWS), "tensor": flat.cast(pa.list_(pa.float32()))}
    )
    print(f"rows {ROWS}, in memory {table.nbytes / 1e6:.0f} MB")
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    for _ in range(3):
        fd, path = tempfile.mkstemp(suffix=".arrows")
        os.close(fd)
        t0 = time.perf_counter()
        with pa.ipc.new_stream(path, table.schema, options=options) as writer:
            for batch in table.to_batches(2000):
                writer.write_batch(batch)
        seconds = time.perf_counter() - t0
        print(f"replay copy: {seconds:.2f} s, {os.path.getsize(path) / 1e6:.0f} MB on disk")
        os.unlink(path)


if __name__ == "__main__":
    main()
