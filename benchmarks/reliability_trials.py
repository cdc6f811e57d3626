"""Reliability trials that are too slow (or need root's ``mount``) for the test suite.

Each trial copies one data-layer root of the bundled extracts (city profile), breaks or
stresses it, runs the real ``s2vec`` command in a subprocess (its own process group, the root's
own Dagster instance) and checks the targets of docs/reliability.md: exit 0, 2 or 130 with one
``error:`` line; nothing lost (every partition's rows present afterwards, bit-identical after a
rerun); nothing left that blocks a later run; the root unchanged by a refused command. Prints
one line per trial and exits 1 when one missed its target.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/reliability_trials.py [--kills 3] [--only NAME]

Trials needing ``mount`` (a read-only root, a full disk) are skipped where it is not allowed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import psutil

DATA = ["osm_features", "cell_features", "raster_tiles"]
STAGES = ["--stages", "extract,features,raster"]
TRAIN = ["--stages", "train", "--epochs", "3"]  # interrupted in its first epochs, then resumed


def cli(root: Path, *args: str, wait: bool = True) -> subprocess.Popen | tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "s2vec_pipeline.cli", *args, "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    if not wait:
        return proc
    out, err = proc.communicate()
    return proc.returncode, out, err


def error_lines(err: str) -> list[str]:
    """stderr without progress lines (runs done, epochs)."""
    lines = [x.strip() for x in err.replace("\r", "\n").splitlines()]
    return [
        x
        for x in lines
        if x and not x.startswith(("[", "epoch ", "\x1b[K", "warning:", "profile ", "partitions"))
    ]


def table_digest(root: Path) -> dict[str, str]:
    """Per data table, a hash of its rows in a content-determined order."""
    out = {}
    for t in DATA:
        df = pl.read_delta(str(root / t))
        df = df.select(sorted(df.columns))
        key = [c for c in df.columns if not isinstance(df[c].dtype, pl.List | pl.Array)]
        df = df.sort(key)  # every scalar column: a total order on the rows
        # row hashes, not IPC bytes: those depend on how the strings were laid out in memory
        rows = df.hash_rows(seed=0).to_numpy()
        out[t] = hashlib.sha256(rows.tobytes()).hexdigest()[:12]
    return out


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "_dagster" not in p.parts and not p.name.endswith(".lock")
    }


def running_runs(root: Path) -> list[str]:
    """Jobs of the unfinished runs in the root's own instance (under its open lock: the CLI
    may be creating the instance's schemas)."""
    import dagster as dg

    from s2vec_pipeline.storage.locks import exclusive

    home = root / "_dagster"
    if not (home / "dagster.yaml").exists():
        return []
    with exclusive(home / ".open.lock"):
        instance = dg.DagsterInstance.local_temp(str(home))
    with instance:
        return [r.job_name for r in instance.get_runs() if not r.is_finished]


def child_pids(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


class Trials:
    def __init__(self, base: Path, work: Path) -> None:
        self.base, self.work, self.n = base, work, 0
        self.results: list[tuple[str, bool, str]] = []

    def fresh(self) -> Path:
        self.n += 1
        root = self.work / f"t{self.n}"
        shutil.copytree(self.base, root)
        return root

    def record(self, name: str, ok: bool, detail: str) -> None:
        self.results.append((name, ok, detail))
        print(f"{'ok  ' if ok else 'MISS'} {name:<44} {detail}", flush=True)

    # --- faults -------------------------------------------------------------------------

    def sigkill(self, kills: int) -> None:
        """SIGKILL a plain materialize at a random moment; status must show the run failed,
        a rerun must bring the tables back bit-identical."""
        want = table_digest(self.base)
        for i in range(kills):
            root = self.fresh()
            proc = cli(root, "materialize", *STAGES, "--force", wait=False)
            while not running_runs(root) and proc.poll() is None:
                time.sleep(0.2)
            time.sleep(random.uniform(0, 8))  # somewhere in the runs
            unfinished = running_runs(root)  # what the kill interrupts (a run may end meanwhile)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, out, _ = cli(root, "status")
            shown = "failed or interrupted runs" in out
            rc2, _, err2 = cli(root, "materialize", *STAGES)
            same = rc2 == 0 and table_digest(root) == want
            self.record(
                f"SIGKILL during materialize #{i + 1}",
                rc == 0 and (shown or not unfinished) and same,
                f"killed during {unfinished or 'no run'}; status rc {rc} (killed run shown: "
                f"{shown}), rerun rc {rc2}, tables "
                f"{'bit-identical' if same else 'DIFFER'} {error_lines(err2)[:1]}",
            )

    def interrupt(self, what: str, args: list[str], ready: Callable[[subprocess.Popen], bool]):
        root = self.fresh()
        proc = cli(root, *args, wait=False)
        deadline = time.monotonic() + 300
        while not ready(proc) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate()
        lines = error_lines(err)
        ok = proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err
        rc2, _, err2 = cli(root, *args)
        self.record(
            f"Ctrl-C during {what}",
            ok and rc2 == 0,
            f"rc {proc.returncode}, {len(lines)} line(s) {lines[:1]}; rerun rc {rc2}",
        )

    def read_only_root(self) -> None:
        root = self.fresh()
        assert cli(root, "status")[0] == 0  # its instance exists
        ro = self.work / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "--bind", str(root), str(ro)]).returncode:
            self.record("status on a read-only root", True, "skipped: mount not allowed")
            return
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            rc, out, err = cli(ro, "status")
            self.record("status on a read-only root", rc == 0, f"rc {rc} {error_lines(err)[:1]}")
            rc, out, err = cli(ro, "materialize", *STAGES, "--force")
            lines = error_lines(err)
            self.record(
                "materialize on a read-only root",
                rc == 2 and len(lines) == 1,
                f"rc {rc} {lines[:1]}",
            )
        finally:
            subprocess.run(["umount", str(ro)])

    def full_disk(self, size: str, args: list[str], what: str) -> None:
        self.n += 1
        disk = self.work / f"disk{self.n}"
        disk.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]
        ).returncode:
            self.record(f"full disk: {what}", True, "skipped: mount not allowed")
            return
        try:
            root = disk / "root"
            rc, _, err = cli(root, "materialize", *args)
            lines = error_lines(err)
            self.record(
                f"full disk ({size}): {what}",
                rc == 2 and len(lines) == 1 and str(disk) in lines[0],
                f"rc {rc} {lines[:1]}",
            )
        finally:
            subprocess.run(["umount", str(disk)])

    def concurrent(self) -> None:
        """Two plain materializations of one root at once, then status."""
        root = self.fresh()
        procs = [cli(root, "materialize", *STAGES, "--force", wait=False) for _ in range(2)]
        codes = [p.wait() for p in procs]
        same = table_digest(root) == table_digest(self.base)
        self.record(
            "two materialize --force at once",
            codes == [0, 0] and same,
            f"rc {codes}, tables {'bit-identical' if same else 'DIFFER'}",
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=3, help="SIGKILL trials")
    p.add_argument(
        "--only", default=None, help="comma-separated: run the trials whose name contains one"
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s2vec-trials-"))
    base = work / "base"
    t0 = time.perf_counter()
    rc, _, err = cli(base, "materialize", *STAGES)
    assert rc == 0, err
    print(f"base root built in {time.perf_counter() - t0:.0f} s; load {os.getloadavg()}")
    trials = Trials(base, work)
    plan: dict[str, Callable[[], None]] = {
        "sigkill": lambda: trials.sigkill(args.kills),
        "ctrl-c extraction": lambda: trials.interrupt(
            "extraction workers",
            ["materialize", *STAGES, "--force", "--workers", "2"],
            lambda proc: len(child_pids(proc.pid)) >= 2,
        ),
        "ctrl-c training": lambda: trials.interrupt(
            "training",
            ["materialize", *TRAIN],
            lambda proc: (trials.work / f"t{trials.n}" / "models").exists(),
        ),
        "read-only": trials.read_only_root,
        # the data layer of the bundled extracts fits in 3 MB; the first checkpoint does not
        "full disk training": lambda: trials.full_disk(
            "3m", ["--stages", "extract,features,raster,train", "--epochs", "1"], "training"
        ),
        "concurrent": trials.concurrent,
    }
    for name, run in plan.items():
        if args.only is None or any(w in name for w in args.only.split(",")):
            run()
    missed = [r for r in trials.results if not r[1]]
    print(
        f"\n{len(trials.results) - len(missed)} of {len(trials.results)} trials met their "
        f"target; load {os.getloadavg()}; {time.perf_counter() - t0:.0f} s"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
