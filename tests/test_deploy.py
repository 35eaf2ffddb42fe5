"""The deployment in ``deploy/`` is safe by default and valid for the tools that read it.

- ``cluster.yaml`` goes through Ray's own cluster-launcher checks, offline: ``prepare_config``
  (the local provider's preparation, then ``fillout_defaults`` with Ray's defaults) and
  ``validate_config`` (``ray/autoscaler/ray-schema.json``), as ``ray up`` does before it
  touches a machine; every ``ray start`` in it runs with ``RAY_AUTH_MODE=token`` and the
  dashboard listens on loopback.
- ``rayjob.yaml`` and ``raycluster.yaml`` use only KubeRay fields that exist (names vendored
  below from the KubeRay CRDs), have the required ones, and turn token authentication on with
  the token taken from a Kubernetes Secret (``secretKeyRef``), never a literal.
- The Dockerfile installs the project against the lock file ``constraints.txt``.
- No file in ``deploy/`` holds anything that looks like a secret, disables authentication, or
  opens the dashboard on all interfaces without token mode (the scanner is checked on planted
  samples first).
"""

from __future__ import annotations

import copy
import re
import secrets
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY_MANIFESTS = {"rayjob.yaml": "RayJob", "raycluster.yaml": "RayCluster"}
TOKEN_SECRET_KEY = "auth_token"  # the data key KubeRay reads from authOptions.secretName
MIN_RAY_FOR_TOKEN_AUTH = (2, 52)

# Field names of the KubeRay CRDs (ray-project/kuberay, ray-operator/config/crd/bases/
# ray.io_rayjobs.yaml and ray.io_rayclusters.yaml at v1.6.0, the first release with
# authOptions.secretName; later releases only add fields). Only the levels the manifests fill
# are listed; pod templates are plain Kubernetes PodTemplateSpecs and are not checked here.
RAYJOB_SPEC_FIELDS = frozenset(
    "activeDeadlineSeconds backoffLimit clusterSelector deletionStrategy entrypoint "
    "entrypointNumCpus entrypointNumGpus entrypointResources jobId managedBy metadata "
    "preRunningDeadlineSeconds rayClusterSpec runtimeEnvYAML shutdownAfterJobFinishes "
    "submissionMode submitterConfig submitterPodTemplate suspend ttlSecondsAfterFinished".split()
)
RAYCLUSTER_SPEC_FIELDS = frozenset(
    "authOptions autoscalerOptions enableInTreeAutoscaling gcsFaultToleranceOptions "
    "headGroupSpec headServiceAnnotations managedBy rayVersion suspend upgradeStrategy "
    "workerGroupSpecs".split()
)
RAYCLUSTER_SPEC_REQUIRED = frozenset({"headGroupSpec"})
HEAD_GROUP_FIELDS = frozenset(
    "enableIngress headService labels rayStartParams resources serviceType template".split()
)
HEAD_GROUP_REQUIRED = frozenset({"template"})
WORKER_GROUP_FIELDS = frozenset(
    "groupName idleTimeoutSeconds labels maxReplicas minReplicas numOfHosts rayStartParams "
    "replicas resources scaleStrategy suspend template".split()
)
WORKER_GROUP_REQUIRED = frozenset({"groupName", "maxReplicas", "minReplicas", "template"})
AUTH_OPTIONS_FIELDS = frozenset({"enableK8sTokenAuth", "mode", "secretName"})
AUTH_MODES = frozenset({"disabled", "token"})


def load_yaml(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict), name
    return data


# --- cluster.yaml: Ray's own validation --------------------------------------------------------


def prepared_cluster_config() -> dict[str, Any]:
    """``cluster.yaml`` as ``ray up`` sees it after its offline preparation, validated."""
    prepared = prepare_config(load_yaml("cluster.yaml"))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_cluster_config_validation() -> None:
    prepared = prepared_cluster_config()
    assert "cluster_synced_files" in prepared  # filled in from Ray's defaults
    assert prepared["head_node_type"] in prepared["available_node_types"]
    raw = load_yaml("cluster.yaml")
    # prepare_config caps max_workers at the number of worker hosts, with a warning: none here
    assert raw["max_workers"] == len(raw["provider"]["worker_ips"]) == prepared["max_workers"]


def test_rays_validator_rejects_a_misspelt_field() -> None:
    prepared = prepared_cluster_config()
    broken = copy.deepcopy(prepared)
    broken["head_start_ray_command"] = broken.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def ray_start_commands(config: dict[str, Any], key: str) -> list[str]:
    commands = [c for c in config[key] if " ray start" in f" {c}" or "/ray start" in c]
    assert commands, f"no `ray start` in {key}"
    return commands


def test_cluster_yaml_starts_every_node_with_token_auth() -> None:
    config = load_yaml("cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in ray_start_commands(config, key):
            assert "RAY_AUTH_MODE=token" in command.split(), command
    (head,) = ray_start_commands(config, "head_start_ray_commands")
    host = re.search(r"--dashboard-host[= ](\S+)", head)
    assert host is not None and host.group(1) in {"127.0.0.1", "localhost"}, head
    # The token travels as a file copied by `ray up` to Ray's default token path, not as text.
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# --- KubeRay manifests ---------------------------------------------------------------------------


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    if manifest["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    return spec


def assert_fields(
    where: str, value: dict[str, Any], known: frozenset[str], required: frozenset[str]
) -> None:
    assert isinstance(value, dict), where
    assert not set(value) - known, f"{where}: fields KubeRay does not know {set(value) - known}"
    assert not required - set(value), f"{where}: missing required {required - set(value)}"


def node_groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = [("headGroupSpec", spec["headGroupSpec"])]
    return head + [(f"workerGroupSpecs[{g['groupName']}]", g) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize(("name", "kind"), KUBERAY_MANIFESTS.items())
def test_kuberay_manifest_uses_known_fields(name: str, kind: str) -> None:
    manifest = load_yaml(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == kind
    assert manifest["metadata"]["name"]
    if kind == "RayJob":
        assert_fields("spec", manifest["spec"], RAYJOB_SPEC_FIELDS, frozenset({"entrypoint"}))
        assert manifest["spec"]["entrypoint"].strip()
        assert isinstance(yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]), dict)
    spec = cluster_spec(manifest)
    assert_fields("cluster spec", spec, RAYCLUSTER_SPEC_FIELDS, RAYCLUSTER_SPEC_REQUIRED)
    assert "authOptions" in spec, "token authentication is not on"
    assert_fields("authOptions", spec["authOptions"], AUTH_OPTIONS_FIELDS, frozenset({"mode"}))
    assert_fields("headGroupSpec", spec["headGroupSpec"], HEAD_GROUP_FIELDS, HEAD_GROUP_REQUIRED)
    assert spec["workerGroupSpecs"], "no worker group"
    for group in spec["workerGroupSpecs"]:
        assert_fields("worker group", group, WORKER_GROUP_FIELDS, WORKER_GROUP_REQUIRED)
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for where, group in node_groups(spec):
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{where}: map[string]string"
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), where


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifest_takes_the_token_from_a_secret(name: str) -> None:
    spec = cluster_spec(load_yaml(name))
    version = tuple(int(part) for part in spec["rayVersion"].split(".")[:2])
    assert version >= MIN_RAY_FOR_TOKEN_AUTH, "KubeRay refuses authOptions below Ray 2.52"
    auth = spec["authOptions"]
    assert auth["mode"] in AUTH_MODES and auth["mode"] == "token"
    assert auth["secretName"]
    for where, group in node_groups(spec):
        for container in group["template"]["spec"]["containers"]:
            env = env_of(container)
            assert env["RAY_AUTH_MODE"].get("value") == "token", where
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, f"{where}: a literal token"
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref == {"name": auth["secretName"], "key": TOKEN_SECRET_KEY}, where


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_dashboard_is_reachable_only_with_the_token(name: str) -> None:
    spec = cluster_spec(load_yaml(name))
    head = spec["headGroupSpec"]
    # KubeRay binds the dashboard to 0.0.0.0 when dashboard-host is unset: that (and an
    # explicit 0.0.0.0) is only acceptable with token mode on, and inside the cluster.
    if head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0") == "0.0.0.0":
        assert spec["authOptions"]["mode"] == "token"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    assert not pending, "a continuation line ends the Dockerfile"
    pairs = [tuple(line.split(None, 1)) for line in logical]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def test_dockerfile_installs_from_the_lock_file() -> None:
    steps = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")
    installs = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args]
    assert len(installs) == 1, "one pip install, against the lock file"
    install = steps[installs[0]][1]
    assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", install), install
    assert re.search(r"pip install .*-e \.(\s|$)", install), install
    assert "|| true" not in install, "a failed install must fail the build"
    copied = [args for op, args in steps[: installs[0]] if op == "COPY"]
    assert any("constraints.txt" in args.split() for args in copied), "lock file copied first"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "runs as a non-root user"


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    steps = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [r.strip() for r in ignore if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "the context starts empty"
    allowed = {r.removeprefix("!").rstrip("/") for r in rules if r.startswith("!")}
    for op, args in steps:
        if op == "COPY":
            assert set(args.split()[:-1]) <= allowed, args


# --- secret scan ---------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "long hex string (a Ray token is 64 hex digits)": r"\b[0-9a-fA-F]{32,}\b",
    "long base64 string": r"(?<![\w/.-])[A-Za-z0-9+/]{40,}={0,2}(?![\w/.-])",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "cloud or forge token": r"\b(AKIA[0-9A-Z]{16}|gh[pousr]_\w{20,}|xox[abprs]-[\w-]{10,})",
    "credentials in a URL": r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@",
    "authentication disabled": r"RAY_AUTH_MODE[\"']?\s*[:=]\s*[\"']?disabled",
}
# `NAME=value` / `name: value` for a secret-like name, unless the value is a reference
SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(\w*(?:token|password|passwd|secret|api_?key|access_?key|private_?key))"
    r"[\"']?\s*[:=]\s*[\"']?([^\s\"',}\]]+)"
)
REFERENCE = re.compile(r"^(\$|<|\{|~/|/|\.ray/)")
OPEN_DASHBOARD = re.compile(r"dashboard[-_]host[\"']?\s*[:= ]\s*[\"']?0\.0\.0\.0")
TOKEN_MODE = re.compile(r"RAY_AUTH_MODE[\"']?\s*[:=]\s*[\"']?token|\bmode:\s*token\b")


def find_secrets(text: str) -> list[str]:
    """What in ``text`` looks like a secret or an unauthenticated opening, one line each."""
    found = [
        f"{what}: {m.group(0)[:12]}…"
        for what, pattern in SECRET_PATTERNS.items()
        for m in re.finditer(pattern, text)
    ]
    for m in SECRET_ASSIGNMENT.finditer(text):
        if not REFERENCE.match(m.group(2)):
            found.append(f"secret-like assignment: {m.group(1)}")
    if OPEN_DASHBOARD.search(text) and not TOKEN_MODE.search(text):
        found.append("dashboard on 0.0.0.0 without RAY_AUTH_MODE=token")
    return found


def literal_secret_env(node: Any) -> list[str]:
    """Kubernetes ``env`` entries with a secret-like name and a literal ``value``."""
    if isinstance(node, list):
        return [hit for item in node for hit in literal_secret_env(item)]
    if not isinstance(node, dict):
        return []
    hits = [hit for value in node.values() for hit in literal_secret_env(value)]
    name = node.get("name")
    if isinstance(name, str) and "value" in node and SECRET_ASSIGNMENT.match(f"{name}=x"):
        hits.append(f"literal env value for {name}")
    return hits


def test_secret_scan_finds_planted_secrets() -> None:
    token = secrets.token_hex(32)
    planted = {
        f"RAY_AUTH_TOKEN={token}": "long hex",
        "export RAY_AUTH_MODE=disabled": "authentication disabled",
        "ray start --head --dashboard-host=0.0.0.0": "dashboard on 0.0.0.0",
        "  password: hunter2": "secret-like assignment",
        "tracking.uri=http://alice:s3cr3t@mlflow:5000": "credentials in a URL",
        "key: " + secrets.token_urlsafe(40).replace("-", "+").replace("_", "/"): "base64",
    }
    for text, expected in planted.items():
        assert any(expected in hit for hit in find_secrets(text)), text
    env = [{"name": "RAY_AUTH_TOKEN", "value": "x"}, {"name": "RAY_AUTH_MODE", "value": "token"}]
    assert literal_secret_env({"env": env}) == ["literal env value for RAY_AUTH_TOKEN"]
    safe = "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token RAY_AUTH_MODE=token\nsecretName: x-auth"
    assert find_secrets(safe) == []


def deploy_files() -> list[Path]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert {"Dockerfile", "README.md", "cluster.yaml", "rayjob.yaml"} <= {p.name for p in files}
    return files


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: p.name)
def test_no_secret_in_deploy(path: Path) -> None:
    text = path.read_text()
    assert find_secrets(text) == [], path.name
    if path.suffix in {".yaml", ".yml"}:
        for document in yaml.safe_load_all(text):
            assert literal_secret_env(document) == [], path.name
