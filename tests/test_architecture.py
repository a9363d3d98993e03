"""The shape of the code holds (docs/design-notes.md): imports run one way with no circle, the
adapters import nothing above them, and the files a reader opens first stay short."""
import ast
from pathlib import Path

import peftlab

PACKAGE = Path(peftlab.__file__).parent
LAYERS_BELOW_ADAPTERS = {"peftlab.adapters", "peftlab.kernels", "peftlab.quant", "peftlab.settings", "peftlab.progress"}


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(path: Path) -> set[str]:
    """The peftlab modules `path` imports, at module level or inside functions."""
    here = module_of(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:  # `from . import data` imports a module, `from .io import save` a name
                found.add(f"{target}.{alias.name}" if exists(f"{target}.{alias.name}") else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("peftlab")}


def graph() -> dict[str, set[str]]:
    return {module_of(p): imported(p) for p in PACKAGE.rglob("*.py")}


def test_imports_form_no_circle():
    edges = {m: {t for t in targets if not m.startswith(t + ".") and t != m} for m, targets in graph().items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 2:
            return
        assert state.get(module) != 1, "import circle: " + " -> ".join(trail[trail.index(module):] + [module])
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            visit(target, trail + [module])
        state[module] = 2

    for module in sorted(edges):
        visit(module, [])


def test_adapters_import_nothing_above_them():
    for module, targets in graph().items():
        if module.startswith("peftlab.adapters") or module.startswith("peftlab.kernels"):
            above = {t for t in targets if not any(t == low or t.startswith(low + ".") for low in LAYERS_BELOW_ADAPTERS)}
            assert not above, f"{module} imports {sorted(above)}"


def test_the_files_a_reader_opens_first_stay_short():
    lines = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert lines["trainers/trainer.py"] <= 300 and lines["cli.py"] <= 250, lines
    methods = {name: n for name, n in lines.items() if name.startswith("adapters/") and name[9:-3] in peftlab.list_adapters()}
    assert len(methods) == len(peftlab.list_adapters()) and max(methods.values()) <= 400, methods
