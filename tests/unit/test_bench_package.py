"""distgan/bench/ is one package with no import circle: its modules' imports (read with ast, those inside functions
included) form an acyclic graph, common.py imports no sibling, and every command it serves answers --help.

(Before the package, bench.py imported bench_scale and bench_scale imported `timed` from bench: a circle.)
"""

import ast
import subprocess
import sys

import pytest

from conftest import BIN, REPO, cli_env, patience

BENCH = REPO / "distgan" / "bench"
PACKAGE = "distgan.bench"
MODULES = {"__init__", "common", "train", "data", "scale", "quality", "gpu", "gpu_check"}


def _name(stem: str) -> str:
    return PACKAGE if stem == "__init__" else f"{PACKAGE}.{stem}"


def _submodules() -> set[str]:
    return {p.stem for p in BENCH.glob("*.py") if p.stem != "__init__"}


def bench_imports(source: str, module: str) -> set[str]:
    """The modules of distgan.bench that `source` (the text of `module`) imports, anywhere in it. The package
    itself (its __init__) counts as distgan.bench: `from distgan.bench import timed` is an edge to it, while
    `from distgan.bench import scale` is an edge to distgan.bench.scale."""
    subs = _submodules()
    package = module if module == PACKAGE else module.rpartition(".")[0]

    def within(name: str) -> str | None:  # distgan.bench.scale.x -> distgan.bench.scale
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            return ".".join(name.split(".")[:3])
        return None

    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {m for a in node.names if (m := within(a.name))}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                if base == PACKAGE:  # a submodule, or a name of the __init__
                    out.add(f"{base}.{a.name}" if a.name in subs else PACKAGE)
                elif f"{base}.{a.name}" == PACKAGE:  # from distgan import bench
                    out.add(PACKAGE)
                elif m := within(base):
                    out.add(m)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(BENCH.glob("*.py")):
        module = _name(path.stem)
        graph[module] = bench_imports(path.read_text(), module) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_holds_every_bench():
    assert {p.stem for p in BENCH.glob("*.py")} == MODULES
    for old in ("bench.py", "bench_data.py", "bench_scale.py", "gpu_check.py"):
        assert not (REPO / "distgan" / old).exists(), old


def test_the_import_reader_sees_every_form_and_the_cycle_finder_finds_the_old_circle():
    source = (
        "import distgan.bench.scale\n"
        "from distgan.bench import timed\n"  # a name of the package's __init__
        "from distgan.bench import data\n"  # a submodule
        "from distgan import bench\n"
        "def f():\n    from .common import timed\n    from . import train\n"
        "from distgan.local_launch import run_local\n"  # outside the package: not an edge
    )
    got = bench_imports(source, "distgan.bench.gpu_check")
    assert got == {"distgan.bench.scale", "distgan.bench", "distgan.bench.data", "distgan.bench.common",
                   "distgan.bench.train"}  # fmt: skip
    # Control: the layout before the package, bench.py <-> bench_scale.py.
    old = {"distgan.bench": {"distgan.bench_data", "distgan.bench_scale"}, "distgan.bench_scale": {"distgan.bench"}}
    assert find_cycle(old) == ["distgan.bench", "distgan.bench_scale", "distgan.bench"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_bench_import_graph_is_acyclic_and_common_imports_no_sibling():
    graph = import_graph()
    assert set(graph) == {_name(m) for m in MODULES}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    assert graph[f"{PACKAGE}.common"] == set(), graph[f"{PACKAGE}.common"]
    # Nothing imports the package's __init__ (it imports the benches): each bench reaches common directly.
    assert not [m for m, deps in graph.items() if PACKAGE in deps], graph
    # The dispatch reaches the four `distgan bench` commands; the benches share through common only.
    assert graph[PACKAGE] == {f"{PACKAGE}.{m}" for m in ("train", "data", "scale", "quality", "gpu")}
    for m in ("train", "data", "scale", "quality", "gpu", "gpu_check"):
        assert graph[f"{PACKAGE}.{m}"] <= {f"{PACKAGE}.common"}, (m, graph[f"{PACKAGE}.{m}"])


def test_importing_the_package_imports_no_bench_and_no_torch():
    """`distgan gpu-check --dry` hides CUDA before torch is imported, and `distgan --help` stays fast: the package
    __init__ (imported before any of its modules) must import neither a bench nor torch."""
    code = (
        "import sys\n"
        "import distgan.bench.gpu_check, distgan.bench.common\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('distgan.bench.')))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=patience(120)
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "['distgan.bench.common', 'distgan.bench.gpu_check']"


def test_gpu_check_finds_the_repository_from_its_new_place():
    from distgan.bench import gpu_check

    assert gpu_check.REPO == REPO and (gpu_check.REPO / gpu_check.DRY.config).is_file()


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "train", "--help"], ["bench", "data", "--help"],
                                  ["bench", "scale", "--help"], ["gpu-check", "--help"]])  # fmt: skip
def test_every_bench_command_answers_help(argv):
    p = subprocess.run(
        [str(BIN / "distgan"), *argv], env=cli_env(), capture_output=True, text=True, timeout=patience(120)
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(f"usage: distgan {argv[0]}"), p.stdout[:500]
