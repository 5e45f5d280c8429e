"""The layout that docs/architecture.md describes is the layout of the code: each module imports
only modules of earlier layers, no module imports another's private names, and the page lists
every module."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "translate"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# lower layers first; a module may import from earlier layers only
LAYERS = [
    {"errors"},
    {"runtime", "memory", "config", "tokenizer", "segment"},
    {"corpus", "casual", "names", "glossary", "vocabulary"},
    {"encoded"},
    {"data", "shortlist"},
    {"attention", "encoder", "unrolled"},
    {"decoder"},
    {"model"},
    {"quantize", "search", "schedules"},
    {"feeding"},
    {"mrt"},
    {"checkpoint"},
    {"ensemble", "confidence"},
    {"translator"},
    {"evaluate", "rundir", "distributed"},
    {"validation"},
    {"training"},
    {"build"},
    {"repl", "serve", "plots", "export"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def package_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every ``from .module import names`` in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            module = node.module or node.names[0].name
            found.append((module, [alias.name for alias in node.names]))
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    assert sorted(LAYER) == MODULES


@pytest.mark.parametrize("name", MODULES)
def test_imports_go_to_earlier_layers_only(name):
    for module, _ in package_imports(PACKAGE / f"{name}.py"):
        if module == "__version__":  # cli's `from . import __version__`
            continue
        assert LAYER[module] < LAYER[name], f"{name} imports {module}, which is not in an earlier layer"


@pytest.mark.parametrize("name", MODULES)
def test_no_private_names_cross_modules(name):
    for module, names in package_imports(PACKAGE / f"{name}.py"):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{name} imports private {private} from {module}"


def test_the_architecture_page_lists_every_module():
    listed = set(re.findall(r"`(\w+)\.py`", DOC.read_text(encoding="utf-8")))
    assert set(MODULES) - {"__main__"} <= listed


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 80


def long_definitions(path: Path) -> list[str]:
    """Classes over MAX_CLASS_LINES and functions over MAX_FUNCTION_LINES lines in a file, measured
    from a definition's first line (its decorators not counted) to its last."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef)
                 else MAX_FUNCTION_LINES if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else None)
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            found.append(f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})")
    return found


@pytest.mark.parametrize("name", MODULES)
def test_no_long_classes_or_functions(name):
    too_long = long_definitions(PACKAGE / f"{name}.py")
    assert not too_long, (f"{name}.py: {', '.join(too_long)}; classes may have at most {MAX_CLASS_LINES} lines "
                          f"and functions {MAX_FUNCTION_LINES}: split them")


def test_the_length_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "long.py"
    source.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n", encoding="utf-8")
    assert long_definitions(source) == [f"long ({MAX_FUNCTION_LINES + 1} lines, line 5)"]
