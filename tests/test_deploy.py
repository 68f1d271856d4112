"""The deploy files parse, carry the fields that matter, and run commands that exist.

Docker and Kubernetes are not available here, so nothing is built or applied:
the manifests are parsed, and every command they run is checked against the
real CLI parser (`pgreembed.cli.build_parser()`) or Dramatiq's own argument
parser, with the broker module imported in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dramatiq.cli import make_argument_parser as dramatiq_parser

from pgreembed.cli.main import build_parser
from pgreembed.config import parse_settings
from tests.helpers import docs_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
SECRET_ENV = {"DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY"}
ENV = {"DATABASE_URL": "postgresql://u@localhost/db"}


# -- commands -------------------------------------------------------------------------

def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("pgreembed has no subcommands")


def check_pgreembed(args: list[str], where: str) -> argparse.Namespace:
    """`args` after `pgreembed`: the subcommand exists and its options parse."""
    positional = [a for i, a in enumerate(args)
                  if not a.startswith("-") and (i == 0 or args[i - 1] != "--config")]
    assert positional, f"{where}: no pgreembed subcommand in {args}"
    assert positional[0] in subcommands(), (
        f"{where}: `pgreembed {positional[0]}` is not a subcommand"
        f" (have {sorted(subcommands())})")
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        raise AssertionError(f"{where}: pgreembed rejects {args}") from None


def check_dramatiq(args: list[str], where: str) -> argparse.Namespace:
    """`args` after `dramatiq`: valid options, and the broker module is `worker`."""
    try:
        parsed = dramatiq_parser().parse_args(args)
    except SystemExit:
        raise AssertionError(f"{where}: dramatiq rejects {args}") from None
    assert parsed.broker == "worker", f"{where}: dramatiq loads {parsed.broker!r}, not worker"
    return parsed


def check_command(argv: list[str], where: str) -> tuple[str, argparse.Namespace]:
    """Classify and validate one command line; returns ("pgreembed"|"dramatiq", args)."""
    assert argv, f"{where}: empty command"
    exe = Path(argv[0]).name
    rest = argv[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", exe):
        assert rest[:1] == ["-m"] and len(rest) >= 2, f"{where}: expected python -m, got {argv}"
        exe, rest = rest[1], rest[2:]
    if exe == "pgreembed":
        return "pgreembed", check_pgreembed(rest, where)
    if exe == "dramatiq":
        return "dramatiq", check_dramatiq(rest, where)
    raise AssertionError(f"{where}: runs {argv[0]!r}, which is neither pgreembed nor dramatiq")


def test_worker_broker_module_imports(tmp_path: Path) -> None:
    """What `dramatiq ... worker` loads imports cleanly and exposes a broker and the actor,
    on the Redis the settings name (the TOML's redis_url when the environment has none)."""
    config = tmp_path / "pgreembed.toml"
    config.write_text('redis_url = "redis://127.0.0.1:6390/3"\n' + docs_config())
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(PGREEMBED_CONFIG=str(config), DATABASE_URL="postgresql://localhost/x")
    code = ("import worker, dramatiq; assert isinstance(worker.broker, dramatiq.Broker);"
            " assert 'embed_batch' in worker.broker.actors;"
            " assert 'embed_backfill_batch' in worker.broker.actors;"
            " assert {'pgreembed', 'pgreembed_backfill'} <= worker.broker.get_declared_queues();"
            " kwargs = worker.broker.client.connection_pool.connection_kwargs;"
            " assert (kwargs['port'], kwargs['db']) == (6390, 3), kwargs")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, env=env)
    assert result.returncode == 0, result.stderr


def test_command_checker_rejects_what_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="not a subcommand"):
        check_command(["python", "-m", "pgreembed", "frobnicate"], "test")
    with pytest.raises(AssertionError, match="rejects"):
        check_command(["python", "-m", "pgreembed", "tick", "--no-such-flag"], "test")
    with pytest.raises(AssertionError, match="not worker"):
        check_command(["dramatiq", "--processes", "2", "workers"], "test")
    with pytest.raises(AssertionError, match="neither"):
        check_command(["celery", "worker"], "test")
    kind, _ = check_command(["/opt/venv/bin/python3", "-m", "pgreembed", "--config", "x.toml",
                             "tick", "--wait"], "test")
    assert kind == "pgreembed"


# -- Dockerfile -----------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    extras = [set(m.group(1).split(",")) for r in runs
              if (m := re.search(r"pip install [\"']?\.\[([\w,-]+)\][\"']?", r))]
    # The offline model (the default config) and the exporters the manifests scrape.
    assert any({"local", "metrics"} <= each for each in extras), runs
    # Everything the install needs is copied in, from paths that exist.
    copied = [shlex.split(rest)[:-1] for kw, rest in instructions if kw == "COPY"]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert {"pyproject.toml", "pgreembed", "worker", "scheduler"} <= {
        s for sources in copied for s in sources}
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    cmds = [rest for kw, rest in instructions if kw == "CMD"]
    assert len(cmds) == 1
    kind, args = check_command(json.loads(cmds[0]), "Dockerfile CMD")
    assert kind == "pgreembed" and args.command == "scheduler"
    # The worker command documented in the Dockerfile is a valid one too.
    documented = re.search(r"#\s+(dramatiq .+ worker)\s*$",
                           (DEPLOY / "Dockerfile").read_text(), re.M)
    assert documented, "the Dockerfile should show the worker command"
    check_command(shlex.split(documented.group(1)), "Dockerfile comment")


# -- compose --------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def seconds(value: str | int) -> float:
    if isinstance(value, int):
        return float(value)
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, f"unparsed duration {value!r}"
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match[2]]


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "init", "worker", "scheduler"}
    assert services["postgres"]["image"] == "pgvector/pgvector:pg17"
    assert services["redis"]["image"] == "redis:7"
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a healthcheck"
    for name in ("init", "worker", "scheduler"):
        service = services[name]
        env = service["environment"]
        assert {"DATABASE_URL", "REDIS_URL", "PGREEMBED_CONFIG"} <= set(env), name
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile").resolve()
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert env["PGREEMBED_CONFIG"] in mounts, f"{name}: config not mounted"
        assert (DEPLOY / mounts[env["PGREEMBED_CONFIG"]]).resolve() == (
            DEPLOY / "pgreembed.example.toml").resolve()
    kinds = {name: check_command(services[name]["command"], f"compose {name}")
             for name in ("init", "worker", "scheduler")}
    assert kinds["init"][0] == "pgreembed" and kinds["init"][1].command == "init"
    assert kinds["scheduler"][0] == "pgreembed" and kinds["scheduler"][1].command == "scheduler"
    assert kinds["worker"][0] == "dramatiq"
    assert services["init"]["restart"] == "no"
    for name in ("worker", "scheduler"):
        assert services[name]["depends_on"]["init"]["condition"] == (
            "service_completed_successfully")
        assert services[name]["restart"] in ("always", "unless-stopped")
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Docker's SIGKILL comes after Dramatiq's own shutdown timeout.
    grace = seconds(services["worker"]["stop_grace_period"])
    assert kinds["worker"][1].worker_shutdown_timeout / 1000 < grace
    for mount in services["postgres"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source


def test_example_config_parses() -> None:
    document = tomllib.loads((DEPLOY / "pgreembed.example.toml").read_text())
    settings = parse_settings(document, ENV)
    target = settings.target("docs")
    assert target.provider == "local" and target.dimensions == 384


# -- Kubernetes -----------------------------------------------------------------------

def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind in ("Deployment", "Job", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    raise KeyError(kind)


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def all_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "Job", "CronJob"):
            spec = pod_spec(doc)
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{path.name}:{container['name']}", container, doc


def test_k8s_files_exist_and_have_required_fields() -> None:
    names = {p.name for p in K8S.glob("*.yaml")}
    assert {"worker-deployment.yaml", "scheduler-deployment.yaml", "cronjob.yaml",
            "configmap.yaml", "secret.example.yaml"} <= names
    docs = list(k8s_documents())
    assert len(docs) >= 5
    for path, doc in docs:
        for field in ("apiVersion", "kind"):
            assert doc.get(field), f"{path.name}: missing {field}"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: missing metadata.name"
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{path.name}: selector != labels"


def test_k8s_containers_run_real_commands() -> None:
    seen = {}
    for where, container, _ in all_containers():
        assert container.get("image"), f"{where}: no image"
        assert container.get("command"), f"{where}: no command"
        seen[where] = check_command(container["command"], where)
        limits = container.get("resources", {})
        assert limits.get("requests"), f"{where}: no resource requests"
    assert seen["worker-deployment.yaml:worker"][0] == "dramatiq"
    assert seen["scheduler-deployment.yaml:scheduler"][1].command == "scheduler"
    assert seen["cronjob.yaml:tick"][1].command == "tick"


def test_k8s_secrets_come_from_secret_key_refs() -> None:
    secret = by_kind("Secret", "pgreembed-secrets")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for where, container, _ in all_containers():
        for env in container.get("env", []):
            if env["name"] in SECRET_ENV:
                assert "value" not in env, f"{where}: {env['name']} is a literal value"
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "pgreembed-secrets", where
                assert ref["key"] in keys, f"{where}: secret key {ref['key']} not in example"
            else:
                assert not str(env.get("value", "")).startswith(("sk-", "postgres")), where
        names = {e["name"] for e in container.get("env", [])}
        assert "DATABASE_URL" in names, f"{where}: no DATABASE_URL"
    worker = by_kind("Deployment", "pgreembed-worker")
    worker_env = {e["name"] for e in pod_spec(worker)["containers"][0]["env"]}
    assert {"DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY"} <= worker_env


def test_k8s_worker_shuts_down_gracefully() -> None:
    worker = by_kind("Deployment", "pgreembed-worker")
    spec = pod_spec(worker)
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= 60
    [container] = spec["containers"]
    args = check_dramatiq(container["command"][1:], "worker")
    # Dramatiq finishes its messages (up to its shutdown timeout) before the SIGKILL.
    assert args.worker_shutdown_timeout / 1000 < grace
    assert container["resources"]["limits"]["memory"]


def test_k8s_scheduler_is_a_single_replica() -> None:
    scheduler = by_kind("Deployment", "pgreembed-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_cronjob() -> None:
    cron = by_kind("CronJob", "pgreembed-tick")
    assert cron["apiVersion"] == "batch/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int)
    spec = pod_spec(cron)
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    args = check_pgreembed(spec["containers"][0]["command"][3:], "cronjob")
    assert args.command == "tick" and args.wait
    assert job["activeDeadlineSeconds"] > args.timeout, "the job must outlive --timeout"


def test_k8s_config_is_valid_and_mounted() -> None:
    configmap = by_kind("ConfigMap", "pgreembed-config")
    [(filename, text)] = configmap["data"].items()
    settings = parse_settings(tomllib.loads(text), ENV)
    assert settings.targets
    for where, container, doc in all_containers():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        config_path = Path(env["PGREEMBED_CONFIG"])
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
        mounted = [name for name, path in mounts.items()
                   if volumes[name].get("configMap", {}).get("name") == "pgreembed-config"
                   and Path(path) / filename == config_path]
        assert mounted, f"{where}: {config_path} is not the mounted ConfigMap"


# -- systemd --------------------------------------------------------------------------

def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit as section -> [(key, value)] (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        assert current is not None, f"{name}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: bad line {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def value(section: list[tuple[str, str]], key: str) -> str | None:
    values = [v for k, v in section if k == key]
    return values[-1] if values else None


def exec_argv(line: str) -> list[str]:
    return shlex.split(line.lstrip("-@+!:"))


@pytest.mark.parametrize("name, kind, subcommand", [
    ("pgreembed-worker.service", "dramatiq", None),
    ("pgreembed-scheduler.service", "pgreembed", "scheduler"),
])
def test_systemd_long_running_units(name: str, kind: str, subcommand: str | None) -> None:
    sections = unit(name)
    service = sections["Service"]
    start = value(service, "ExecStart")
    assert start, f"{name}: no ExecStart"
    found, args = check_command(exec_argv(start), name)
    assert found == kind
    if subcommand:
        assert args.command == subcommand
    for key, line in service:
        if key.startswith("ExecStart") and key != "ExecStart":
            check_command(exec_argv(line), f"{name} {key}")
    # A SIGKILLed dramatiq process ends the whole command: it must come back.
    assert value(service, "Restart") == "always"
    assert value(service, "KillSignal") == "SIGTERM"
    stop = value(service, "TimeoutStopSec")
    assert stop and stop.isdigit()
    if kind == "dramatiq":
        assert args.worker_shutdown_timeout / 1000 < int(stop)
    assert value(sections["Install"], "WantedBy")


def test_systemd_tick_and_timer() -> None:
    service = unit("pgreembed-tick.service")["Service"]
    assert value(service, "Type") == "oneshot"
    start = value(service, "ExecStart")
    assert start
    kind, args = check_command(exec_argv(start), "pgreembed-tick.service")
    assert kind == "pgreembed" and args.command == "tick" and args.wait
    timeout = value(service, "TimeoutStartSec")
    assert timeout and int(timeout) > args.timeout
    timer = unit("pgreembed-tick.timer")
    assert value(timer["Timer"], "OnCalendar")
    assert (SYSTEMD / (value(timer["Timer"], "Unit") or "pgreembed-tick.service")).exists()
    assert value(timer["Install"], "WantedBy") == "timers.target"


# -- Procfile -------------------------------------------------------------------------

def test_procfile_commands_exist() -> None:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = check_command(shlex.split(command), f"Procfile {name}")
    assert entries["worker"][0] == "dramatiq"
    assert entries["scheduler"][1].command == "scheduler"
