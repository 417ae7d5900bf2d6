"""The suite's tiers and shared fixtures.

Tiers (markers registered in pyproject.toml): ``slow`` needs the packaged real model or data, ``integration``
starts processes (the CLI in a subprocess, launchers, a browser), and every other test is ``fast``. A test
marked neither is marked ``fast`` here, and a fast test that starts a process or fetches a packaged asset fails
saying which marker it needs, so ``make test-fast`` stays free of both.
"""

import os
from pathlib import Path

import pytest
from fixtures import runs
from fixtures.jsonl import river_rows, write_jsonl
from fixtures.similarity import stub_embedder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each pytest-xdist worker gets its share of the cores: torch's intra-op threads in every worker (and in the
# processes a test starts) would otherwise outnumber the cores, and OpenMP's spinning threads then slow them all.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _SHARE = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _SHARE)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TIERS = ("fast", "integration", "slow")
# The asset cache the session started with: a fast test may fetch from a KVPRIME_HOME of its own (fake assets),
# never from this one.
REAL_HOME = Path(os.environ.get("KVPRIME_HOME") or "~/.cache/kvprime").expanduser().resolve()
# Programs a fast test may still run: kvprime records the checkout's commit with git in every run's metadata.
ALLOWED_PROGRAMS = {"git"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("browser"):  # Playwright starts a Chromium process
            item.add_marker(pytest.mark.integration)
        if not any(item.get_closest_marker(m) for m in ("integration", "slow")):
            item.add_marker(pytest.mark.fast)


class TierError(AssertionError):
    """A fast test did what only an integration or slow test may do."""


def _refuse(what: str, marker: str):
    raise TierError(f"a fast test {what}: mark it @pytest.mark.{marker} (tiers: tests/conftest.py)")


def _program(args) -> str:
    first = args[0] if args else b""
    return os.path.basename(os.fsdecode(first))


@pytest.fixture(autouse=True)
def _tier_guard(request, monkeypatch):
    """In a fast test: no new process (fork, spawn, exec; git excepted) and no packaged real asset."""
    if not request.node.get_closest_marker("fast"):
        yield
        return
    import _posixsubprocess
    import subprocess

    from kvprime import assets
    from kvprime.assets import fetching, store

    real_fork_exec, real_posix_spawn = _posixsubprocess.fork_exec, os.posix_spawn

    def fork_exec(args, *rest, **kw):
        if _program(args) not in ALLOWED_PROGRAMS:
            _refuse(f"started a process ({_program(args)})", "integration")
        return real_fork_exec(args, *rest, **kw)

    def posix_spawn(path, argv, *rest, **kw):
        if _program(argv) not in ALLOWED_PROGRAMS:
            _refuse(f"started a process ({_program(argv)})", "integration")
        return real_posix_spawn(path, argv, *rest, **kw)

    real_fetch = fetching.fetch

    def fetch(name, *args, **kw):
        if store.home().resolve() == REAL_HOME:
            _refuse(f"fetched the packaged asset {name!r}", "slow")
        return real_fetch(name, *args, **kw)

    monkeypatch.setattr(_posixsubprocess, "fork_exec", fork_exec)
    # subprocess binds fork_exec when it is imported (``from _posixsubprocess import fork_exec as _fork_exec``), so
    # Popen never looks at the module attribute again: its own name has to be replaced too.
    if hasattr(subprocess, "_fork_exec"):
        monkeypatch.setattr(subprocess, "_fork_exec", fork_exec)
    monkeypatch.setattr(os, "posix_spawn", posix_spawn)
    monkeypatch.setattr(os, "fork", lambda: _refuse("forked", "integration"))
    monkeypatch.setattr(fetching, "fetch", fetch)
    monkeypatch.setattr(assets, "fetch", fetch)
    yield


# A 1x1 PNG: what a figure's file holds in a fast test that does not test figures.
_BLANK_PNG: list[bytes] = []


@pytest.fixture(autouse=True)
def _figures_drawn_not_rasterised(request, monkeypatch):
    """In a fast test not marked ``figures``, every figure is built (each plotting call runs, so a figure that
    fails on its data still fails) but not rasterised: ``Figure.savefig`` writes a 1x1 PNG instead of the 0.35 s
    of layout and rendering. A test that reads a figure's pixels, size or metadata is marked ``figures``."""
    if not request.node.get_closest_marker("fast") or request.node.get_closest_marker("figures"):
        yield
        return
    import io

    from matplotlib.figure import Figure

    if not _BLANK_PNG:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (1, 1), "white").save(buf, format="png")
        _BLANK_PNG.append(buf.getvalue())

    def savefig(self, fname, *args, **kwargs):
        if hasattr(fname, "write"):
            fname.write(_BLANK_PNG[0])
        else:
            Path(fname).write_bytes(_BLANK_PNG[0])

    monkeypatch.setattr(Figure, "savefig", savefig)
    yield


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture()
def jsonl(tmp_path):
    """Write rows as JSONL into the test's tmp folder: ``jsonl(rows, name="samples.jsonl") -> Path``."""
    return lambda rows, name="samples.jsonl": write_jsonl(tmp_path / name, rows)


@pytest.fixture()
def river_samples(tmp_path):
    """``river_samples(n, name=..., **text)``: n tiny QA samples ("Where does river i flow?") as JSONL."""
    return lambda n, name="samples.jsonl", **text: write_jsonl(tmp_path / name, river_rows(n, **text))


@pytest.fixture()
def stub_similarity(monkeypatch):
    """The similarity encoder replaced by a deterministic one (no MiniLM load), where similarity is not under
    test: equal texts give cosine 1, others a fixed value per pair."""
    stub_embedder(monkeypatch)


@pytest.fixture(scope="session")
def tiny_tok():
    from kvprime.cache.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_engine(tiny_tok):
    from kvprime.builders.engine import Engine
    from kvprime.cache.tiny import tiny_model

    return Engine(tiny_model("llama", vocab_size=len(tiny_tok)), tiny_tok)


@pytest.fixture(scope="session")
def tiny_exp01_run(tmp_path_factory):
    """One exp01 run of the tiny random model on 4 samples (surrogates generated into a private store), shared by
    the test modules that read a finished run; a test that changes it works on a copy (``runs.copy``)."""
    return runs.shared(tmp_path_factory, "tiny_exp01", runs.build_tiny_exp01)


@pytest.fixture(scope="session")
def tiny_exp21_run(tmp_path_factory):
    """One exp21 run of the tiny random model on 3 river samples (its data beside it, ``run.parent /
    "samples.jsonl"``), shared like ``tiny_exp01_run``."""
    return runs.shared(tmp_path_factory, "tiny_exp21", runs.build_tiny_exp21)
