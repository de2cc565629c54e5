"""The import graph of the source tree: layers only import down (utils <- core <- core/tasks/<task>
<- scripts, demo, bench), no task imports another, no circle, no import inside a function."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCES = {"tests", "datasets", "logs", "docs"}      # and hidden folders (.git, .ci)


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every project module (tests excluded)."""
    found = {}
    for path in sorted(REPO.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[0] in NOT_SOURCES or any(p.startswith(".") for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(path: Path, modules: dict) -> list[tuple[str, int, bool]]:
    """(project module imported, line, whether the import is inside a function) of a file."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                   ast.AsyncFunctionDef)) for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from core import config" imports the module core.config
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:      # "core.tasks.vqa.X" -> "core.tasks.vqa"
                name = name.rpartition(".")[0]
            if name:
                out.append((name, node.lineno, id(node) in in_function))
    return out


def layer(module: str) -> int:
    """0 utils, 1 core (its data, the Task seam), 2 a task, 3 what uses them."""
    if module.split(".")[0] == "utils":
        return 0
    if module.startswith("core.tasks.") and module != "core.tasks.base":
        return 2
    if module.split(".")[0] == "core":
        return 1
    return 3


def task_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["core", "tasks"] and len(parts) > 2 and \
        parts[2] != "base" else None


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = module_files()
    return {name: [i for i in imports_of(path, modules) if i[0] != name]
            for name, path in modules.items()}


def test_the_graph_sees_the_layers():
    edges = graph()
    assert {"utils.io", "core.run", "core.tasks.vqa.evaluation", "demo.vqa",
            "train_vqa", "bench.bench_steps"} <= set(edges)
    assert {m for m, _, _ in edges["demo.vqa"]} >= {"demo.scenes", "demo.build", "utils.io",
                                                     "core.tasks.vqa.evaluation"}
    assert {m for m, _, _ in edges["core.run"]} >= {"core.config", "core.cli", "utils.dist"}
    assert [layer(m) for m in ("utils.io", "core.tasks.base", "core.tasks.vgd.boxes",
                               "demo.vgd", "visualize")] == [0, 1, 2, 3, 3]


def test_no_module_imports_up_the_layers_or_another_task():
    wrong = []
    for module, imports in graph().items():
        for imported, line, _ in imports:
            if layer(imported) > layer(module):
                wrong.append(f"{module}:{line} imports {imported} (a higher layer)")
            elif task_of(module) and task_of(imported) and task_of(module) != task_of(imported):
                wrong.append(f"{module}:{line} imports another task's {imported}")
    assert wrong == []


def test_no_import_inside_a_function():
    # core/data/text.py imports spaCy only when WORD_VECTORS asks for it: it is optional.
    # bench/ is left out: its scripts import torch only after fixing the thread count.
    # Triton (GPU compiler) and tensorboard are optional packages as well.
    optional = {("core.data.text", "spacy"), ("core.compile", "torch.utils._triton"),
                ("core.records", "torch.utils.tensorboard")}
    wrong = []
    for module, path in module_files().items():
        if module.startswith("bench."):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.names[0].name if isinstance(node, ast.Import) else node.module
                    if (module, name) not in optional:
                        wrong.append(f"{module}:{node.lineno} imports {name} in {f.name}()")
    assert wrong == []


def test_no_import_circle():
    edges = {m: sorted({i for i, _, _ in imports}) for m, imports in graph().items()}
    state, circles = {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in edges.get(module, []):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []
