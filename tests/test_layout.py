"""The folder rules of DESIGN.md: edge and cloud never import each other; common imports neither."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"common", "edge", "cloud", "simulations", "edgefed"}
ALLOWED = {
    "common": {"common"},
    "edge": {"common", "edge"},
    "cloud": {"common", "cloud"},
    "simulations": {"common", "edge", "cloud", "simulations"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_imports_only_what_it_may(folder):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[folder])
        for path in (ROOT / folder).rglob("*.py")
        if _imports(path) - ALLOWED[folder]
    }
    assert offenders == {}
