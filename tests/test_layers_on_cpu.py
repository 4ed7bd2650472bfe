"""The floors of the house (docs/ARCHITECTURE.md): every import of the project's own files, those
inside functions included, runs down a floor or stays on its own, and the import graph of the
files has no circle. Read from the source (no module is imported), so it is fast and total."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("tvkd_ray", "actors", "driver", "jobs", "examples")
FRONT_DOOR = REPO / "tvkd_ray" / "__init__.py"  # the package face: hands on the driver's fit
FLOORS = {"core": 0, "roles": 1, "driver": 2, "entry points": 3}


def floor_of(path: Path) -> str:
    rel = path.relative_to(REPO).parts
    if path == FRONT_DOOR or rel[0] in ("jobs", "examples"):
        return "entry points"
    return {"actors": "roles", "driver": "driver"}.get(rel[0], "core")


def project_files() -> list[Path]:
    return sorted(p for root in SOURCES for p in (REPO / root).rglob("*.py"))


def _module_file(dotted: str, importer: Path) -> Path | None:
    """The project file a module name means, from the repository root or from a folder between
    it and the importer (scripts put their own folder on sys.path, e.g. jobs/ for the bench
    suites); None for other packages."""
    parts = dotted.split(".")
    folders = [p for p in importer.parents if p.is_relative_to(REPO)]
    for base in (REPO, *folders):
        candidate = base.joinpath(*parts)
        for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
            if path.is_file() and path.resolve().is_relative_to(REPO):
                return path
    return None


def imports_of(path: Path) -> set[Path]:
    """The project files ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = node.module or ""
            if node.level:  # relative: from the importer's package
                anchor = path.parent.joinpath(*[".."] * (node.level - 1)).resolve()
                package = ".".join(anchor.relative_to(REPO).parts + tuple(filter(None, [package])))
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
            names = [f"{package}.{alias.name}" for alias in node.names]
            names = [n if _module_file(n, path) else package for n in names]
        else:
            continue
        found |= {f for n in names if (f := _module_file(n, path)) is not None and f != path}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[Path, set[Path]]:
    return {path: imports_of(path) for path in project_files()}


def test_the_walker_sees_the_known_imports(graph):
    """The graph is real: an import inside a function and a `from package import module` are
    both found (a walker that saw nothing would pass every other test)."""
    assert REPO / "driver" / "fit.py" in graph[FRONT_DOOR]
    assert REPO / "driver" / "streams.py" in graph[REPO / "driver" / "fit.py"]  # inside fit()
    assert REPO / "tvkd_ray" / "schema.py" in graph[REPO / "actors" / "teacher.py"]
    assert REPO / "actors" / "trainer.py" in graph[REPO / "driver" / "launch.py"]
    suite = graph[REPO / "jobs" / "benchmarks" / "payload.py"]  # a script's own folder
    assert {
        REPO / "jobs" / "benchmarks" / "common.py",
        REPO / "jobs" / "measure_teacher.py",
    } <= suite


def test_every_import_runs_down_a_floor(graph):
    upward = [
        f"{a.relative_to(REPO)} ({floor_of(a)}) imports {b.relative_to(REPO)} ({floor_of(b)})"
        for a, targets in graph.items()
        for b in targets
        if FLOORS[floor_of(b)] > FLOORS[floor_of(a)]
    ]
    assert not upward, "\n".join(upward)


def test_no_file_imports_itself_back(graph):
    """No circle of any length: a depth-first walk finds no back edge."""
    state: dict[Path, str] = {}
    circles = []

    def visit(node: Path, trail: list[Path]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                loop = trail[trail.index(target) :] + [target]
                circles.append(" -> ".join(str(p.relative_to(REPO)) for p in loop))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for start in graph:
        if start not in state:
            visit(start, [start])
    assert not circles, "\n".join(circles)
