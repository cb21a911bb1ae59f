"""The package's shape: imports run one way between subpackages, no private name crosses a module, and ``lu.*`` is
exactly ``__all__`` (what the notebooks and README use)."""
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
    "jobs": {"core", "prune", "evaluate", "speed", "jobs"},
    "lab": {"core", "prune", "evaluate", "speed", "sparse24", "jobs", "lab"},
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
