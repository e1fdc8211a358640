"""The package's structure: imports point one way (the import-linter contracts in
pyproject.toml, README "Layout"), no module is part of an import cycle, and files and
functions stay small enough to read (rule 7: files under about 300 lines, functions
under about 60)."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package sources in `tree`, in a process of its own (this
    one has already imported compress from the checkout)."""
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)}, timeout=300)


def verdict(out: str, contract: str) -> str:
    """KEPT or BROKEN: what the summary says of the first contract whose name holds `contract`."""
    m = re.search(re.escape(contract) + r".*?\b(KEPT|BROKEN)\b", " ".join(out.split()))
    return m.group(1) if m else "missing"


def copy_sources(dst: Path) -> Path:
    for name in ("compress", "calib"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_import_contracts_are_kept():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "7 kept, 0 broken" in proc.stdout and verdict(proc.stdout, "No import cycles") == "KEPT"


@pytest.mark.parametrize("where, line, contract", [
    ("compress/passes/wanda.py", "from compress.runner import run_sweep", "Passes do math on one layer"),
    ("compress/passes/perp.py", "from calib import CalibConfig", "Data is read at the top"),
    ("compress/kernels/reference.py", "from compress.nn import QuantLinear", "Kernels are functions on tensors"),
    ("compress/models.py", "from compress.checkpoint import load", "Model structure is a leaf"),
    ("compress/quantize.py", "from compress.nn.quant_linear import QuantLinear", "every import points down"),
    ("compress/masks.py", "import cli", "Nothing in the library imports the command line"),
])
def test_each_contract_breaks_on_the_import_it_forbids(tmp_path, where, line, contract):
    """The contracts can fail: one forbidden import added to a copy of the sources
    breaks the contract that names it."""
    tree = copy_sources(tmp_path)
    with open(tree / where, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    proc = lint(tree)
    assert proc.returncode == 1 and verdict(proc.stdout, contract) == "BROKEN", proc.stdout[-3000:]


def test_a_new_module_must_be_placed_in_a_layer(tmp_path):
    tree = copy_sources(tmp_path)
    (tree / "compress" / "helpers.py").write_text('"""A module no layer names."""\n')
    proc = lint(tree)
    assert proc.returncode != 0 and "compress.helpers" in proc.stdout + proc.stderr


def cycle_edges(graph) -> set[tuple[str, str]]:
    """The direct imports (a, b) that lie on an import cycle: b leads back to a."""
    return {(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
            if graph.chain_exists(importer=b, imported=a)}


def test_no_module_is_on_an_import_cycle(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    graph = grimp.build_graph("compress", "calib")
    assert len(graph.modules) > 50
    assert cycle_edges(graph) == set()
    graph.add_import(importer="compress.errors", imported="compress.api")   # the check can fail
    assert ("compress.errors", "compress.api") in cycle_edges(graph)


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("compress/**/*.py"), *ROOT.glob("calib/**/*.py"), ROOT / "cli.py"])


def test_files_and_functions_stay_small():
    long_files = {str(f.relative_to(ROOT)): n for f in _sources() if (n := len(f.read_text().splitlines())) > 300}
    long_functions = {}
    for f in _sources():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions[f"{f.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long_files == {} and long_functions == {}
