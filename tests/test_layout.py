"""The package's shape: imports run one way between subpackages, no module imports itself back (lazy imports
included), no private name crosses a module, no function takes more than six parameters unless a spec/config
dataclass carries them, and ``lu.*`` is exactly ``__all__`` (what the notebooks and README use)."""
import ast
import json
import re
from pathlib import Path

import pytest

import labutils as lu

ROOT = Path(lu.__file__).parent
# What each subpackage may import from (itself included); cli.py and __init__.py sit on top of all of them.
ALLOWED = {
    "core": {"core"},
    "prune": {"core", "prune"},
    "evaluate": {"core", "evaluate"},
    "speed": {"core", "prune", "speed"},
    "sparse24": {"core", "prune", "speed", "sparse24"},
    "deploy": {"core", "prune", "evaluate", "deploy"},
    "jobs": {"core", "prune", "evaluate", "speed", "deploy", "jobs"},
    "lab": {"core", "prune", "evaluate", "speed", "sparse24", "deploy", "jobs", "lab"},
}
MODULES = sorted(p for p in ROOT.rglob("*.py") if "lm_tasks" not in p.parts)


def module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def internal_imports(path: Path):
    """(line, imported module as parts under labutils, imported names) for every import of labutils code."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path)[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("labutils"):
            yield node.lineno, node.module.split(".")[1:], [a.name for a in node.names]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    source = module_name(path)
    if len(source) < 2 or source[0] not in ALLOWED:
        return  # labutils/__init__.py, cli.py, __main__.py and the subpackages' own __init__ see everything
    for line, target, _ in internal_imports(path):
        assert target and target[0] in ALLOWED[source[0]], (
            f"{path.relative_to(ROOT)}:{line} imports labutils.{'.'.join(target)}: {source[0]}/ may import only "
            f"from {sorted(ALLOWED[source[0]])}")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_module(path):
    for line, target, names in internal_imports(path):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.relative_to(ROOT)}:{line} imports {private} from labutils.{'.'.join(target)}"


def test_the_rules_catch_a_bad_import(tmp_path, monkeypatch):
    """The checks above can fail: an upward import and a private name are both reported."""
    bad = tmp_path / "core" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from ..jobs.main_job import _lap\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="core/ may import only"):
        test_imports_run_one_way(bad)
    with pytest.raises(AssertionError, match=r"imports \['_lap'\]"):
        test_no_private_name_crosses_a_module(bad)


def test_namespace_is_exactly_all():
    public = {name for name in vars(lu) if not name.startswith("_")} - set(ALLOWED) - {"cli"}
    assert public == set(lu.__all__) and len(lu.__all__) == len(set(lu.__all__))


def test_notebooks_use_only_exported_names():
    used = set()
    for notebook in sorted(ROOT.parent.glob("0*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] == "code":
                used |= set(re.findall(r"\blu\.([A-Za-z_]\w*)", "".join(cell["source"])))
    if not used:
        pytest.skip("the notebooks are not next to the package (an installed copy)")
    assert used <= set(lu.__all__), sorted(used - set(lu.__all__))


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """Module → {imported labutils module: first line}, from every import in the module's source: module-level and
    inside functions (lazy), relative and absolute. ``from pkg import name`` points at ``pkg.name`` when that is a
    module, else at ``pkg`` (its ``__init__``). Modules are dotted names under labutils ("" is labutils itself)."""
    paths = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if "lm_tasks" not in parts:
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [] if package == [""] else package
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "labutils"]
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "labutils"):
                if node.level:
                    base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                else:
                    base = node.module.split(".")[1:]
                for alias in node.names:  # a submodule by name, or a name defined by the module (package) itself
                    sub = ".".join(base + [alias.name])
                    targets.append(sub.split(".") if sub in paths else base)
            for target in targets:
                edges.setdefault(".".join(target), node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of modules that
    import each other, directly or through others; [] when imports run one way."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set(stack[stack.index(node):])
            del stack[stack.index(node):]
            if len(group) > 1 or node in graph.get(node, {}):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_within(group, graph) for group in groups]


def _cycle_within(group: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph.get(node, {})):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in group and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # cannot happen for a strongly connected group


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """'a (line 3) → b (line 7) → a': where each module imports the next."""
    steps = [f"labutils.{a or '__init__'} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " → ".join(steps + [f"labutils.{cycle[-1] or '__init__'}"])


def test_no_import_cycles_lazy_imports_included():
    graph = import_graph(ROOT)
    cycles = [describe_cycle(c, graph) for c in find_cycles(graph)]
    assert not cycles, "import cycles (module-level and lazy imports):\n" + "\n".join(cycles)


MAX_PARAMETERS = 6  # more travel together as a spec/config dataclass (PruneSpec, OwlConfig, AdmmSettings, ...)
BUNDLE_SUFFIXES = ("Spec", "Config", "Settings")


def bundle_dataclasses(sources: list[str]) -> set[str]:
    """Names of the dataclasses defined in ``sources`` that may carry a long argument list: *Spec, *Config,
    *Settings."""
    names = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            decorators = [d.func if isinstance(d, ast.Call) else d for d in getattr(node, "decorator_list", [])]
            if isinstance(node, ast.ClassDef) and node.name.endswith(BUNDLE_SUFFIXES) and any(
                    (d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")) == "dataclass" for d in decorators):
                names.add(node.name)
    return names


def long_signatures(source: str, bundles: set[str]) -> list[tuple[str, int, int]]:
    """(qualified function name, line, parameter count) for every function or method of ``source`` with more than
    ``MAX_PARAMETERS`` parameters (self and cls not counted; *args and **kwargs count one each) and none annotated
    with one of ``bundles``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                params = [p for p in params if p.arg not in ("self", "cls")]
                annotated = set().union(*(_annotation_names(p.annotation) for p in params))
                if len(params) > MAX_PARAMETERS and not annotated & bundles:
                    found.append((prefix + child.name, child.lineno, len(params)))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def _annotation_names(node: ast.AST | None) -> set[str]:
    """The classes an annotation names: ``PruneSpec``, ``spec.PruneSpec``, ``PruneSpec | None``,
    ``Optional[PruneSpec]`` or the same quoted; nothing inside a container (``list[PruneSpec]`` is not a spec)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _annotation_names(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
        return _annotation_names(node.left) | _annotation_names(node.right)
    if isinstance(node, ast.Subscript) and _annotation_names(node.value) & {"Optional", "Union"}:
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return set().union(*(_annotation_names(n) for n in inner))
    if isinstance(node, ast.Name):
        return {node.id}
    return {node.attr} if isinstance(node, ast.Attribute) else set()


def test_no_function_takes_more_than_six_parameters_without_a_spec():
    sources = {path: path.read_text() for path in MODULES}
    bundles = bundle_dataclasses(list(sources.values()))
    long = [f"{path.relative_to(ROOT)}:{name} (line {line}) takes {count} parameters"
            for path, source in sources.items() for name, line, count in long_signatures(source, bundles)]
    assert not long, (f"more than {MAX_PARAMETERS} parameters and no spec/config dataclass among them "
                      f"(a *Spec, *Config or *Settings dataclass carries the rest):\n" + "\n".join(long))


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import(tmp_path):
    """The cycle check can fail: a cycle closed by an import inside a function is found and printed in order."""
    (tmp_path / "prune").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "prune" / "__init__.py").write_text("")
    (tmp_path / "prune" / "a.py").write_text("from .b import B\nA = 1\n")
    (tmp_path / "prune" / "b.py").write_text("B = 2\n\ndef lazy():\n    from labutils.prune import a\n")
    (tmp_path / "prune" / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["prune.c"] == {"prune.a": 1} and graph["prune.b"] == {"prune.a": 4}
    cycles = find_cycles(graph)
    assert cycles == [["prune.a", "prune.b", "prune.a"]]
    assert describe_cycle(cycles[0], graph) == ("labutils.prune.a (line 1) → labutils.prune.b (line 4) → "
                                                "labutils.prune.a")
    assert find_cycles({"x": {"y": 1}, "y": {"z": 1}, "z": {"x": 1}}) == [["x", "y", "z", "x"]]
    assert find_cycles({"x": {"y": 1}, "y": {}}) == [] and find_cycles({"x": {"x": 1}}) == [["x", "x"]]


def test_the_parameter_check_finds_a_long_signature():
    """The parameter check can fail: seven parameters without a spec are reported by name, line and count; self
    is not counted, and a *Settings dataclass among them (not a list of them) makes a long signature allowed."""
    source = ("from dataclasses import dataclass\n\n@dataclass\nclass FitSettings:\n    lr: float = 0.1\n\n"
              "def long(a, b, c, d, e, f, *, g=1):\n    pass\n\n"
              "def bundled(a, b, c, d, e, f, settings: 'FitSettings | None' = None):\n    pass\n\n"
              "def listed(a, b, c, d, e, f, many: list[FitSettings]):\n    pass\n\n"
              "class Model:\n    def __init__(self, a, b, c, d, e, f):\n        pass\n\n"
              "    def forward(self, a, b, c, d, e, *args, **kwargs):\n        pass\n")
    bundles = bundle_dataclasses([source])
    assert bundles == {"FitSettings"}
    assert long_signatures(source, bundles) == [("long", 7, 7), ("listed", 13, 7), ("Model.forward", 20, 7)]
    assert [name for name, _, _ in long_signatures(source, set())] == ["long", "bundled", "listed", "Model.forward"]
    for annotation, names in (("Optional[spec.PruneSpec]", {"PruneSpec"}), ("int | 'PruneSpec'", {"int", "PruneSpec"}),
                              ("list[PruneSpec]", set())):
        assert _annotation_names(ast.parse(annotation, mode="eval").body) == names, annotation
