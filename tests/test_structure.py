"""The layout of ``normlab.bench``: its modules import one another one way (no cycle, counting
imports inside functions and under ``TYPE_CHECKING``), in the order that
``normlab/bench/__init__.py``'s docstring describes, and no module is over 600 lines. Read from
the source with ``ast``."""
import ast
import pathlib

import pytest

import normlab

BENCH = pathlib.Path(normlab.__file__).parent / "bench"
PACKAGE = "normlab.bench"
# each module may import only the ones before it (__init__ imports them, none imports it)
ORDER = ("progress", "env", "spec", "peers", "timing", "runner", "report", "dispatch", "models",
         "models_harness", "models_report", "harness", "cli")
MAX_LINES = 600


def imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The modules of ``normlab.bench`` (names without the package; ``__init__`` for the
    package itself) that the file at ``path`` imports anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to normlab.bench (level 1) or above it
                base = ".".join(PACKAGE.split(".")[:len(PACKAGE.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # "from . import x": x is a module of the package, or a name from __init__
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name == PACKAGE:
                if not (isinstance(node, ast.ImportFrom) and node.module is None
                        and all(a.name in modules for a in node.names)):
                    out.add("__init__")
            elif name.startswith(PACKAGE + "."):
                mod = name[len(PACKAGE) + 1:].split(".")[0]
                if mod in modules:
                    out.add(mod)
    return out


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in BENCH.glob("*.py")}
    return {m: imports(BENCH / f"{m}.py", modules) - {m} for m in sorted(modules)}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_reader_sees_late_and_package_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from .spec import Cell\nimport normlab.bench.env\nfrom . import report, X\n"
                   "from ..kernels import auto\ndef f():\n    from .runner import run\n"
                   "if False:\n    from normlab.bench.timing import CpuTimer\n")
    mods = {"spec", "env", "report", "runner", "timing"}
    assert imports(src, mods) == {"spec", "env", "report", "runner", "timing", "__init__"}


def test_bench_imports_have_no_cycle():
    edges = graph()
    found = cycle(edges)
    assert found is None, "import cycle in normlab.bench: " + " -> ".join(found)
    assert not any("__init__" in deps for deps in edges.values()), edges


def test_every_module_has_its_place_in_the_order():
    assert set(graph()) - {"__init__"} == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_each_module_imports_only_earlier_ones(module):
    earlier = set(ORDER[:ORDER.index(module)])
    later = graph()[module] - earlier
    assert not later, f"{module} imports {sorted(later)}, which are not before it in {ORDER}"


def test_no_bench_module_is_over_600_lines():
    long = {p.name: n for p in BENCH.glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
