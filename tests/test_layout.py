"""The package's shape (docs/DESIGN.md): imports between folders go one way only, and no module imports another
module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import sparsepack

ROOT = Path(sparsepack.__file__).parent
# A folder may import only folders of a lower rank (the same rank: never each other).
RANK = {"kernels": 0, "formats": 1, "layers": 2, "methods": 2, "runtime": 3, "config": 4, "pipeline": 5,
        "exporters": 6, "cli": 7, "__main__": 8}  # fmt: skip


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from sparsepack... import`` and ``import sparsepack...`` in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsepack"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("sparsepack")]
    return out


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (its lazy re-exports, __version__)


def _edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        src = rel.parts[0].removesuffix(".py")
        if src == "__init__":
            continue
        for module, names in _imports(path):
            dst = _folder(module)
            if dst is None:
                dst = names[0] if len(names) == 1 and names[0] in RANK else None
            if dst is not None and dst != src:
                edges.append((src, dst, str(rel)))
    return edges


def test_imports_between_folders_go_one_way():
    bad = [f"{f}: {s} -> {d}" for s, d, f in _edges() if RANK[d] >= RANK[s]]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        for module, names in _imports(path):
            here = path.parent
            private = [n for n in names if n.startswith("_") and not n.startswith("__")
                       and not (module == f"sparsepack.{here.name}" and (here / f"{n}.py").is_file())]  # fmt: skip
            # (a folder's own private module, e.g. kernels/_backend.py, is the folder's business)
            if private:
                bad.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(private)}")
    assert not bad, "\n".join(bad)


def test_test_helpers_are_this_suite_s_own():
    """``tests`` and ``benchmarks`` are regular packages: an installed distribution shipping a top-level ``tests``
    (several on PyPI do) cannot shadow them, as it could an implicit namespace package."""
    import benchmarks
    import tests

    here = Path(__file__).resolve().parent
    assert Path(tests.__file__).resolve().parent == here
    assert Path(benchmarks.__file__).resolve().parent == here.parent / "benchmarks"
