"""The package's shape: its layers in one order, no import cycles, modules that say their job and stay under 500
lines, and model-free commands that really are model-free."""

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
from fixtures import cli

PKG = Path(__file__).resolve().parent.parent / "kvprime"

# kvprime's sub-packages (and top-level modules), lowest first. A module may import its own layer and the layers
# below it, never one above, imports inside functions included (a lazy import is still a dependency). A layer may
# hold several names; a new sub-package must be placed here (the test says so).
LAYERS = [
    ("errors", "registry"),  # top-level modules (registry: the generic registry, once there is one)
    ("files",),  # run-directory files: atomic writes, JSON/JSONL, the score log, locks and run directories
    ("config",),  # conf/, composing, the settings schema, plugins, devices, named comparisons
    ("cache",),  # the KV-cache mechanics on tensors: transformers internals, segments, scoring, decoding
    ("assets",),  # the packaged models and data: catalogue, fetching, GGUF conversion
    ("models",),  # loading weights and tokenizers, the sentence-embedding model
    ("data",),  # dataset loaders, checks and selection, distractors
    ("builders",),  # condition -> cache: the builder registry and builders, conditions, the engine, the floor
    ("surrogates",),  # surrogate sources, generation and the generator, the store
    ("analysis",),  # statistics, routing, the analyses and their figures (drawn, not saved)
    ("reporting",),  # finalize: tables, figures, report.md from a run directory's files
    ("tracking",),  # experiment trackers (MLflow): a finished run directory's files logged, a sweep as a parent run
    ("pipeline",),  # a run: plan, session, runner, records
    ("scaleout",),  # sweeps and merged shards
    ("commands", "__main__"),  # the command line
]


def _module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """kvprime modules ``path`` imports anywhere (function-level imports included: a lazy import is still a
    dependency)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                for cand in (f"{target}.{alias.name}", target):
                    if cand in modules:
                        out.add(cand)
                        break
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            # A package's __init__ importing its own sub-modules (registries' discovery) is not a cycle of code.
            if w.startswith(v + "."):
                continue
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

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_modules_are_small_and_say_their_job():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        # Split by job, not by line count: a module may be long where its job is one, but none over 500 lines.
        assert len(text.splitlines()) <= 500, path
        if text.strip():
            assert isinstance(ast.get_docstring(ast.parse(text)), str), f"{path} has no module docstring"


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` in module ``name`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(tree: ast.AST, name: str, is_package: bool, modules: set[str]):
    """(line, module imported) for every import in ``tree`` of one of ``modules`` (the package's own), anywhere in
    it; ``from x import y`` names ``x.y`` when that is a module (``from .. import assets``), else ``x``."""
    root = name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, name, is_package)
            if target.split(".")[0] == root:
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target


def _layer(module: str) -> int | None:
    """The index in LAYERS of a module's sub-package (None: the package itself, or a name not in LAYERS)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def layering_violations(pkg: Path) -> list[str]:
    """One line per import against LAYERS in the package folder ``pkg``, and per sub-package or top-level module
    that LAYERS does not place: ``file:line: importer imports target (layer) above its layer``."""
    root = pkg.name
    placed = {n for names in LAYERS for n in names}
    own = {p.stem for p in pkg.glob("*.py") if p.name != "__init__.py"}
    own |= {p.parent.name for p in pkg.glob("*/__init__.py")}
    problems = [f"{root}.{n} is in no layer: place it in tests/test_layout.py's LAYERS" for n in sorted(own - placed)]
    files = {_module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
    for name, path in files.items():
        here = _layer(name)
        if here is None:
            continue
        tree = ast.parse(path.read_text())
        for line, target in dict.fromkeys(_targets(tree, name, path.name == "__init__.py", set(files))):
            there = _layer(target)
            if there is not None and there > here:
                problems.append(f"{path.relative_to(pkg.parent)}:{line}: {name} imports {target}, of layer "
                                f"{'/'.join(LAYERS[there])}, above its own layer {'/'.join(LAYERS[here])}")
    return problems


def test_every_import_follows_the_layers():
    assert layering_violations(PKG) == []


@pytest.mark.parametrize("module, where", [
    ("files/results_io.py", "inside a function"),  # a lazy import is a dependency too
    ("cache/segments.py", "at the top"),
])
def test_an_import_against_the_layers_is_refused_naming_module_line_and_target(tmp_path, module, where):
    copy = tmp_path / "kvprime"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    lines = path.read_text().splitlines()
    if where == "at the top":
        at = next(i for i, ln in enumerate(lines) if ln.startswith("from __future__")) + 1
        lines.insert(at, "from ..commands import cli")
    else:
        lines += ["", "", "def _bad():", "    from ..commands import cli", "", "    return cli"]
        at = len(lines) - 3
    path.write_text("\n".join(lines) + "\n")
    importer = "kvprime." + module[:-3].replace("/", ".")
    found = layering_violations(copy)
    assert found == [f"kvprime/{module}:{at + 1}: {importer} imports kvprime.commands.cli, of layer commands/__main__, "
                     f"above its own layer {importer.split('.')[1]}"]


def test_a_sub_package_missing_from_the_layers_is_refused(tmp_path):
    copy = tmp_path / "kvprime"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "newpart").mkdir()
    (copy / "newpart" / "__init__.py").write_text('"""A sub-package nobody placed."""\n')
    assert layering_violations(copy) == ["kvprime.newpart is in no layer: place it in tests/test_layout.py's LAYERS"]


@pytest.mark.integration
def test_report_and_merge_import_neither_torch_nor_transformers(tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "passage": f"River {i} flows into the sea near town {i}.",
                                        "query": f"Where does river {i} flow?", "answer": "into the sea"}) + "\n"
                            for i in range(4)))
    base = ["run", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}", "stats.n_boot=1000",
            "progress=false", "batch.samples=1", "run.num_shards=2"]
    for i in (0, 1):
        proc = cli.run([*base, f"run.shard={i}", f"hydra.run.dir={tmp_path / f'shard{i}'}"], env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
    probe = ("import sys\nfrom kvprime.commands.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
             "assert not heavy, heavy\nprint('model-free')\n")
    for args in (["report", str(tmp_path / "shard0")],
                 ["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "merged")]):
        # a fresh interpreter: what the command imports is the question
        proc = cli.run(args, code=probe, env=env, timeout=600, fresh=True)
        assert proc.returncode == 0 and "model-free" in proc.stdout, proc.stderr
    assert (tmp_path / "merged" / "summary.csv").exists()
