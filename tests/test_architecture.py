"""The architecture is enforced, not described: import-linter contracts and size limits.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and ``make lint``
runs ``lint-imports``. These tests show that the contracts hold on the real tree and
that they can fail: an upward import injected into a copy of the tree breaks them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")

MAX_MODULE_LINES = 600
MAX_STAGE_LINES = 250
# path (relative to the repository) -> allowed line count; keep this short and explained
SIZE_ALLOW: dict[str, int] = {}

LINT_IMPORTS = (
    "import sys; from importlinter.cli import lint_imports_command; "
    "sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())"
)


def _lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` on the tree at *root* (only the given contract ids, if any)."""
    args = [sys.executable, "-c", LINT_IMPORTS, "--no-cache"]
    for contract in contracts:
        args += ["--contract", contract]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        args, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _first_module(package_dir: Path) -> Path:
    """The first plain module of a package (not ``__init__``/``__main__``)."""
    modules = sorted(p for p in package_dir.glob("*.py") if not p.name.startswith("__"))
    assert modules, f"no module in {package_dir}"
    return modules[0]


def test_contracts_hold_on_the_real_tree() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# (what to inject, where, the contracts it must break)
INJECTIONS = [
    pytest.param(
        "pipeline/codec",
        "import pipeline.runtime.ring",
        ("layers", "codec-not-runtime"),
        id="codec-imports-runtime",
    ),
    pytest.param(
        "pipeline/runtime/supervisor.py",
        "import stages.encode",
        ("layers", "runtime-not-stages"),
        id="runtime-imports-stages",
    ),
    pytest.param(
        "pipeline/transports",
        "import pipeline.server.rooms",
        ("clients-below-server",),
        id="transport-imports-server",
    ),
    pytest.param("pipeline/model", "import pipeline.codec", ("layers",), id="model-imports-codec"),
    pytest.param("pipeline/errors.py", "import pipeline.cli", ("layers",), id="errors-imports-cli"),
]


@pytest.mark.parametrize(("target", "statement", "contracts"), INJECTIONS)
def test_an_upward_import_breaks_the_contracts(
    tmp_path: Path, target: str, statement: str, contracts: tuple[str, ...]
) -> None:
    tree = _copy_tree(tmp_path)
    for contract in contracts:  # each contract holds on the untouched copy ...
        before = _lint_imports(tree, contract)
        assert before.returncode == 0, f"{contract} broken before the injection:\n{before.stdout}"
    path = tree / target
    module = _first_module(path) if path.is_dir() else path
    module.write_text(module.read_text() + f"\n{statement}  # injected by the test\n")
    for contract in contracts:  # ... and is broken by the one upward import
        after = _lint_imports(tree, contract)
        assert after.returncode != 0, f"{contract} kept despite `{statement}` in {module}"
        assert "BROKEN" in after.stdout


def test_an_import_cycle_breaks_the_acyclic_contract(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    pkg = tree / "pipeline" / "cycle_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline.cycle_probe import b\n")
    (pkg / "b.py").write_text("from pipeline.cycle_probe import a\n")
    result = _lint_imports(tree, "acyclic")
    assert result.returncode != 0
    assert "cycle_probe" in result.stdout


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_over_the_size_limits() -> None:
    too_long: list[str] = []
    for package in PACKAGES:
        limit = MAX_STAGE_LINES if package == "stages" else MAX_MODULE_LINES
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            lines = _line_count(path)
            if lines > SIZE_ALLOW.get(rel, limit):
                too_long.append(f"{rel}: {lines} lines (limit {limit})")
    assert not too_long, "modules over the size limit:\n" + "\n".join(too_long)


def test_architecture_doc_lists_every_module() -> None:
    """docs/architecture.md has a line for every module of pipeline/ and stages/."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`((?:pipeline|stages)/[\w/]+\.py)`", doc))
    missing = [
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py" and path.relative_to(ROOT).as_posix() not in listed
    ]
    assert not missing, "modules missing from docs/architecture.md:\n" + "\n".join(missing)
