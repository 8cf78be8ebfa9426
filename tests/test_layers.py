"""The layer contract (pyproject.toml [tool.importlinter], docs/architecture.md): imports only point down, and no
two modules import each other, directly or around a circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("draftalign", "actors", "learner", "serve")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency (pyproject.toml [project.optional-dependencies] test)"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_draftalign_module_is_a_driver_or_in_the_ground_contract():
    """A new module under draftalign/ must be placed: named in the layers (a driver) or in the ground's contract."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = {m.strip() for c in contracts if c["type"] == "layers" for layer in c["layers"] for m in layer.split("|")}
    ground = {m for c in contracts if c["type"] == "forbidden" for m in c["source_modules"]}
    modules = {f"draftalign.{p.stem}" for p in (ROOT / "draftalign").glob("*.py") if p.stem != "__init__"}
    assert modules - layers - ground == set()
    assert not (layers & ground)


def test_no_import_cycle_between_modules():
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle():
    """Negative control: the finder reports a two-module cycle it is handed."""

    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycles(Graph()) == [["a", "b"]]
