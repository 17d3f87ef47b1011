"""The deploy artifacts a user applies (Dockerfile, deploy/kubernetes/, deploy/systemd/,
deploy/env.example), checked offline: hadolint, kubernetes-validate's bundled schemas,
systemd-analyze, and what they must agree on with the settings and with each other."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spicesync.codec import generate_key
from spicesync.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# Each unit, the command it runs, and the kill timeout its own shutdown must fit in.
UNITS = {
    "spicesync-worker.service": ("worker", "spicesync"),
    "spicesync-outbox-relay.service": ("relay outbox", "spicesync-outbox-relay"),
    "spicesync-cdc-relay.service": ("relay cdc", "spicesync-cdc-relay"),
    "spicesync-nats-relay.service": ("relay nats", "spicesync-nats-relay"),
}
# The oldest Kubernetes release the manifests are meant for, and the newest schema bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SETTINGS = {str(field.validation_alias) for field in Settings.model_fields.values()}


def _tool(name: str) -> str:
    """A console script of this environment (hadolint and kubernetes-validate are dev deps)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed; run `make setup`"
    return found


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for _, d in _documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_templates() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for _, d in _documents()
        if d["kind"] in ("Deployment", "Job")
    }


def _config() -> dict[str, str]:
    return dict(_one("ConfigMap", "spicesync")["data"])


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- Dockerfile ------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    linted = subprocess.run(
        [_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


def test_the_image_runs_the_locked_worker_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]  # the runtime stage
    assert "uv sync --frozen --no-dev --no-editable" in text
    user = re.search(r"^USER (\d+):(\d+)$", final, re.M)
    assert user and int(user[1]) != 0 and int(user[2]) != 0
    assert 'ENTRYPOINT ["spicesync"]' in final and 'CMD ["worker"]' in final
    assert "SPICESYNC_ENV=production" in final
    # The pods' runAsUser is the image's user, and they listen where the image says.
    pod = _pod_templates()["spicesync-worker"]["spec"]["securityContext"]
    assert pod["runAsUser"] == int(user[1])
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", final, re.M)[0].split()}
    served = {
        _port(address)
        for key, address in _config().items()
        if key.startswith("SPICESYNC_") and key.endswith("_ADDRESS")
    }
    assert exposed == served


# -- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly_against_the_bundled_schemas(version: str) -> None:
    documents = _documents()
    assert {d["kind"] for _, d in documents} >= {
        "Namespace",
        "Secret",
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
    }
    for path, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {err.message}")


def test_the_command_line_validator_accepts_every_file() -> None:
    checked = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_pod_is_locked_down_and_has_a_writable_state_dir() -> None:
    state_dir = _config()["SPICESYNC_STATE_DIR"]
    templates = _pod_templates()
    assert set(templates) == {
        "spicesync-worker",
        "spicesync-outbox-relay",
        "spicesync-cdc-relay",
        "spicesync-nats-relay",
        "spicesync-migrate",
        "spicesync-setup-namespace",
    }
    for name, template in templates.items():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["runAsNonRoot"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            # Everything the read-only root leaves writable is an emptyDir of bounded size.
            for path in (state_dir, "/tmp"):
                assert not mounts[path].get("readOnly"), (name, path)
                assert volumes[mounts[path]["name"]]["emptyDir"]["sizeLimit"], (name, path)
    assert len({c["image"] for t in templates.values() for c in t["spec"]["containers"]}) == 1


@pytest.mark.parametrize(
    ("name", "metrics", "health"),
    [
        ("spicesync-worker", "SPICESYNC_METRICS_ADDRESS", "SPICESYNC_HEALTH_ADDRESS"),
        (
            "spicesync-outbox-relay",
            "SPICESYNC_OUTBOX_METRICS_ADDRESS",
            "SPICESYNC_OUTBOX_HEALTH_ADDRESS",
        ),
        ("spicesync-cdc-relay", "SPICESYNC_CDC_METRICS_ADDRESS", "SPICESYNC_CDC_HEALTH_ADDRESS"),
        ("spicesync-nats-relay", "SPICESYNC_NATS_METRICS_ADDRESS", "SPICESYNC_NATS_HEALTH_ADDRESS"),
    ],
)
def test_long_running_pods_probe_and_expose_what_their_settings_serve(
    name: str, metrics: str, health: str
) -> None:
    config = _config()
    template = _one("Deployment", name)["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": _port(config[metrics]), "health": _port(config[health])}
    # Probes and scrapes reach the pod's IP: both must listen on every interface.
    assert config[health].startswith("0.0.0.0:") and config[metrics].startswith("0.0.0.0:")
    for probe, path in (
        ("livenessProbe", "/livez"),
        ("startupProbe", "/livez"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}, probe
        # A probe waits longer than one health check may take (2 s).
        assert container[probe]["timeoutSeconds"] > 2, probe
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_the_worker_drains_within_its_pod_grace_and_keeps_one_up() -> None:
    config = _config()
    deployment = _one("Deployment", "spicesync-worker")
    template = deployment["spec"]["template"]
    (worker,) = template["spec"]["containers"]
    # SIGKILL comes only after the worker's own grace for in-flight activities.
    grace = float(config["SPICESYNC_SHUTDOWN_GRACE_SECONDS"])
    assert template["spec"]["terminationGracePeriodSeconds"] > grace
    assert worker["args"] == ["worker"]
    budget = _one("PodDisruptionBudget")
    assert (
        budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )
    assert (
        budget["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    )


def test_the_jobs_run_the_operator_commands() -> None:
    templates = _pod_templates()
    for name, command in (
        ("spicesync-migrate", "migrate"),
        ("spicesync-setup-namespace", "setup-namespace"),
    ):
        spec = templates[name]["spec"]
        assert spec["restartPolicy"] == "Never"
        assert spec["containers"][0]["args"] == [command]


def test_secrets_come_from_the_secret_and_the_rest_is_a_known_setting() -> None:
    secret = _one("Secret", "spicesync")
    secret_keys = set(secret["stringData"])
    assert secret_keys == {"DATABASE_URL", "SPICEDB_PRESHARED_KEY", "SPICESYNC_ENCRYPTION_KEYS"}
    config = _config()
    assert not secret_keys & set(config), "a secret in the ConfigMap"
    for key in config:
        # spicesync's settings, and the Temporal SDK's and OpenTelemetry's own variables.
        assert key in SETTINGS or key.startswith(("TEMPORAL_", "OTEL_")), key
    for name, template in _pod_templates().items():
        (container,) = template["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "spicesync"}}], name
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert all(ref["name"] == "spicesync" and ref["key"] == var for var, ref in refs.items())
        required = {var for var, ref in refs.items() if not ref.get("optional")}
        assert required == secret_keys, name  # every pod gets every required secret
        assert set(refs) - required == {"TEMPORAL_API_KEY"}, name


def test_the_configmap_and_secret_make_valid_production_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a pod sees parses into production settings (the example secret filled in)."""
    secret = _one("Secret", "spicesync")["stringData"]
    for key, value in {**_config(), **secret}.items():
        monkeypatch.setenv(key, value)
    # The real secrets' shapes, where the template says CHANGE-ME.
    monkeypatch.setenv("SPICEDB_PRESHARED_KEY", "p" * 44)
    monkeypatch.setenv("SPICESYNC_ENCRYPTION_KEYS", f"k1:{generate_key()}")
    settings = Settings(_env_file=None)
    assert settings.environment == "production"
    assert settings.spicedb_insecure is False
    assert settings.state_dir == Path("/var/lib/spicesync")
    assert settings.trace_path() is None  # nothing written outside the emptyDirs
    assert settings.plaintext_connections() == []
    assert settings.temporal_connect_config().get("tls")


def test_the_nats_relay_pod_makes_valid_production_nats_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigMap and the NATS relay's pod (its credentials file where the Secret is mounted)
    pass the relay's production checks: TLS and credentials."""
    template = _one("Deployment", "spicesync-nats-relay")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["args"] == ["relay", "nats"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    creds = Path(env["SPICESYNC_NATS_CREDS"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mount = mounts["nats-credentials"]
    assert mount["readOnly"] is True and Path(mount["mountPath"]) == creds.parent
    secret = volumes["nats-credentials"]["secret"]
    assert secret["secretName"] == "spicesync-nats"
    assert {i["path"] for i in secret["items"]} == {creds.name}
    assert {i["key"] for i in secret["items"]} <= set(
        _one("Secret", "spicesync-nats")["stringData"]
    )
    for key, value in {**_config(), **_one("Secret", "spicesync")["stringData"]}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SPICEDB_PRESHARED_KEY", "p" * 44)
    monkeypatch.setenv("SPICESYNC_ENCRYPTION_KEYS", f"k1:{generate_key()}")
    local_creds = tmp_path / creds.name  # the mounted file, here
    local_creds.write_text("-")
    monkeypatch.setenv("SPICESYNC_NATS_CREDS", str(local_creds))
    assert Settings(_env_file=None).nats_problems() == []
    monkeypatch.delenv("SPICESYNC_NATS_CREDS")
    assert Settings(_env_file=None).nats_problems() != []  # production: credentials needed


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = _one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        d["metadata"].get("namespace") == "spicesync"
        for _, d in _documents()
        if d["kind"] != "Namespace"
    )


# -- env.example -------------------------------------------------------------------------------


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (DEPLOY / "env.example").read_text(), re.M))
    assert SETTINGS - listed == set()
    # Besides spicesync's own: the Temporal SDK's env-config and OpenTelemetry's variables.
    assert all(name.startswith(("TEMPORAL_", "OTEL_")) for name in listed - SETTINGS)


# -- systemd -----------------------------------------------------------------------------------


def _unit_entries(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows a key more than once."""
    section, entries = "", []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            entries.append((section, key, value))
    return entries


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_unit_runs_with_a_dynamic_user_in_its_state_directory(unit: str) -> None:
    command, state = UNITS[unit]
    service = {}
    environment = {}
    for section, key, value in _unit_entries(DEPLOY / "systemd" / unit):
        if section == "Service":
            service[key] = value
            if key == "Environment":
                name, _, setting = value.partition("=")
                environment[name] = setting
    assert service["DynamicUser"] == "yes"
    # Its own: two DynamicUser services sharing one would take it from each other.
    assert service["StateDirectory"] == state
    assert service["StateDirectoryMode"] == "0700"
    # The state dir is where the process runs and where its settings say it may write: with
    # DynamicUser, ProtectSystem=strict makes everything else read-only.
    assert service["WorkingDirectory"] == f"%S/{state}"
    assert environment["SPICESYNC_STATE_DIR"] == f"%S/{state}"
    assert environment["SPICESYNC_ENV"] == "production"
    assert service["ExecStart"] == f"/opt/spicesync/bin/spicesync {command}"
    assert service["KillSignal"] == "SIGTERM"
    stop = int(service["TimeoutStopSec"])
    defaults = Settings(_env_file=None)
    grace = defaults.shutdown_grace_seconds if command == "worker" else 0
    assert stop > max(grace, defaults.outbox_rpc_timeout_seconds, defaults.cdc_rpc_timeout_seconds)
    deadline = max(defaults.outbox_rpc_timeout_seconds, defaults.nats_rpc_timeout_seconds)
    assert stop > max(grace, deadline)
    for hardening in (
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "RestrictNamespaces",
    ):
        assert service[hardening] == "yes", hardening
    assert service["CapabilityBoundingSet"] == ""


def _installed_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's `spicesync` (verify checks that
    the program exists; /opt/spicesync is where a real install puts it)."""
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "ExecStart=/opt/spicesync/bin/spicesync " in text
    copy = tmp_path / unit
    copy.write_text(text.replace("/opt/spicesync/bin/spicesync", _tool("spicesync")))
    return copy


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_verifies_the_unit_and_rates_it_ok(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    copy = _installed_copy(unit, tmp_path)
    verified = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown keys and bad values are warnings with exit 0: no output at all is the bar.
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level[1]) < 2.0 and level[2] == "OK", level[0]
