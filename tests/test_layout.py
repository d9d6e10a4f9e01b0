"""The folder rules of the README's "Layout" section, checked on the source.

- edge and cloud never import each other, common imports neither, and no
  library code imports simulations/ or the command line;
- everything of ours is imported as `edgefed.<folder>`, never as a bare
  top-level `common` / `cloud` (names other distributions install too);
- the aggregation mechanics (cloud/aggregation/) do not import Flower, not even
  through what they import;
- no folder of library code holds more than a dozen modules, the command line's
  entry module stays small, and pyproject lists every package the wheel must hold.
"""

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("common", "edge", "cloud", "simulations")
ALLOWED = {
    "common": {"common"},
    "edge": {"common", "edge"},
    "cloud": {"common", "cloud"},
    "simulations": {"common", "edge", "cloud", "simulations"},
}
MAX_MODULES_PER_FOLDER = 12


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _ours(module: str) -> str | None:
    """The folder an `edgefed.<folder>...` import lands in ("cli" for the command line)."""
    parts = module.split(".")
    if parts[0] != "edgefed":
        return None
    if len(parts) == 1 or parts[1] in ("cli", "commands", "__main__"):
        return "cli"
    return parts[1]


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_imports_only_what_it_may(folder):
    offenders = {}
    for path in _sources(folder):
        landed = {_ours(m) for m in _imported_modules(path)} - {None}
        if landed - ALLOWED[folder]:
            offenders[str(path.relative_to(ROOT))] = sorted(landed - ALLOWED[folder])
    assert offenders == {}


def test_nothing_imports_our_folders_under_bare_top_level_names():
    bare = {}
    for path in _sources(*LIBRARY, "edgefed", "tests", "benchmarks"):
        hits = sorted(m for m in _imported_modules(path) if m.split(".")[0] in LIBRARY)
        if hits:
            bare[str(path.relative_to(ROOT))] = hits
    assert bare == {}


def test_aggregation_mechanics_do_not_import_flower():
    modules = [f"edgefed.cloud.aggregation.{p.stem}" for p in sorted((ROOT / "cloud" / "aggregation").glob("*.py"))
               if p.stem != "__init__"]
    assert len(modules) >= 5
    for path in _sources("cloud/aggregation"):  # directly
        assert not {m for m in _imported_modules(path) if m.split(".")[0] == "flwr"}, path
    # ... and through everything they import
    probe = ("import importlib, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_no_library_folder_holds_more_than_a_dozen_modules():
    crowded = {}
    for folder in (*LIBRARY, "edgefed"):
        for directory in [ROOT / folder, *[p for p in (ROOT / folder).rglob("*") if p.is_dir()]]:
            modules = [p for p in directory.glob("*.py") if p.name != "__init__.py" and "_pb2" not in p.name]
            if len(modules) > MAX_MODULES_PER_FOLDER:
                crowded[str(directory.relative_to(ROOT))] = len(modules)
    assert crowded == {}


def test_the_cli_entry_module_only_assembles_the_commands():
    lines = (ROOT / "edgefed" / "cli.py").read_text().splitlines()
    assert len(lines) < 120


def test_pyproject_lists_every_package_and_maps_the_folders():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"edgefed": "edgefed", **{f"edgefed.{f}": f for f in LIBRARY}}
    on_disk = set()
    for folder in (*LIBRARY, "edgefed"):
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT).parts
            on_disk.add(".".join(relative if relative[0] == "edgefed" else ("edgefed", *relative)))
    assert set(setuptools["packages"]) == on_disk


def test_the_wheel_installs_everything_under_edgefed_and_imports_from_there(tmp_path):
    """What `pip install` puts in site-packages: no top-level `common`/`cloud`, every module importable."""
    source = tmp_path / "source"  # a copy: building in the checkout would leave a stale build/ behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in (*LIBRARY, "edgefed"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("edgefed-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    tops = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")}
    assert tops == {"edgefed"}
    sources = {p.relative_to(ROOT).as_posix() for folder in LIBRARY for p in (ROOT / folder).rglob("*.py")}
    installed = {p.relative_to(site / "edgefed").as_posix() for p in (site / "edgefed").rglob("*.py")}
    assert sources <= installed
    probe = ("import importlib, sys\n"
             "for m in ['edgefed.cloud.server_app', 'edgefed.edge.client_app', 'edgefed.simulations.runner',\n"
             "          'edgefed.cloud.aggregation.worker', 'edgefed.cloud.training.participant', 'edgefed.cli']:\n"
             "    importlib.import_module(m)\n"
             "print(sys.modules['edgefed.common.config'].__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(site / "edgefed" / "common" / "config.py")
