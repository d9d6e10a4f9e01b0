"""edgefed: federated edge-cloud training for video and audio.

The library is imported under this one package: `edgefed.common`,
`edgefed.edge`, `edgefed.cloud`, `edgefed.simulations` (and the command line,
`edgefed.cli`), never as bare top-level `common` or `cloud`, names other
distributions install too.

In the source tree those four folders sit beside this one (the layout the
README describes). A wheel installs them inside this package (pyproject's
`package-dir`). In a source checkout, and in the app folder Flower unpacks
for `flwr run .`, there is no `edgefed/common/`: the sibling folders are
registered here, so both layouts import the same names and nothing else
becomes importable under `edgefed.`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LIBRARY_FOLDERS = ("common", "edge", "cloud", "simulations")


def _register_source_folders() -> None:
    here = Path(__file__).resolve().parent
    root = here.parent
    for name in LIBRARY_FOLDERS:
        qualified = f"{__name__}.{name}"
        if (here / name).is_dir() or qualified in sys.modules:
            continue  # installed inside the package, or already registered
        init = root / name / "__init__.py"
        if not init.is_file():
            raise ImportError(f"edgefed: {init} missing: neither an installed package nor a source tree")
        spec = importlib.util.spec_from_file_location(qualified, init, submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_register_source_folders()
