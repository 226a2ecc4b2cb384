"""The house's structure: the import graph of enat/, launch/ and scaling/ has no circle, and no
module imports one on a higher floor. Imports are read with `ast`, at module level and inside
functions alike (a function-level import is a dependency too; hiding it is how circles stay
invisible), so the test fails naming the offending import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("enat", "launch", "scaling")

# Floors, bottom first. A module may import its own floor (without a circle) and any floor below.
FLOORS = [
    ("ground", ["enat.config", "enat.rng", "enat.dist", "enat.text", "enat.files", "enat.torchvision_guard",
                "enat.images", "enat.profiling"]),
    ("models", ["enat.models", "enat.sampling", "enat.flops", "enat.sweeps", "enat.cost"]),
    ("data", ["enat.data", "enat.tokenizer"]),
    ("train", ["enat.train"]),
    ("eval", ["enat.eval"]),
    ("analysis", ["enat.analysis", "enat.bench"]),
    ("entry", ["enat.cli", "enat", "launch", "scaling"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def floor_of(module: str) -> int:
    """The floor of the longest prefix that names `module` or a package above it."""
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    if floor is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_structure.py")
    return floor


def imports_of(module: str, path: Path, known: dict) -> list[tuple[str, int, str]]:
    """(imported project module, line, how) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from enat import config` imports enat.config; `from enat.x import f` imports enat.x
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        how = ast.get_source_segment(path.read_text(), node) or ""
        for target in {resolve(n) for n in names} - {None, module}:
            if not module.startswith(target + "."):  # a submodule's own package __init__ is not a dependency
                out.append((target, node.lineno, how.splitlines()[0]))
    return out


def graph() -> tuple[dict, dict]:
    known = modules()
    edges = {m: imports_of(m, p, known) for m, p in known.items()}
    return known, edges


def circles(edges: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    succ = {m: sorted({t for t, _, _ in e}) for m, e in edges.items()}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in succ:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            if i < len(succ.get(v, [])):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def test_every_module_is_on_a_floor():
    for module in modules():
        floor_of(module)


def test_no_module_imports_a_higher_floor():
    known, edges = graph()
    wrong = []
    for module, deps in edges.items():
        for target, line, how in deps:
            if floor_of(target) > floor_of(module):
                wrong.append(f"{known[module].relative_to(ROOT)}:{line} `{how}`: {module} "
                             f"({FLOORS[floor_of(module)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})")
    assert not wrong, "imports running up the floors:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_circle():
    known, edges = graph()
    found = circles(edges)
    lines = []
    for comp in found:
        members = set(comp)
        for m in comp:
            for target, line, how in edges[m]:
                if target in members:
                    lines.append(f"{known[m].relative_to(ROOT)}:{line} `{how}`: {m} -> {target}")
    assert not found, f"import circles {found}:\n" + "\n".join(lines)


def test_the_checker_sees_a_circle_through_a_function_level_import(tmp_path):
    # the checker itself must not be blind to what it is for
    a = tmp_path / "a.py"
    a.write_text("import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from a import g\n")
    known = {"a": a, "b": b}
    edges = {m: imports_of(m, p, known) for m, p in known.items()}
    assert circles(edges) == [["a", "b"]]
    assert edges["b"] == [("a", 2, "from a import g")]


@pytest.mark.parametrize("module,expected", [("enat.eval.job", "eval"), ("enat.cli", "entry"),
                                             ("enat.text", "ground"), ("scaling.fit", "entry")])
def test_floors_are_matched_by_the_longest_prefix(module, expected):
    assert FLOORS[floor_of(module)][0] == expected
