"""deploy/: the container image file, the compose file with BIND 9, the Kubernetes manifest.

No container engine here: the files are checked as far as tools and schemas allow, and for
what they must say to each other (ports, paths, users, keys, options kmsd knows)."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kmsd import config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
MANIFEST = DEPLOY / "kubernetes" / "kmsd.yaml"


# Containerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def test_containerfile() -> None:
    steps = instructions((DEPLOY / "Containerfile").read_text())
    assert {word for word, _ in steps} <= KNOWN
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) == 2 and all("-slim" in s for s in stages)
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    last = {word: args for word, args in final}  # the last of each in the run stage
    assert last["USER"].split(":")[0] not in ("root", "0")
    assert last["EXPOSE"] == "1688/tcp"
    assert json.loads(last["VOLUME"]) == ["/var/lib/kmsd"]
    assert "KMSD_DB=/var/lib/kmsd/kmsd.db" in last["ENV"]
    assert json.loads(last["ENTRYPOINT"]) == ["kmsd"]
    health = last["HEALTHCHECK"]
    assert "--interval=" in health and "--timeout=" in health
    probe = json.loads(health[health.index("CMD ") + 4 :])
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "healthcheck", "exec")  # valid Python
    assert "1688" in probe[2]
    # Everything COPY'd from the build context exists.
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    # The user that owns the volume is the one the image runs as.
    run = " ".join(args for word, args in final if word == "RUN")
    uid = re.search(r"useradd .*--uid (\d+)", run)
    assert uid and last["USER"].split(":")[0] == uid.group(1)
    assert "chown kmsd:kmsd /var/lib/kmsd" in run


# compose.yaml


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "volumes", "networks", "ports",
    "depends_on", "restart", "read_only", "cap_drop", "security_opt", "stop_grace_period",
    "network_mode", "healthcheck", "user",
}  # fmt: skip


def test_compose_structure_and_references() -> None:
    data = compose()
    assert set(data) <= {"services", "networks", "volumes", "configs", "secrets"}
    services = data["services"]
    assert {"kmsd", "bind", "bind-init"} <= set(services)
    volumes, networks = set(data.get("volumes") or {}), set(data.get("networks") or {})
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        assert "image" in service or "build" in service, name
        for mount in service.get("volumes", []):
            source, target, *mode = mount.split(":")
            assert target.startswith("/") and mode in ([], ["ro"]), mount
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), mount
            else:
                assert source in volumes, mount
        for network in service.get("networks", {}):
            assert network in networks, (name, network)
        for other, condition in service.get("depends_on", {}).items():
            assert other in services and condition["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
        for port in service.get("ports", []):
            assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?\d+:\d+(/tcp|/udp)?", port), port
    build = services["kmsd"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    assert "1688:1688/tcp" in services["kmsd"]["ports"]


def test_compose_kmsd_publishes_to_its_bind() -> None:
    data = compose()
    services = data["services"]
    env = services["kmsd"]["environment"]
    by_env = {o.env: o for o in config.OPTIONS}
    for name, value in env.items():
        option = by_env[name]  # a KMSD_ variable kmsd knows
        if option.name != "publish_key":  # a file made at run time: checked below
            config._from_text(option, str(value))
    subnet = ipaddress.ip_network(data["networks"]["lab"]["ipam"]["config"][0]["subnet"])
    bind_ip = services["bind"]["networks"]["lab"]["ipv4_address"]
    kmsd_ip = services["kmsd"]["networks"]["lab"]["ipv4_address"]
    assert ipaddress.ip_address(bind_ip) in subnet and ipaddress.ip_address(kmsd_ip) in subnet
    assert env["KMSD_PUBLISH_SERVER"] == bind_ip and env["KMSD_PUBLISH_ADDRESS"] == kmsd_ip
    named = (DEPLOY / "bind" / "named.conf").read_text()
    assert f'zone "{env["KMSD_PUBLISH_ZONE"]}"' in named
    assert env["KMSD_PUBLISH_HOST"].endswith("." + env["KMSD_PUBLISH_ZONE"])
    # The key: made by bind-init into the keys volume, included by named, read by kmsd.
    key = env["KMSD_PUBLISH_KEY"]
    script = services["bind-init"]["command"][0]
    made = re.search(r"tsig-keygen -a (\S+) (\S+) > (\S+)", script)
    assert made and made.group(3) == key
    assert f'include "{key}";' in named
    assert f"grant {made.group(2)} zonesub ANY;" in named
    assert all("keys:/keys" in " ".join(services[s]["volumes"]) for s in ("kmsd", "bind"))
    assert services["kmsd"]["depends_on"]["bind-init"]["condition"] == (
        "service_completed_successfully"
    )


# Debian's docker-compose package (in the README's test command) ships the Compose
# specification's JSON schema; `docker-compose config` checks the file against it too.
COMPOSE_SPEC = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


def test_compose_file_matches_the_compose_specification() -> None:
    if not COMPOSE_SPEC.exists():
        pytest.fail(f"{COMPOSE_SPEC} missing: apt-get install docker-compose (README)")
    schema = json.loads(COMPOSE_SPEC.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.message} at {list(e.path)}" for e in validator.iter_errors(compose())]
    assert errors == []
    # The check can fail: a misspelt key is refused.
    broken = compose() | {"servics": {}}
    assert any("servics" in e.message for e in validator.iter_errors(broken))


def test_compose_config_validates() -> None:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose missing: apt-get install docker-compose (README)")
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("named-checkconf") is None, reason="BIND 9 not installed")
def test_bind_configuration_and_zone(tmp_path: Path) -> None:
    """named.conf and the zone as the compose file lays them out, in a chroot of tmp_path."""
    zone = DEPLOY / "bind" / "lab.test.zone"
    (tmp_path / "keys").mkdir()
    (tmp_path / "etc/bind").mkdir(parents=True)
    (tmp_path / "var/lib/bind").mkdir(parents=True)
    (tmp_path / "var/cache/bind").mkdir(parents=True)
    key = subprocess.run(
        ["tsig-keygen", "-a", "hmac-sha256", "kmsd-update"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    (tmp_path / "keys/kmsd-update.key").write_text(key)
    shutil.copy(DEPLOY / "bind" / "named.conf", tmp_path / "etc/bind/named.conf")
    shutil.copy(zone, tmp_path / "var/lib/bind/lab.test.zone")
    checked = subprocess.run(
        ["named-checkconf", "-z", "-t", str(tmp_path), "/etc/bind/named.conf"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = subprocess.run(
        ["named-checkzone", "lab.test", str(zone)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout
    # kmsd reads the key file that tsig-keygen makes.
    from kmsd.dns.keyfile import read_key

    read_key(tmp_path / "keys/kmsd-update.key")


# Kubernetes


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_kubernetes_manifest_validates_against_the_schema() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for document in manifests():
        try:
            kv.validate(document, kv.latest_version(), strict=True)
        except kv.ValidationError as exc:  # its message embeds the whole schema: cut it
            pytest.fail(f"{document['kind']}: {exc.message} at {list(exc.path)}")


def test_kubernetes_manifest_fits_together() -> None:
    by_kind = {d["kind"]: d for d in manifests()}
    assert set(by_kind) == {"ConfigMap", "Service", "StatefulSet"}
    sts, cm = by_kind["StatefulSet"], by_kind["ConfigMap"]
    services = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Service"}
    spec = sts["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    for each in services.values():
        assert each["spec"]["selector"].items() <= labels.items()
    # The governing Service of a StatefulSet must be headless; clients use the other one.
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None"
    (service,) = (s for s in services.values() if s["spec"].get("clusterIP") != "None")
    (container,) = spec["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == 1688 and ports[service_port["targetPort"]] == 1688
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["tcpSocket"]["port"] in ports
    # The database on the claim, where kmsd.toml says it is; kmsd.toml valid for kmsd.
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    toml_path = Path(container["args"][container["args"].index("--config") + 1])
    assert mounts["config"] == str(toml_path.parent)
    settings = tomllib.loads(cm["data"][toml_path.name])
    assert Path(settings["table"]["db"]).parent == Path(mounts[claim["metadata"]["name"]])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_configmap_is_a_valid_kmsd_configuration(tmp_path: Path) -> None:
    cm = next(d for d in manifests() if d["kind"] == "ConfigMap")
    file = tmp_path / "kmsd.toml"
    file.write_text(cm["data"]["kmsd.toml"])
    values = config.read_file(file)
    assert values["listen"] == [("0.0.0.0", 1688)]


def test_containerfile_and_manifest_agree_on_the_user() -> None:
    steps = instructions((DEPLOY / "Containerfile").read_text())
    user = [args for word, args in steps if word == "USER"][-1]
    pod = next(d for d in manifests() if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
