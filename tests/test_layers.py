"""The import contract: dependencies point `grounding_vlm -> distill <- benchmarks`, with the
application (`amoe/`) on top, and no two parts of `distill` import each other.

The source is scanned, not imported, so imports inside functions (lazy imports) count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("amoe", "distill", "benchmarks", "grounding_vlm")
MAY_IMPORT = {
    "amoe": set(PACKAGES),                       # the CLI and the quickstart drive everything
    "benchmarks": {"benchmarks", "distill"},
    "grounding_vlm": {"grounding_vlm", "distill"},
    "distill": {"distill"},                      # the core and the shared contracts import no one above
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def _sources():
    for pkg in PACKAGES:
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_no_import_points_against_the_layers():
    bad = []
    for path in _sources():
        layer = path.relative_to(REPO).parts[0]
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top not in MAY_IMPORT[layer]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_the_parts_of_distill_form_no_cycle():
    """`distill.train` may use `distill.curation` or the other way round, never both; the same for
    any two modules (registry <-> student was such a pair)."""
    edges: dict[str, set[str]] = {}
    for path in sorted((REPO / "distill").rglob("*.py")):
        module = _module_name(path)
        edges[module] = {n for _, n in imports(path) if n.startswith("distill.") and n != module}
    modules = set(edges)

    def resolve(name: str) -> str | None:   # `from distill.x import y` may name a module or an attribute
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {r for n in ns if (r := resolve(n)) and r != m and not m.startswith(r + ".")}
             for m, ns in edges.items()}

    def part(m: str) -> str:
        return ".".join(m.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for m, ns in graph.items():
        parts.setdefault(part(m), set()).update(part(n) for n in ns if part(n) != part(m))
    cycles = sorted({tuple(sorted((a, b))) for a, deps in parts.items() for b in deps if a in parts.get(b, ())})
    module_cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                            if a in graph.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not cycles, f"parts of distill importing each other: {cycles}"
    assert not module_cycles, f"modules importing each other: {module_cycles}"


def test_the_scan_sees_lazy_and_relative_imports():
    """The contract test itself: an import inside a function and a relative import are both found."""
    pkg = REPO / "distill" / "train"
    found = dict((name, line) for line, name in imports(pkg / "engine.py"))
    assert "distill.train.config" in found                     # module level
    assert any(n.startswith("distill.student") for n in found)  # inside a function
    rel = [name for _, name in imports(REPO / "distill" / "data" / "registry.py")]
    assert "distill.data" in rel or any(n.startswith("distill.data.") for n in rel)
