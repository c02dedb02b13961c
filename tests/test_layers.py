"""The packages import one way: common <- alignment <- data <- models <- metrics <- workflows <- the scripts.

A module may import its own package and the layers below it, never a layer above or a sibling at its own
layer (``train`` does not import ``evaluate``). Imports sit at the top of a module; a function imports only
an optional dependency (``OPTIONAL``), so cycles cannot hide inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["common", "alignment", "data", "models", "metrics", "workflows", ("train", "evaluate", "benchmarks")]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in ((layer,) if isinstance(layer, str) else layer)}
# third-party packages a function may import: needed by one input format or one logger only
OPTIONAL = {"nudenet", "wandb", "datasets"}


def project_modules(root: Path) -> list[tuple[Path, str]]:
    """(file, top-level name) of every module of the layered packages and scripts under ``root``."""
    found = []
    for name in RANK:
        if (root / f"{name}.py").is_file():
            found.append((root / f"{name}.py", name))
        elif (root / name).is_dir():
            found += [(path, name) for path in sorted((root / name).rglob("*.py"))]
    return found


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [package if node.level else (node.module or "")]
    return [alias.name for alias in node.names]


def import_problems(root: Path) -> list[str]:
    """One line per import that goes up a layer or sideways, or sits inside a function without being optional."""
    problems = []
    for path, package in project_modules(root):
        tree = ast.parse(path.read_text(), filename=str(path))
        nested = {id(n) for scope in ast.walk(tree) if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(scope)}
        where = path.relative_to(root)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for module in _imported(node, package):
                top = module.split(".")[0]
                if top in RANK and top != package and RANK[top] >= RANK[package]:
                    problems.append(f"{where}:{node.lineno}: {package} imports {module}, "
                                    f"{'a layer above it' if RANK[top] > RANK[package] else 'a sibling at its layer'}")
                if id(node) in nested and top not in OPTIONAL:
                    problems.append(f"{where}:{node.lineno}: imports {module} inside a function")
    return problems


def test_the_project_imports_one_way():
    assert import_problems(ROOT) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"data/reader.py": "from workflows.cli import run_task\n"},
     ["data/reader.py:1: data imports workflows.cli, a layer above it"]),
    ({"models/x.py": "import metrics.uas\n"}, ["models/x.py:1: models imports metrics.uas, a layer above it"]),
    ({"train.py": "import evaluate\n"}, ["train.py:1: train imports evaluate, a sibling at its layer"]),
    ({"metrics/x.py": "def f():\n    from models.sampling import generate\n"},
     ["metrics/x.py:2: imports models.sampling inside a function"]),
    ({"common/x.py": "def f():\n    from data import pairs\n"},
     ["common/x.py:2: common imports data, a layer above it", "common/x.py:2: imports data inside a function"]),
])
def test_a_wrong_import_is_found(tmp_path, files, expected):
    assert import_problems(write(tmp_path, files)) == expected


def test_allowed_imports_pass(tmp_path):
    write(tmp_path, {
        "workflows/x.py": "import torch\nfrom common.errors import InputError\nfrom metrics.uas import uas\nfrom . import y\n",
        "data/y.py": "from data.pairs import PreferencePair\n\ndef f():\n    import wandb\n",
        "evaluate.py": "from workflows.evaluation import evaluate\n",
    })
    assert import_problems(tmp_path) == []
