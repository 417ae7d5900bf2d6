"""The package's shape: no import cycles, small modules that say their job, and model-free commands that
really are model-free."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "kvprime"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
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
        assert len(text.splitlines()) <= 420, path
        if text.strip():
            assert isinstance(ast.get_docstring(ast.parse(text)), str), f"{path} has no module docstring"


@pytest.mark.slow
def test_report_and_merge_import_neither_torch_nor_transformers(tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "passage": f"River {i} flows into the sea near town {i}.",
                                        "query": f"Where does river {i} flow?", "answer": "into the sea"}) + "\n"
                            for i in range(4)))
    base = ["run", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}", "stats.n_boot=1000",
            "progress=false", "batch.samples=1", "run.num_shards=2"]
    for i in (0, 1):
        proc = subprocess.run([sys.executable, "-m", "kvprime", *base, f"run.shard={i}",
                               f"hydra.run.dir={tmp_path / f'shard{i}'}"], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
    probe = ("import sys\nfrom kvprime.commands.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
             "assert not heavy, heavy\nprint('model-free')\n")
    for args in (["report", str(tmp_path / "shard0")],
                 ["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "merged")]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0 and "model-free" in proc.stdout, proc.stderr
    assert (tmp_path / "merged" / "summary.csv").exists()
