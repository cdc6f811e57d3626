"""docker/ and docker/k8s/ checked without a Docker engine or a cluster (neither runs here):
the compose file's services, health checks, published ports and secrets; every file they
reference; every command they run parsed by the real CLI of the installed package; the code
server command serving the definitions through docker/workspace.yaml; the instance, Docker
launcher, Helm values and k8s executor configs validated by dagster, dagster-docker and
dagster-k8s's own schemas; the k8s Job built for a GPU step."""

from __future__ import annotations

import fnmatch
import functools
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import dagster as dg
import pytest
import yaml

from s2vec_pipeline_tests.pg_cluster import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
SERVICES = {"postgresql", "s2vec_code", "dagster_webserver", "dagster_daemon"}
DAGSTER_SERVICES = SERVICES - {"postgresql"}
STARTUP_S = 120  # the code server imports the pipeline (torch): ~15 s on an idle machine


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _service_yaml() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "dagster.yaml").read_text())


COMPOSE_MISSING = (
    "neither `docker compose` nor `docker-compose` is installed: "
    "apt-get install docker-compose (make test installs it)"
)


@functools.cache
def _compose_command() -> tuple[str, ...] | None:
    for cmd in (("docker", "compose"), ("docker-compose",)):
        if shutil.which(cmd[0]) is None:
            continue
        env = {"PATH": os.environ["PATH"]}
        if subprocess.run([*cmd, "version"], env=env, capture_output=True).returncode == 0:
            return cmd  # (docker without the compose plugin fails here)
    return None


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``config`` of the installed Docker Compose (v2 plugin or Debian's docker-compose 1.29):
    the compose file as Compose itself resolves it (interpolation, anchors, merges), with only
    ``env`` (and PATH) in the environment, plus docker/.env as Compose reads it. No engine is
    needed for this."""
    cmd = _compose_command()
    if cmd is None:
        pytest.fail(COMPOSE_MISSING)
    return subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "config"],
        cwd=DOCKER, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def resolved_compose(env: dict[str, str]) -> dict[str, Any]:
    proc = compose_config(env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def published_port(port: str | dict[str, Any]) -> str:
    """``host_ip:published:target`` of a resolved port: the short form docker-compose 1.29
    prints ("127.0.0.1:3000:3000/tcp") or the long one of Compose v2."""
    if isinstance(port, dict):
        return f"{port.get('host_ip', '')}:{port['published']}:{port['target']}"
    return port.removesuffix("/tcp")


IMAGE_DAGSTER_HOME = "/opt/dagster/dagster_home/"  # where the Dockerfile copies docker/*.yaml


def parse_cli(argv: list[str]) -> dict[str, Any]:
    """Parse a command line with the installed console script's own click command (options,
    types, required values, existing paths), without running it. Files the image holds under
    its DAGSTER_HOME are checked at their source in docker/. Returns the leaf's parameters."""
    argv = [
        str(DOCKER / a.removeprefix(IMAGE_DAGSTER_HOME)) if a.startswith(IMAGE_DAGSTER_HOME) else a
        for a in argv
    ]
    (ep,) = entry_points(group="console_scripts", name=argv[0])
    command: click.Command = importlib.import_module(ep.module).cli
    args, parent, name = list(argv[1:]), None, argv[0]
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=name, parent=parent)
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"{argv}: no command {args[0]!r} in {name}"
        parent, command, name, args = ctx, sub, args[0], args[1:]
    return command.make_context(name, args, parent=parent).params


def _healthcheck_argv(service: dict[str, Any]) -> list[str] | None:
    test = service["healthcheck"]["test"]
    return list(test[1:]) if test[0] == "CMD" else None


def test_compose_runs_the_four_services_wired_to_each_other() -> None:
    compose, instance = _compose(), _service_yaml()
    services = compose["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], name
        for dep, how in svc.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy" and "healthcheck" in services[dep]
    # One image for code server, webserver, daemon and run containers; built from the repo.
    images = {services[s]["image"] for s in DAGSTER_SERVICES}
    assert len(images) == 1
    code_env = services["s2vec_code"]["environment"]
    assert code_env["DAGSTER_CURRENT_IMAGE"] == images.pop()
    build = services["s2vec_code"]["build"]
    assert (COMPOSE_FILE.parent / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).is_file()
    # The Docker run launcher's network and volume are the compose file's, by name.
    launcher = instance["run_launcher"]["config"]
    assert compose["networks"]["s2vec_network"]["name"] == launcher["network"]
    mounts = dict(v.split(":") for v in launcher["container_kwargs"]["volumes"])
    for vol_name in mounts:
        assert compose["volumes"][vol_name]["name"] == vol_name
    assert f"s2vec_data:{mounts['s2vec_data']}" in services["s2vec_code"]["volumes"]
    assert code_env["S2VEC_ROOT"].startswith(mounts["s2vec_data"] + "/")
    # Compute logs: written by run containers under $DAGSTER_HOME/storage, read by the UI.
    assert mounts["dagster_storage"] == IMAGE_DAGSTER_HOME + "storage"
    assert f"dagster_storage:{mounts['dagster_storage']}" in " ".join(
        services["dagster_webserver"]["volumes"]
    )
    # Run containers get the daemon's environment variables listed in env_vars.
    daemon_env = services["dagster_daemon"]["environment"]
    assert set(launcher["env_vars"]) <= set(daemon_env)
    # The webserver and daemon find the code server where compose runs it.
    (location,) = yaml.safe_load((DOCKER / "workspace.yaml").read_text())["load_from"]
    params = parse_cli(services["s2vec_code"]["command"])
    assert location["grpc_server"]["host"] == "s2vec_code"
    assert location["grpc_server"]["port"] == params["port"] == 4000
    for name in ("dagster_webserver", "dagster_daemon"):
        workspace_arg = services[name]["command"][-1]
        assert workspace_arg == "/opt/dagster/dagster_home/workspace.yaml"


def test_compose_publishes_only_the_webserver_on_loopback_and_reads_secrets_from_env() -> None:
    services = _compose()["services"]
    published = {name: svc["ports"] for name, svc in services.items() if "ports" in svc}
    assert set(published) == {"dagster_webserver"}
    # The published port as Compose resolves it: loopback unless S2VEC_UI_BIND says otherwise.
    password = {"DAGSTER_POSTGRES_PASSWORD": "pw-from-env"}
    for env, expected in [
        ({"S2VEC_UI_BIND": "0.0.0.0", "S2VEC_UI_PORT": "8080"}, "0.0.0.0:8080:3000"),
        ({}, "127.0.0.1:3000:3000"),  # last: `resolved` below is this one
    ]:
        resolved = resolved_compose({**password, **env})["services"]
        assert {n for n, svc in resolved.items() if svc.get("ports")} == {"dagster_webserver"}
        ports = resolved["dagster_webserver"]["ports"]
        assert [published_port(p) for p in ports] == [expected], env
    # Passwords: required from the environment, never a value in a file.
    with_password = set()
    for name, svc in services.items():
        for key, value in svc.get("environment", {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{DAGSTER_POSTGRES_PASSWORD:\?[^}]+\}", value), name
                with_password.add((name, key))
    assert {n for n, _ in with_password} == SERVICES
    for name, key in with_password:
        assert resolved[name]["environment"][key] == "pw-from-env", (name, key)
    for unset_or_empty in ({}, {"DAGSTER_POSTGRES_PASSWORD": ""}):
        refused = compose_config(unset_or_empty)
        assert refused.returncode != 0 and "set DAGSTER_POSTGRES_PASSWORD" in refused.stderr
    db = _service_yaml()["storage"]["postgres"]["postgres_db"]
    assert db.pop("scheme") == "postgresql+psycopg2"
    assert all(set(v) == {"env"} and v["env"].startswith("DAGSTER_POSTGRES_") for v in db.values())
    values = yaml.safe_load((DOCKER / "k8s" / "values.yaml").read_text())
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["global"]["postgresqlSecretName"]
    # The Docker socket (root on the host) only where runs are launched or terminated.
    with_socket = {
        n for n, s in services.items() if any("docker.sock" in v for v in s.get("volumes", []))
    }
    assert with_socket == {"dagster_webserver", "dagster_daemon"}


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder
    matches the files under it; `!` re-includes."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_what_exists_and_runs_the_compose_command() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (.+)$", dockerfile, flags=re.M)
    assert copies
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, flags=re.M))
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))
    for line in copies:
        *sources, _dest = shlex.split(line)
        if sources[0].startswith("--from="):  # from an earlier stage, not from the context
            assert sources[0].removeprefix("--from=") in stages, line
            continue
        for src in (re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s) for s in sources):
            assert (REPO / src).exists(), src
            assert not _dockerignore_excludes(src), f"{src} is excluded by .dockerignore"
    # What the package needs at run time is in the context; tests and local data are not.
    for needed in ("s2vec_pipeline/data/osm/monaco.osm.pbf", "s2vec_pipeline/osm/taxonomy.yaml"):
        assert not _dockerignore_excludes(needed)
    for left_out in ("s2vec_pipeline_tests/test_s2.py", ".venv/bin/python", "s2vec_data/x"):
        assert _dockerignore_excludes(left_out)
    (cmd,) = re.findall(r"^CMD (\[.+\])$", dockerfile, flags=re.M)
    assert json.loads(cmd) == _compose()["services"]["s2vec_code"]["command"]
    # torch: CPU by default, the version constraints.txt pins; the [deploy] extra exists.
    assert re.search(r"^ARG TORCH_INDEX=cpu$", dockerfile, flags=re.M)
    (pin,) = re.findall(r"^ARG TORCH_VERSION=(.+)$", dockerfile, flags=re.M)
    assert f"torch=={pin}" in (REPO / "constraints.txt").read_text().split()
    assert 'pip install ".[deploy]"' in dockerfile
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deploy = " ".join(extras["optional-dependencies"]["deploy"])
    for package in ("dagster-postgres", "dagster-docker", "dagster-k8s", "psycopg2-binary"):
        assert package in deploy


def test_every_service_command_is_a_real_command_of_the_installed_packages() -> None:
    services = _compose()["services"]
    parsed = {name: parse_cli(services[name]["command"]) for name in DAGSTER_SERVICES}
    assert parsed["dagster_webserver"]["port"] == 3000
    assert parsed["s2vec_code"]["module_name"] == "s2vec_pipeline.definitions"
    assert parsed["s2vec_code"]["attribute"] == "defs"
    for name in DAGSTER_SERVICES:
        argv = _healthcheck_argv(services[name])
        if argv[0] == "python":  # the webserver's: valid Python hitting /server_info
            compile(argv[2], f"{name} healthcheck", "exec")
            assert "/server_info" in argv[2]
        else:
            parse_cli(argv)
    # A bad option is refused by the same parser (so the checks above can fail).
    with pytest.raises(click.UsageError):
        parse_cli(["dagster", "code-server", "start", "--no-such-option"])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
def test_code_server_and_webserver_commands_serve_the_definitions(tmp_path: Path) -> None:
    """The compose file's code-server and webserver commands and their health checks, run as
    written except for loopback hosts, free ports and the workspace file's location; then
    docker/workspace.yaml (host and port likewise) loads the code location's definitions."""
    from s2vec_pipeline.service.dagster_compat import WorkspaceFileTarget, WorkspaceProcessContext

    services = _compose()["services"]
    code_port, web_port = str(free_port()), str(free_port())
    workspace_file, home = tmp_path / "workspace.yaml", tmp_path / "home"
    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
    workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=int(code_port))
    workspace_file.write_text(yaml.safe_dump(workspace))
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    moved = {
        "0.0.0.0": "127.0.0.1",
        "4000": code_port,
        "3000": web_port,
        IMAGE_DAGSTER_HOME + "workspace.yaml": str(workspace_file),
    }

    def localize(argv: list[str]) -> list[str]:
        out = [moved.get(a, a).replace(":3000/", f":{web_port}/") for a in argv]
        return [str(Path(sys.executable).parent / out[0]), *out[1:]]

    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    env["S2VEC_ROOT"] = str(tmp_path / "root")
    log_path = tmp_path / "services.log"
    log = log_path.open("w")
    procs: list[subprocess.Popen] = []

    def start_and_wait_healthy(service: str) -> None:
        procs.append(
            subprocess.Popen(
                localize(services[service]["command"]),
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
        health = localize(_healthcheck_argv(services[service]))
        deadline = time.monotonic() + STARTUP_S
        while subprocess.run(health, env=env, capture_output=True, timeout=60).returncode != 0:
            assert procs[-1].poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{service} never became healthy"
            time.sleep(1)

    try:
        start_and_wait_healthy("s2vec_code")
        target = WorkspaceFileTarget(paths=[str(workspace_file)])
        with (
            dg.DagsterInstance.from_config(str(home)) as instance,
            WorkspaceProcessContext(instance, target) as process_context,
        ):
            request = process_context.create_request_context()
            assert request.code_location_errors() == []
            location = request.get_code_location("s2vec")
            (repo,) = location.get_repositories().values()
            jobs = {j.name for j in repo.get_all_jobs()}
            assert {"data_layer", "train_model", "embed"} <= jobs
            assets = {n.asset_key.to_user_string() for n in repo.get_asset_node_snaps()}
            assert {"osm_features", "raster_tiles", "mae_model", "cell_embeddings"} <= assets
        start_and_wait_healthy("dagster_webserver")
        # The health check can fail: nothing answers on a closed port.
        closed = localize(_healthcheck_argv(services["dagster_webserver"]))
        closed[-1] = closed[-1].replace(f":{web_port}/", f":{free_port()}/")
        assert subprocess.run(closed, env=env, capture_output=True, timeout=60).returncode != 0
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()


def _uncomment_gpu_block(text: str) -> str:
    """docker/dagster.yaml with its commented GPU `device_requests` block switched on."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        if line.strip() == "# device_requests:":
            inside = True
        if inside and line.lstrip().startswith("# "):
            indent = len(line) - len(line.lstrip())
            out.append(" " * indent + line.lstrip()[2:])
            continue
        inside = False
        out.append(line)
    return "\n".join(out) + "\n"


def test_service_instance_config_validates_with_the_docker_launcher(tmp_path: Path) -> None:
    from dagster_docker import DockerRunLauncher

    import docker
    from s2vec_pipeline.service.dagster_compat import dagster_instance_config, process_config

    for variant, text in [("cpu", (DOCKER / "dagster.yaml").read_text())] + [
        ("gpu", _uncomment_gpu_block((DOCKER / "dagster.yaml").read_text()))
    ]:
        home = tmp_path / variant
        home.mkdir()
        (home / "dagster.yaml").write_text(text)
        config, _ = dagster_instance_config(str(home))  # the instance schema
        launcher_cfg = config["run_launcher"]["config"]
        result = process_config(DockerRunLauncher.config_type(), launcher_cfg)
        assert result.success, result.errors
        launcher = DockerRunLauncher.from_config_value(None, result.value)  # no engine needed
        assert launcher.networks == ["s2vec_network"]
        requests = launcher.container_kwargs.get("device_requests")
        if variant == "gpu":
            # docker-py turns the YAML into the Engine API's DeviceRequests, as it would
            # when starting the run container.
            host = docker.types.HostConfig(version="1.44", device_requests=requests)
            assert host["DeviceRequests"] == [
                {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                 "Options": {}}
            ]  # fmt: skip
        else:
            assert requests is None
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {"key": "s2vec/stage", "value": "train", "limit": 1} in limits
    assert config["run_monitoring"]["enabled"] is True
    assert 0 < config["run_monitoring"]["poll_interval_seconds"] <= 30


def test_local_dagster_yaml_monitors_runs_with_a_launcher_that_checks_health(
    tmp_path: Path,
) -> None:
    from s2vec_pipeline.service.instance import LocalProcessRunLauncher

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        assert isinstance(instance.run_launcher, LocalProcessRunLauncher)
        assert instance.run_launcher.supports_check_run_worker_health


def test_process_alive_tells_a_live_process_from_a_dead_reused_or_zombie_one() -> None:
    from s2vec_pipeline.service.instance import process_alive

    assert process_alive(os.getpid())
    assert process_alive(os.getpid(), not_started_after=time.time())
    # A pid recorded before this process started belongs to another (earlier) process.
    assert not process_alive(os.getpid(), not_started_after=time.time() - 10 * 86400)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.1)
    assert not process_alive(child.pid)  # exited, not reaped yet: a zombie
    child.wait()
    assert not process_alive(child.pid)  # gone


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_helm_values_validate_against_dagster_k8s_and_match_the_compose_limits() -> None:
    """The chart renders these values into the instance's dagster.yaml (camelCase -> the
    snake_case fields); validate them with the classes that will read them."""
    from dagster_k8s import K8sRunLauncher

    from s2vec_pipeline.service.dagster_compat import dagster_instance_config_schema, process_config

    values = yaml.safe_load((DOCKER / "k8s" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher_cfg: dict[str, Any] = {_snake(k): v for k, v in k8s.items()}
    launcher_cfg["run_k8s_config"] = {_snake(k): v for k, v in k8s["runK8sConfig"].items()}
    launcher_cfg["instance_config_map"] = "s2vec-dagster-instance"  # set by the chart
    result = process_config(K8sRunLauncher.config_type(), launcher_cfg)
    assert result.success, result.errors

    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    coordinator_cfg = {_snake(k): v for k, v in queued.items()}
    result = process_config(dg.QueuedRunCoordinator.config_type(), coordinator_cfg)
    assert result.success, result.errors
    compose_limits = _service_yaml()["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert coordinator_cfg["tag_concurrency_limits"] == compose_limits

    monitoring = {_snake(k): v for k, v in values["dagsterDaemon"]["runMonitoring"].items()}
    result = process_config(
        dagster_instance_config_schema()["run_monitoring"].config_type, monitoring
    )
    assert result.success, result.errors
    assert monitoring["enabled"] is True

    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["S2VEC_EXECUTOR"] == "k8s"
    params = parse_cli(["dagster", "api", "grpc", *deployment["dagsterApiGrpcArgs"], "-p", "3030"])
    assert params["module_name"] == "s2vec_pipeline.definitions"
    mounts = {m["name"] for m in deployment["volumeMounts"]}
    assert mounts == {v["name"] for v in deployment["volumes"]}
    assert env["S2VEC_ROOT"].startswith(deployment["volumeMounts"][0]["mountPath"] + "/")


def test_k8s_executor_puts_training_and_embedding_on_gpu_nodes() -> None:
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    from s2vec_pipeline.definitions import build_definitions
    from s2vec_pipeline.errors import S2VecError
    from s2vec_pipeline.service.dagster_compat import process_config
    from s2vec_pipeline.service.k8s import (
        GPU_JOB_TAGS,
        GPU_NODE_SELECTOR,
        GPU_OPS,
        executor_from_env,
        k8s_executor_config,
    )

    assert executor_from_env({}) is None
    assert executor_from_env({"S2VEC_EXECUTOR": "k8s"}).name == "s2vec_k8s"
    with pytest.raises(S2VecError, match="S2VEC_EXECUTOR"):
        executor_from_env({"S2VEC_EXECUTOR": "celery"})
    config = k8s_executor_config()
    result = process_config(k8s_job_executor.config_schema.config_type, config)
    assert result.success, result.errors

    # The GPU ops are the ops the training and embedding jobs run.
    defs = build_definitions()
    op_names = {
        node.name
        for job in ("train_model", "embed")
        for node in defs.resolve_job_def(job).graph.node_dict.values()
    }
    assert set(GPU_OPS) <= op_names

    # The k8s Jobs the executor would create for a GPU step and a CPU step.
    job_config = DagsterK8sJobConfig(
        job_image="s2vec-pipeline:test", dagster_home="/opt/dagster/dagster_home",
        instance_config_map="s2vec-dagster-instance",
    )  # fmt: skip

    def pod(step_config: dict) -> Any:
        job = construct_dagster_k8s_job(
            job_config, ["dagster", "api", "execute_step"], "s2vec-step",
            user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(step_config),
        )  # fmt: skip
        return job.spec.template.spec

    gpu = pod(config["per_step_k8s_config"]["mae_model"])
    assert gpu.node_selector == GPU_NODE_SELECTOR
    assert gpu.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert any(t.key == "nvidia.com/gpu" for t in gpu.tolerations)
    cpu = pod(config["step_k8s_config"])
    assert not cpu.node_selector
    assert "nvidia.com/gpu" not in (cpu.containers[0].resources.limits or {})
    # The job-level tag (runs without the k8s executor) parses as dagster-k8s reads tags.
    tags = {k: json.dumps(v) for k, v in GPU_JOB_TAGS.items()}
    assert get_user_defined_k8s_config(tags).pod_spec_config["node_selector"] == GPU_NODE_SELECTOR
