"""The import rules of docs/architecture.md hold in the code.

- falqon_core (formats, kernels, methods) never imports falqon_bench, anywhere.
- Every module of falqon_bench/readers/ and falqon_bench/data/ imports, at module level, neither torch nor
  falqon_core nor a module of measure/ or suites/; its falqon_bench imports at module level are other
  readers/ or data/ modules, so the rule holds transitively.
- Proof at run time: `falqon-bench report` of a committed run, and compare/export/merge, run in a fresh
  interpreter end with neither torch nor falqon_core in sys.modules.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "falqon_bench"



def modules_under(folder: str) -> list[str]:
    """Dotted names (relative to falqon_bench) of every module in a folder of falqon_bench, packages included."""
    root = BENCH / folder
    return sorted(
        ".".join(p.relative_to(BENCH).with_suffix("").parts[:-1] if p.stem == "__init__" else p.relative_to(BENCH).with_suffix("").parts)
        for p in root.rglob("*.py")
    )


STORED_DATA = modules_under("data")
READERS = modules_under("readers")
READ_SIDE = STORED_DATA + READERS
MEASURING = modules_under("measure") + modules_under("suites")
FORBIDDEN_ROOTS = ("torch", "falqon_core", "triton", "torchao", "bitsandbytes", "peft", "transformers")

COMMITTED_REPORT_RUN = ROOT / "results" / "e2e-llama7b-h200"  # small committed run: the report renders in seconds
COMMITTED_LAYER_RUN = ROOT / "results" / "gate-h100-repeat"  # layer points with samples, for compare/export


def module_path(name: str) -> Path:
    path = BENCH / (name.replace(".", "/") + ".py")
    return path if path.exists() else BENCH / name.replace(".", "/") / "__init__.py"


def imported_modules(tree: ast.AST, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every import; module_level_only skips function bodies and `if TYPE_CHECKING:`.

    `from falqon_bench.measure import roofline` yields falqon_bench.measure.roofline, so a submodule import is seen too.
    """
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if module_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_falqon_core_never_imports_falqon_bench():
    files = sorted((ROOT / "falqon_core").rglob("*.py"))
    assert files, "falqon_core has no Python files: the rule would check nothing"
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(parse(path), module_level_only=False)
        if name.split(".")[0] == "falqon_bench"
    ]
    assert not offenders, "falqon_core must not depend on falqon_bench:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", READ_SIDE)
def test_read_side_module_imports_no_torch_core_or_measuring_module_at_module_level(module):
    path = module_path(module)
    assert path.exists(), f"{module} is listed as a reader or stored-data module but {path} does not exist"
    allowed_bench = {f"falqon_bench.{m}" for m in READ_SIDE} | {"falqon_bench", "falqon_bench.data", "falqon_bench.readers"}
    offenders = []
    for line, name in imported_modules(parse(path), module_level_only=True):
        root = name.split(".")[0]
        if root in FORBIDDEN_ROOTS:
            offenders.append(f"{line}: {name} (heavy library: import it inside the function that needs it)")
        elif root == "falqon_bench" and name not in allowed_bench:
            parent = name.rpartition(".")[0]
            if parent not in allowed_bench - {"falqon_bench", "falqon_bench.data", "falqon_bench.readers"}:  # `from falqon_bench.data.store import RunData` is fine
                offenders.append(f"{line}: {name} (not a reader or stored-data module)")
    assert not offenders, f"{path.relative_to(ROOT)} imports at module level:\n" + "\n".join(offenders)


def test_the_folders_hold_the_parts():
    """Each side is a folder: the lists above are found, not typed, so a new module is checked at once."""
    assert {"data.schema", "data.store", "data.derived"} <= set(STORED_DATA)
    assert {"readers.report", "readers.gate", "readers.figures.data"} <= set(READERS)
    assert {"measure.runner", "measure.worker", "measure.timing", "suites.suite"} <= set(MEASURING)
    assert not set(MEASURING) & set(READ_SIDE)
    top_level = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
    assert top_level == ["cli"], f"falqon_bench/ holds only cli.py on top of its folders; found {top_level}"


READER_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    from pathlib import Path

    readers, report_run, layer_run, tmp = json.loads(sys.argv[1])
    for name in readers:
        importlib.import_module(name)

    from falqon_bench import cli

    def call(*args):
        sys.argv = ["falqon-bench", *args]
        try:
            cli.main()
        except SystemExit as e:
            return e.code or 0
        return 0

    tmp = Path(tmp)
    codes = {
        "report": call("report", report_run, "--out", str(tmp / "report")),
        "compare": call("compare", layer_run, layer_run),
        "export": call("export", layer_run, "--to", str(tmp / "points.csv")),
        "export-pytest-benchmark": call("export", layer_run, "--to", str(tmp / "pb.json"), "--format", "pytest-benchmark"),
        "merge": call("merge", layer_run, "--out", str(tmp / "merged"), "--allow-partial"),
    }
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "falqon_core", "triton", "torchao"))
    print("RESULT " + json.dumps({"codes": codes, "heavy": heavy, "report": (tmp / "report").is_dir()}))
    """
)


def test_report_compare_export_merge_of_a_committed_run_import_neither_torch_nor_falqon_core(tmp_path):
    assert COMMITTED_REPORT_RUN.is_dir() and COMMITTED_LAYER_RUN.is_dir()
    args = [[f"falqon_bench.{m}" for m in READ_SIDE], str(COMMITTED_REPORT_RUN), str(COMMITTED_LAYER_RUN), str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", READER_SCRIPT, json.dumps(args)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"reader subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["report"], "report wrote no directory"
    assert result["codes"]["report"] == 0 and result["codes"]["export"] == 0, result["codes"]
    assert result["codes"]["export-pytest-benchmark"] == 0 and result["codes"]["compare"] in (0, 1), result["codes"]
    assert result["codes"]["merge"] in (0, 2), result["codes"]  # one run is not a set of shards: a clear error is fine
    assert result["heavy"] == [], f"readers imported {result['heavy'][:10]}"


def test_cli_imports_every_falqon_bench_module_inside_its_command():
    """cli.py sits on top: at module level it loads only typer, rich and errors, so `report` never pays for torch."""
    offenders = [
        f"{line}: {name}"
        for line, name in imported_modules(parse(BENCH / "cli.py"), module_level_only=True)
        if name.split(".")[0] in FORBIDDEN_ROOTS
        or (name.split(".")[0] == "falqon_bench" and not name.startswith("falqon_bench.data.errors"))
    ]
    assert not offenders, "falqon_bench/cli.py imports at module level:\n" + "\n".join(offenders)
