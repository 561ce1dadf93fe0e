"""cluster.yaml (AWS) and cluster-local.yaml (own machines): valid for Ray's cluster launcher, and
the choices their comments promise.

Validation is Ray's own: ``prepare_config`` (merge with the provider's defaults.yaml, the local
provider's node type, per-type min/max workers) then ``validate_config`` (ray-schema.json and the
launcher's cross-checks), i.e. the part of ``ray up``'s ``_bootstrap_config`` that runs before
the cloud provider is asked anything. The provider's own bootstrap (IAM role, key pair, subnets,
resource autodetection) needs boto3, credentials and the network, so it is not run here. Fast: no
Ray cluster, no network (sockets are refused while validating).
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

# Importing Ray's CLI (for its `ray start` parser) imports Ray Serve, which warns about pydantic.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "cluster.yaml"
LOCAL = REPO / "cluster-local.yaml"
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands",
                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
TOKEN_PATH = "$HOME/.ray/auth_token"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(params=[CLOUD, LOCAL], ids=["cluster.yaml", "cluster-local.yaml"])
def raw(request) -> dict:
    return load(request.param)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def prepared(raw_config: dict) -> dict:
    """What `ray up` validates: the config merged with its provider's defaults, validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw_config))
    validate_config(config)
    return config


def ray_start_args(command: str) -> tuple[dict[str, str], list[str]]:
    """The env assignments just before `ray start` and its arguments, from one shell command."""
    for part in command.split(";"):
        words = shlex.split(part)
        if "ray" in words and words[words.index("ray") + 1:words.index("ray") + 2] == ["start"]:
            i = words.index("ray")
            env = dict(w.split("=", 1) for w in words[:i] if re.fullmatch(r"[A-Z_]+=\S*", w))
            return env, words[i + 2:]
    raise AssertionError(f"no `ray start` in {command!r}")


def parse_ray_start(args: list[str]) -> dict:
    """Ray's own `ray start` option parser (click), without running anything."""
    from ray.scripts.scripts import start

    return start.make_context("start", list(args)).params


def start_commands(raw_config: dict, key: str) -> list[str]:
    return [c for c in raw_config[key] if "ray start" in c]


def mlflow_command(raw_config: dict) -> list[str]:
    """The words of the `python -m jobs.mlflow_server ...` call in the head's start commands."""
    launcher = "jobs.mlflow_server"
    found = [c for c in raw_config["head_start_ray_commands"] if launcher in c]
    assert len(found) == 1, "the head starts the MLflow server exactly once"
    for part in found[0].split(";"):
        if launcher in part:
            words = shlex.split(part.split(">")[0])
            i = words.index(launcher)
            assert words[i - 2:i] == ["python", "-m"], words
            return words[i + 1:]
    raise AssertionError("unreachable")


def options(words: list[str]) -> dict[str, str]:
    return {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}


# ------------------------------------------------------------------------------ Ray's validation

def test_ray_validates_both_configs_offline(raw, no_network):
    config = prepared(raw)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["cluster_name"].startswith("mnistjobs")


def test_ray_validation_is_real(raw, no_network):
    """The same validation rejects a broken variant of the file, so passing means something."""
    import jsonschema

    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(raw)
    bad["head_start_ray_commnds"] = ["ray start --head"]  # a typo in a key
    with pytest.raises(jsonschema.ValidationError):
        prepared(bad)
    if "available_node_types" in raw:
        bad = prepared(raw)
        worker = next(t for t in bad["available_node_types"] if t != bad["head_node_type"])
        bad["available_node_types"][worker]["resources"]["GPU"] = 0.5  # fractions are not nodes
        with pytest.raises(jsonschema.ValidationError):
            validate_config(bad)


def test_every_command_is_one_shell_string(raw):
    """A YAML slip (an unquoted ': ') would turn a command into a mapping that only fails at `ray up`."""
    for key in COMMAND_LISTS:
        for command in raw.get(key) or []:
            assert isinstance(command, str) and command.strip(), (key, command)


# ------------------------------------------------------------------------------ node types (AWS)

def test_head_node_type_has_no_gpu_and_runs_no_trials(no_network):
    config = prepared(load(CLOUD))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "trials stay off the head"
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "a CPU instance"
    assert head["max_workers"] == 0


def test_gpu_worker_type_autoscales(no_network):
    config = prepared(load(CLOUD))
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["resources"]["GPU"] >= 1 and worker["resources"]["CPU"] >= 1
    assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6.")), "an NVIDIA GPU instance"
    raw_worker = next(t for n, t in load(CLOUD)["available_node_types"].items() if n in workers)
    assert "min_workers" in raw_worker and "max_workers" in raw_worker, "set in the file, not defaulted"
    assert 1 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_local_variant_keeps_its_machines(no_network):
    raw = load(LOCAL)
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"]
    assert "available_node_types" not in raw, "Ray's local provider refuses node types"
    config = prepared(raw)
    (node_type,) = config["available_node_types"].values()
    n = len(raw["provider"]["worker_ips"])
    assert n >= 1 and node_type["min_workers"] == node_type["max_workers"] == n


# ----------------------------------------------------------------------- Ray start and token auth

def test_ray_starts_with_token_auth_on_every_node(raw):
    mounts = {k.replace("~", "$HOME", 1): v for k, v in raw["file_mounts"].items()}
    assert TOKEN_PATH in mounts, "the token file reaches every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = start_commands(raw, key)
        assert len(commands) == 1, key
        env, args = ray_start_args(commands[0])
        assert env.get("RAY_AUTH_MODE") == "token", key
        assert env.get("RAY_AUTH_TOKEN_PATH") == TOKEN_PATH, key
        parse_ray_start(args)  # every option exists in this Ray


def test_head_ray_start_options(raw):
    _, args = ray_start_args(start_commands(raw, "head_start_ray_commands")[0])
    params = parse_ray_start(args)
    assert params["head"] and params["port"] == 6379
    assert params["dashboard_host"] == "127.0.0.1", "dashboard private: reach it via `ray dashboard`"
    assert params["dashboard_port"] == 8265
    assert params["num_gpus"] == 0 and params["num_cpus"] == 0
    assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"


def test_worker_ray_start_joins_the_head(raw):
    _, args = ray_start_args(start_commands(raw, "worker_start_ray_commands")[0])
    params = parse_ray_start(args)
    assert not params["head"] and params["address"] == "$RAY_HEAD_IP:6379"


def test_nothing_listens_on_all_interfaces(raw):
    text = "\n".join(c for key in COMMAND_LISTS for c in raw.get(key) or [])
    assert "0.0.0.0" not in text


# --------------------------------------------------------------------------------------- MLflow

def test_head_starts_mlflow_through_the_project_launcher(raw):
    words = mlflow_command(raw)
    used = [w for w in words if w.startswith("--")]
    import jobs.mlflow_server as mlflow_server

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        mlflow_server.main(["--help"])
    accepted = set(re.findall(r"--[a-z][a-z-]*", help_text.getvalue()))
    assert set(used) <= accepted, f"the launcher does not take {set(used) - accepted}"
    opts = options(words)
    assert opts["--config"].endswith("/mlflow/server.yaml") and (REPO / "mlflow" / "server.yaml").is_file()
    assert opts["--host"] not in ("0.0.0.0", "127.0.0.1", "localhost"), "the head's private address"
    assert opts["--port"] == "5000"
    assert opts["--home"] == '$MNISTJOBS_HOME'


def test_mlflow_settings_serve_artifacts():
    """Workers upload artifacts over HTTP: the launcher's settings give `mlflow server --serve-artifacts`."""
    assert yaml.safe_load((REPO / "mlflow" / "server.yaml").read_text())["serve_artifacts"] is True
    import jobs.mlflow_server as mlflow_server

    settings = mlflow_server.load_mlflow_settings(REPO / "mlflow" / "server.yaml")
    cmd = mlflow_server.mlflow_server_command(Path("/home/ubuntu/.mnistjobs"), settings, host="10.0.0.5", port=5000)
    assert "--serve-artifacts" in cmd and "--no-serve-artifacts" not in cmd


def test_launcher_execs_mlflow_without_its_job_runners(tmp_path, monkeypatch):
    """`python -m jobs.mlflow_server` makes the store folders and execs `mlflow server` with
    MLflow's GenAI job execution off, unless the user's environment sets it."""
    import os

    import jobs.mlflow_server as mlflow_server

    execs = []

    def execve(path, argv, env):
        execs.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    home = tmp_path / "home"
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        mlflow_server.main(["--home", str(home), "--port", "5123"])
    ((path, argv, env),) = execs
    assert argv[0] == path and argv[1:4] == ["-m", "mlflow", "server"] and argv[argv.index("--port") + 1] == "5123"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert (home / "mlflow" / "artifacts").is_dir() and (home / "mlflow").stat().st_mode & 0o077 == 0
    assert mlflow_server.server_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}) == {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}


def test_nodes_get_the_projects_environment(raw):
    common = "\n".join(raw["setup_commands"])
    for var in ("MNISTJOBS_HOME", "MNISTJOBS_DATA_DIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        assert f"export {var}=" in common, var
    assert "export MLFLOW_TRACKING_URI=http://$(hostname -I" in "\n".join(raw["head_setup_commands"])
    assert "export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in "\n".join(raw["worker_setup_commands"])
    everything = "\n".join(c for key in COMMAND_LISTS for c in raw.get(key) or [])
    assert "export RAY_ADDRESS" not in everything, "Ray's CLI on the nodes reads RAY_ADDRESS as a GCS address"


# ------------------------------------------------------------------------------ install and files

def test_setup_installs_this_project_with_its_constraints(raw):
    assert raw["file_mounts"]["~/mnistjobs"] == "."
    assert (REPO / "pyproject.toml").is_file() and (REPO / "constraints.txt").is_file()
    install = [c for c in raw["setup_commands"] if " pip install " in c]
    assert len(install) == 1 and "-c ~/mnistjobs/constraints.txt" in install[0] and "-e ~/mnistjobs" in install[0]
    for excluded in (".venv", ".mnistjobs", ".git"):
        assert excluded in raw["rsync_exclude"], "the venv, state folder and history stay home"


def test_both_files_share_their_commands():
    cloud, local = load(CLOUD), load(LOCAL)
    for key in ("setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "file_mounts", "rsync_exclude", "rsync_filter"):
        assert cloud[key] == local[key], key
    assert [c for c in cloud["head_setup_commands"] if "boto3" not in c] == local["head_setup_commands"]


def test_cloud_comments_name_the_ports_and_storage():
    text = CLOUD.read_text()
    for needle in ("6379", "8265", "5000", "ray dashboard cluster.yaml", "storage_path: s3://",
                   "--serve-artifacts", "security group"):
        assert needle in text, needle
