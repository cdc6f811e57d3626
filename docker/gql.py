"""The webserver's GraphQL API, as docker/e2e.sh drives it: launch a job the way the UI's
launchpad does (``launchPipelineExecution``), list runs by tag or job, and wait for statuses.
Standard library only, so it runs with any host python3 (no package of the project needed).

    python3 docker/gql.py [--url URL] ready [--timeout S]
    python3 docker/gql.py launch JOB [--config JSON] [--tag KEY=VALUE]...      -> run id
    python3 docker/gql.py status RUN_ID                                        -> status
    python3 docker/gql.py wait RUN_ID --until S1,S2 [--timeout S]              -> final status
    python3 docker/gql.py runs [--job JOB] [--tag KEY=VALUE]...     -> id, status, job, partition
    python3 docker/gql.py settle [--job JOB] [--tag KEY=VALUE]... --count N [--quiet S]
                                 [--timeout S] [--ignore FILE_OF_RUN_IDS]

Exit 0 when the request held (``wait``: the run reached one of the ``--until`` statuses;
``settle``: at least N runs match, none is queued or running, and none appeared for
``--quiet`` seconds, and all of them succeeded); 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

LOCATION = "s2vec"  # docker/workspace.yaml
REPOSITORY = "__repository__"  # the repository name of a Definitions object
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}

LAUNCH = """
mutation Launch($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
    ... on Error { message }
  }
}"""
RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
    ... on Error { message }
  }
}"""
RUNS = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
    ... on Error { message }
  }
}"""
LOCATIONS = """
query Locations {
  workspaceOrError {
    __typename
    ... on Workspace { locationEntries { name loadStatus
      locationOrLoadError { __typename ... on PythonError { message } } } }
  }
}"""


class Fail(Exception):
    """A request that did not hold: its message is the script's one line."""


def call(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.load(resp)
    if out.get("errors"):
        raise Fail(f"GraphQL error: {out['errors'][0].get('message')}")
    return out["data"]


def _tags(pairs: list[str]) -> list[dict[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise Fail(f"--tag expects KEY=VALUE, got {pair!r}")
        out.append({"key": key, "value": value})
    return out


def ready(url: str, timeout: float) -> str:
    """Waits until the webserver answers and the code location is loaded."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            ws = call(url, LOCATIONS)["workspaceOrError"]
            entries = {e["name"]: e for e in ws.get("locationEntries", [])}
            entry = entries.get(LOCATION)
            if entry and entry["loadStatus"] == "LOADED":
                loaded = entry["locationOrLoadError"]
                if loaded["__typename"] == "PythonError":
                    raise Fail(f"code location {LOCATION} failed to load: {loaded['message']}")
                return "LOADED"
            last = f"code location {LOCATION}: {entry and entry['loadStatus']}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(2)
    raise Fail(f"webserver not ready after {timeout:.0f} s ({last})")


def launch(url: str, job: str, config: dict[str, Any], tags: list[str]) -> str:
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "pipelineName": job,
        },
        "runConfigData": config,
        "executionMetadata": {"tags": _tags(tags)},
    }
    result = call(url, LAUNCH, {"executionParams": params})["launchPipelineExecution"]
    if result["__typename"] != "LaunchRunSuccess":
        detail = result.get("message") or "; ".join(e["message"] for e in result["errors"])
        raise Fail(f"launching {job} failed: {result['__typename']}: {detail}")
    return result["run"]["runId"]


def status(url: str, run_id: str) -> str:
    run = call(url, RUN, {"runId": run_id})["runOrError"]
    if run["__typename"] != "Run":
        raise Fail(f"run {run_id}: {run.get('message', run['__typename'])}")
    return run["status"]


def wait(url: str, run_id: str, until: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        current = status(url, run_id)
        if current in until:
            return current
        if current in TERMINAL:
            raise Fail(f"run {run_id} ended {current}, expected {'/'.join(sorted(until))}")
        if time.monotonic() > deadline:
            raise Fail(f"run {run_id} still {current} after {timeout:.0f} s")
        time.sleep(2)


def runs(url: str, job: str | None, tags: list[str]) -> list[dict[str, Any]]:
    flt: dict[str, Any] = {"tags": _tags(tags)}
    if job:
        flt["pipelineName"] = job
    result = call(url, RUNS, {"filter": flt})["runsOrError"]
    if result["__typename"] != "Runs":
        raise Fail(f"listing runs failed: {result.get('message')}")
    for run in result["results"]:
        tag = {t["key"]: t["value"] for t in run["tags"]}
        run["partition"] = tag.get("dagster/partition", "-")
    return result["results"]


def settle(
    url: str,
    job: str | None,
    tags: list[str],
    count: int,
    quiet: float,
    timeout: float,
    ignore: set[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Waits for at least ``count`` matching runs (those in ``ignore`` left out), all finished,
    with no new one for ``quiet`` seconds (sensors launch follow-up runs on later ticks); all
    must have succeeded."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    stable_since = time.monotonic()
    while True:
        found = [r for r in runs(url, job, tags) if r["runId"] not in ignore]
        ids = {r["runId"] for r in found}
        if ids != seen:
            seen, stable_since = ids, time.monotonic()
        done = all(r["status"] in TERMINAL for r in found)
        if len(found) >= count and done and time.monotonic() - stable_since >= quiet:
            bad = [r for r in found if r["status"] != "SUCCESS"]
            if bad:
                raise Fail(
                    "runs did not succeed: "
                    + ", ".join(f"{r['jobName']}[{r['partition']}] {r['status']}" for r in bad)
                )
            return found
        if time.monotonic() > deadline:
            states = ", ".join(f"{r['jobName']}[{r['partition']}] {r['status']}" for r in found)
            raise Fail(f"runs not settled after {timeout:.0f} s: {len(found)} found ({states})")
        time.sleep(3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000/graphql")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ready")
    r.add_argument("--timeout", type=float, default=300)
    la = sub.add_parser("launch")
    la.add_argument("job")
    la.add_argument("--config", default="{}", help="run config as JSON")
    la.add_argument("--tag", action="append", default=[])
    st = sub.add_parser("status")
    st.add_argument("run_id")
    w = sub.add_parser("wait")
    w.add_argument("run_id")
    w.add_argument("--until", required=True, help="comma-separated statuses")
    w.add_argument("--timeout", type=float, default=600)
    for name in ("runs", "settle"):
        q = sub.add_parser(name)
        q.add_argument("--job", default=None)
        q.add_argument("--tag", action="append", default=[])
        if name == "settle":
            q.add_argument("--count", type=int, default=1)
            q.add_argument("--quiet", type=float, default=0)
            q.add_argument("--timeout", type=float, default=600)
            q.add_argument("--ignore", default=None, help="file of run ids to leave out")
    args = p.parse_args(argv)
    try:
        if args.cmd == "ready":
            print(ready(args.url, args.timeout))
        elif args.cmd == "launch":
            try:
                config = json.loads(args.config)
            except json.JSONDecodeError as e:
                raise Fail(f"--config is not JSON: {e}") from e
            print(launch(args.url, args.job, config, args.tag))
        elif args.cmd == "status":
            print(status(args.url, args.run_id))
        elif args.cmd == "wait":
            print(wait(args.url, args.run_id, set(args.until.split(",")), args.timeout))
        else:
            found = (
                runs(args.url, args.job, args.tag)
                if args.cmd == "runs"
                else settle(
                    args.url,
                    args.job,
                    args.tag,
                    args.count,
                    args.quiet,
                    args.timeout,
                    set(Path(args.ignore).read_text().split()) if args.ignore else set(),
                )
            )
            for run in found:
                print(run["runId"], run["status"], run["jobName"], run["partition"], sep="\t")
    except (Fail, urllib.error.URLError, OSError) as e:
        print(f"gql.py {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
