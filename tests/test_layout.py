"""The toolkit's imports go one way, bottom-up (README, Layout): a module imports only from its own layer and the
layers below it, so the packages stay usable without the scripts and no import cycle can form."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first; modules of one layer may import each other.
LAYERS = [("errors",), ("seeds", "config", "cluster"), ("models",), ("data",), ("flows",), ("metrics",),
          ("registries", "runs", "backend"), ("train", "sample", "evaluate")]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file, also those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
    return found


def test_every_module_imports_only_from_its_layer_or_below():
    files = [p for p in ROOT.glob("*.py") if p.stem in RANK] + [p for p in ROOT.glob("*/*.py") if p.parent.name in RANK]
    assert len(files) > 30
    upward = []
    for path in files:
        me = path.parent.name if path.parent != ROOT else path.stem
        for line, module in imported(path):
            if module in RANK and RANK[module] > RANK[me]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, upward


def test_the_layers_name_every_module_of_the_toolkit():
    modules = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert modules - {"tests"} <= set(RANK), modules - set(RANK)
