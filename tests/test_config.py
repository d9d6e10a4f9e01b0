import tomllib
from pathlib import Path

import pytest

from edgefed.common.config import ConfigError, EdgefedConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_typed_defaults():
    """`flwr run .` (pyproject) and `edgefed simulate` (dataclass) must start from the same config."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert EdgefedConfig.from_run_config(run_config) == EdgefedConfig()
    assert set(run_config) == set(EdgefedConfig().to_run_config())


def test_flower_components_point_at_the_apps():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "edgefed.cloud.server_app:app", "clientapp": "edgefed.edge.client_app:app"}


def test_round_trip_through_run_config():
    cfg = EdgefedConfig(num_rounds=3, learning_rate=0.01, labels="a,b,c")
    assert EdgefedConfig.from_run_config(cfg.to_run_config()) == cfg


def test_overrides_are_typed():
    cfg = EdgefedConfig().with_overrides(["num-rounds=7", "learning_rate=0.5", "labels=x,y"])
    assert cfg.num_rounds == 7 and cfg.learning_rate == 0.5 and cfg.label_names == ["x", "y"]


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["no-such-key=1"], "unknown run-config key"),
        (["num-rounds=two"], "expects int"),
        (["num-rounds=0"], "must be > 0"),
        (["image-size=100"], "multiple of patch-size"),
        (["labels=only"], "at least two classes"),
        (["num-rounds"], "key=value"),
    ],
)
def test_bad_values_raise_config_error(pairs, message):
    with pytest.raises(ConfigError, match=message):
        EdgefedConfig().with_overrides(pairs)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = 'python -m pip install torch==2.13.0 && python -m pip install -e ".[dev]" && python -m pytest -q'
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()


def test_device_memory_is_read_as_class_budgets_and_a_malformed_one_is_refused():
    from edgefed.common.config import parse_device_memory

    assert parse_device_memory(" low-end=1536, phone = 2048 ") == {"low-end": 1536.0, "phone": 2048.0}
    assert parse_device_memory("") == {}
    for bad in ("low-end", "low-end=lots", "=512", "phone=0"):
        with pytest.raises(ConfigError, match="device-memory expects"):
            EdgefedConfig(device_memory=bad)
