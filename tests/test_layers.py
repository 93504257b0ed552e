"""The package's import graph: no cycles (function-local imports included), and no layer imports
a higher one (model and kernels never import rollout, malt, train or eval)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# rank of each top-level part; a module may import its own rank or lower ones
RANKS = {"errors": 0, "config": 0, "phases": 0, "data": 1, "kernels": 1, "model": 2, "rollout": 3, "malt": 4,
         "train": 4, "eval": 5, "pipeline": 6, "profile": 7, "cli": 8}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "malt_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = path.stem
        out["malt_fast.kernels" + ("" if name == "__init__" else f".{name}")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The malt_fast modules `path` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "malt_fast"


def graph():
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    # a package's __init__ re-exporting its own modules is not a cycle
    cycles = [c for c in cycles if not all(m.startswith(min(c, key=len)) for m in c)]
    assert not cycles, cycles


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod, deps in graph().items():
        if part(mod) not in RANKS:
            continue
        for dep in deps:
            if part(dep) in RANKS and RANKS[part(dep)] > RANKS[part(mod)]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_the_checker_sees_local_imports(tmp_path):
    """The checker itself: a function-local import counts."""
    known = {"malt_fast.rollout.engine", "malt_fast.rollout.tree"}
    src = tmp_path / "engine.py"
    src.write_text("def f():\n    from malt_fast.rollout.tree import expand_tree\n")
    assert imports("malt_fast.rollout.engine", src, known) == {"malt_fast.rollout.tree"}
