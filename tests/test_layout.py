"""The package's boundaries (pyproject.toml's import-linter contracts) hold, and would be
noticed if broken: imports inside functions count, and every top-level module is placed."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

import collabvit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint(config: dict, tmp_path: Path, monkeypatch) -> int:
    """lint-imports' exit status under `config` (0: every contract kept)."""
    lines = [f'root_package = "{config["root_package"]}"', "include_external_packages = true"]
    for contract in config["contracts"]:
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {value!r}".replace("'", '"') for key, value in contract.items()]
    path = tmp_path / "contracts.toml"
    path.write_text("[tool.importlinter]\n" + "\n".join(lines) + "\n")
    monkeypatch.chdir(REPO / "src")  # the root package is found from here, not the install
    return lint_imports(config_filename=str(path), no_cache=True, no_logo=True)


def test_the_contracts_hold(tmp_path, monkeypatch):
    assert len(CONFIG["contracts"]) >= 3
    assert lint(CONFIG, tmp_path, monkeypatch) == 0


@pytest.mark.parametrize("broken", [
    # a module-level import
    {"type": "forbidden", "source_modules": ["collabvit.lite.client"],
     "forbidden_modules": ["httpx"]},
    # the command line imports torch only inside functions
    {"type": "forbidden", "source_modules": ["collabvit.cli"], "forbidden_modules": ["torch"]},
    # layers the wrong way round
    {"type": "layers", "layers": ["collabvit.lite", "collabvit.models"]},
])  # fmt: skip
def test_a_broken_contract_is_reported(tmp_path, monkeypatch, broken):
    contract = {"id": "broken", "name": "broken on purpose", **broken}
    assert lint({**CONFIG, "contracts": [contract]}, tmp_path, monkeypatch) == 1


def test_every_top_level_module_is_placed_on_one_side_of_the_torch_boundary():
    """A new module or package directly in collabvit/ must be named in the torch-free
    contract, so the contract cannot miss it; and there are few of them."""
    (torch_free,) = [c for c in CONFIG["contracts"] if c["id"] == "torch-free"]
    placed = {name for name in torch_free["forbidden_modules"] if name.startswith("collabvit.")}
    placed |= set(torch_free["source_modules"])
    found = {f"collabvit.{m.name}" for m in pkgutil.iter_modules(collabvit.__path__)}
    assert found - {"collabvit.__main__"} == placed
    assert len(found) <= 15
