"""The layout of the package, read from the source with ``ast``: no file of ``normlab`` over
600 lines; no import cycle among its modules at import time; and ``normlab.bench``'s modules
import one another one way (no cycle, counting imports inside functions and under
``TYPE_CHECKING``), in the order that ``normlab/bench/__init__.py``'s docstring describes."""
import ast
import pathlib

import pytest

import normlab

BENCH = pathlib.Path(normlab.__file__).parent / "bench"
PACKAGE = "normlab.bench"
# each module may import only the ones before it (__init__ imports them, none imports it)
ORDER = ("progress", "env", "spec", "peers", "timing", "runner", "report", "dispatch", "models",
         "models_harness", "models_report", "cli")
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


ROOT = pathlib.Path(normlab.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_edges() -> dict[str, set[str]]:
    """normlab module -> the normlab modules it imports at import time (module level, not
    inside functions; ``from X import name`` counts X, and X.name when that is a module)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.parse(path.read_text(), str(path)).body:
            for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(n, ast.Import):
                    out |= {a.name for a in n.names}
                elif isinstance(n, ast.ImportFrom):
                    base = n.module or ""
                    if n.level:
                        up = package.split(".")[:len(package.split(".")) - n.level + 1]
                        base = ".".join(up + ([n.module] if n.module else []))
                    out |= {base} | {f"{base}.{a.name}" for a in n.names}
        edges[mod] = {m for m in out if m in files and m != mod}
    return edges


def test_no_import_cycle_in_normlab():
    """A module that imports a package imports its ``__init__``, which may import it back:
    only modules (not package ``__init__``s re-exporting their own parts) form a cycle."""
    edges = import_time_edges()
    packages = {m for m in edges if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()}
    plain = {m: {d for d in deps if d not in packages or not m.startswith(d + ".")}
             for m, deps in edges.items()}
    for pkg in packages:  # a package's __init__ importing its own submodules is no cycle
        plain[pkg] = {d for d in plain[pkg] if not d.startswith(pkg + ".")}
    found = cycle(plain)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_no_normlab_file_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
