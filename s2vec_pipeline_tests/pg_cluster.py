"""A throwaway PostgreSQL cluster for the deployment tests: ``initdb`` + ``pg_ctl`` under a
temporary folder, listening on a loopback port, with password (scram) authentication over TCP
so wrong credentials really fail. As root, the server runs as the ``postgres`` user (``initdb``
refuses root). ``make test`` (``.ci/test_tools.sh``) installs the server where it is missing."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "postgres"  # the Debian package's system user, used when we run as root
SUPERUSER = "dagster"
START_TIMEOUT_S = 60


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned folder."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if debian:
        return Path(debian[-1]).parent
    raise RuntimeError(
        "no PostgreSQL server found (initdb): run .ci/test_tools.sh "
        "(apt-get install postgresql) to install it"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresCluster:
    """A running cluster; ``env(db)`` gives the DAGSTER_POSTGRES_* variables for a database."""

    data_dir: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    user: str = SUPERUSER

    def env(self, db: str) -> dict[str, str]:
        return {
            "DAGSTER_POSTGRES_HOST": self.host,
            "DAGSTER_POSTGRES_PORT": str(self.port),
            "DAGSTER_POSTGRES_USER": self.user,
            "DAGSTER_POSTGRES_PASSWORD": self.password,
            "DAGSTER_POSTGRES_DB": db,
        }

    def connect(self, db: str = "postgres"):  # -> psycopg2 connection
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=db
        )

    def create_database(self, name: str) -> str:
        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name


def _as_server_user() -> dict:
    """Popen arguments that drop to the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(SERVER_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def start_cluster() -> PostgresCluster:
    """initdb + pg_ctl start in a fresh temporary folder (a plain /tmp folder: pytest's tmp_path
    is private to root, and the server user must reach its data folder)."""
    pg_bin = find_pg_bin()
    base = Path(tempfile.mkdtemp(prefix="s2vec-pg-"))
    data_dir, pwfile = base / "data", base / "pwfile"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    drop = _as_server_user()
    if drop:
        os.chown(base, drop["user"], drop["group"])
        os.chown(pwfile, drop["user"], drop["group"])
    run = {"check": True, "capture_output": True, "text": True, "timeout": START_TIMEOUT_S, **drop}
    subprocess.run(
        [str(pg_bin / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}"]
        + ["--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
        **run,
    )
    port = free_port()
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [str(pg_bin / "pg_ctl"), "-D", str(data_dir), "-o", options]
        + ["-l", str(base / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start"],
        **run,
    )
    return PostgresCluster(data_dir=data_dir, port=port, password=password)


def stop_cluster(cluster: PostgresCluster) -> None:
    pg_bin = find_pg_bin()
    try:
        subprocess.run(
            [str(pg_bin / "pg_ctl"), "-D", str(cluster.data_dir), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=START_TIMEOUT_S,
            **_as_server_user(),
        )
    finally:
        shutil.rmtree(cluster.data_dir.parent, ignore_errors=True)
