"""The package's shape, checked: no import circles anywhere (lazy imports inside functions and
`TYPE_CHECKING` imports included, the benchmarks too), packages that import only downwards, leaf
modules that reach no package, no two modules with one name, and no module too long to read."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dtrain"
BENCHMARKS = ROOT / "benchmarks"
MAX_LINES = 600
# over 400 lines: each one a single concept, looked at and kept whole (say why)
LONG_BUT_ONE_CONCEPT = {
    "dtrain.config": "the config tree, its validation and its loading, in one place",
    "dtrain.prepare.sources": "the four kinds of source, one reader each, sharing the manifest",
    "dtrain.train.trainer": "the one training loop: fit, train epoch, evaluate",
    "dtrain.runs.review_page": "one self-contained HTML page, its script inline",
}
# what a package may import, lowest first: a package imports leaves and packages listed before it
LAYERS = [
    {"dataset", "launch"},
    {"methods", "prepare"},
    {"index", "train"},
    {"runs", "tune"},
    {"commands"},
    {"__main__"},  # and the package itself: `dtrain.load`
]
# modules that import nothing of dtrain but each other: everything may use them
LEAVES = {
    "dtrain.config",
    "dtrain.config_values",
    "dtrain.distributed",
    "dtrain.errors",
    "dtrain.files",
    "dtrain.ray_cluster",
    "dtrain.stop_signal",
    "dtrain.methods.registry",
    "dtrain.methods.pretrained",
    "dtrain.dataset.images",
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules it imports, wherever the import stands (a `from pkg import mod`
    counts as importing `mod`, and `pkg` only when a name is not a module)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules]
                if len(targets) < len(subs):
                    targets.append(node.module)
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def package_graph() -> dict[str, set[str]]:
    return import_graph({module_name(p): p for p in PACKAGE.rglob("*.py")})


def benchmark_graph() -> dict[str, set[str]]:
    """The benchmark scripts import each other by file name (`from common import ...`)."""
    return import_graph({module_name(p, BENCHMARKS): p for p in BENCHMARKS.glob("*.py")})


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if module == "dtrain":
        return len(LAYERS) - 1
    if module in LEAVES:
        return None
    return next((i for i, layer in enumerate(LAYERS) if parts[1] in layer), None)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that break LAYERS or LEAVES, as 'a -> b'."""
    wrong = []
    for name, targets in graph.items():
        for target in targets:
            here, there = layer_of(name), layer_of(target)
            if name in LEAVES:
                ok = target in LEAVES
            elif there is None:  # a leaf
                ok = True
            else:
                same_package = name.split(".")[:2] == target.split(".")[:2]
                ok = here is not None and (there < here or same_package)
            if not ok:
                wrong.append(f"{name} -> {target}")
    return sorted(wrong)


def test_no_import_circles_in_the_package_or_the_benchmarks():
    graph = package_graph()
    assert "dtrain.dataset.loader" in graph["dtrain.train.trainer"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    benchmarks = benchmark_graph()
    assert "common" in benchmarks["performance"]
    assert find_cycle(benchmarks) is None, " -> ".join(find_cycle(benchmarks))


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_checking_imports_count(tmp_path):
    (tmp_path / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n"
    )
    (tmp_path / "b.py").write_text("import a\n")
    graph = import_graph({p.stem: p for p in tmp_path.glob("*.py")})
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])


def test_packages_import_only_downwards_and_leaves_reach_no_package():
    graph = package_graph()
    loose = {name for name in graph if name not in LEAVES and layer_of(name) is None}
    assert not loose, f"in no layer and not a leaf: {loose}"
    assert upward_imports(graph) == []


def test_the_layer_rule_catches_an_upward_import():
    graph = {
        "dtrain.config": {"dtrain.train.selection"},
        "dtrain.dataset.loader": {"dtrain.prepare.pipeline"},
        "dtrain.train.trainer": {"dtrain.dataset.loader", "dtrain.config"},
    }
    assert upward_imports(graph) == [
        "dtrain.config -> dtrain.train.selection",
        "dtrain.dataset.loader -> dtrain.prepare.pipeline",
    ]


def test_no_two_modules_share_a_name():
    names = Counter(p.stem for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__"))
    assert not {n for n, count in names.items() if count > 1}


def test_no_module_is_too_long_and_long_ones_are_listed():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {m: n for m, n in lengths.items() if n > MAX_LINES}
    long = {m for m, n in lengths.items() if n > 400}
    assert long <= set(LONG_BUT_ONE_CONCEPT), (
        f"over 400 lines, not yet looked at: {long - set(LONG_BUT_ONE_CONCEPT)}"
    )


def test_no_package_holds_more_than_a_quarter_of_the_code():
    per_package = Counter()
    for p in PACKAGE.rglob("*.py"):
        parts = module_name(p).split(".")
        per_package[parts[1] if len(parts) > 2 else "(top)"] += len(p.read_text().splitlines())
    total = sum(per_package.values())
    assert max(per_package.values()) <= total / 4, per_package.most_common(3)
