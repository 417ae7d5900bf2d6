"""No global mutable state: two runs in one process each return their own exit status and leave sys.argv and the
environment as they were; each run finds the plugins of its own config folders only; the similarity model loads
without touching the environment; the private Hydra names ``kvprime run`` relies on are where it imports them."""

from __future__ import annotations

import inspect
import json
import os
import sys

import pytest

from kvprime.config import plugins
from kvprime.errors import ConfigError

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false", "condition=truncated_oracle"]
# torch's inductor records its cache folder in the environment the first time it looks it up: torch's, not kvprime's.
TORCHS = ("TORCHINDUCTOR_CACHE_DIR",)


def _environ() -> dict:
    return {k: v for k, v in os.environ.items() if k not in TORCHS}


@pytest.fixture()
def data_file(river_samples):
    return river_samples(2)


@pytest.fixture()
def forget_test_plugins():
    """The test's plugin modules and sources are dropped afterwards (they register into process-wide registries)."""
    from kvprime.surrogates.sources import SOURCE_REGISTRY

    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if "kvp_state_" in name:
            del sys.modules[name]
    for name in ("from_folder_a", "from_folder_b", "pkg_from_a", "pkg_from_b"):
        SOURCE_REGISTRY.unregister(name)


def _plugin(folder, module: str, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(
        "from kvprime.surrogates.sources import register_source\n\n\n"
        f"@register_source({source!r})\ndef text(sample, ctx, arg):\n    \"\"\"A fixed text.\"\"\"\n"
        f"    return {source!r}\n")


def test_two_runs_in_one_process_return_their_own_status_and_find_only_their_own_plugins(
        tmp_path, data_file, monkeypatch, capsys, forget_test_plugins):
    from kvprime.commands.app import run_hydra_app

    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    folder_a, folder_b = tmp_path / "study_a", tmp_path / "study_b"
    _plugin(folder_a, "kvp_state_only_a", "from_folder_a")
    folder_b.mkdir()
    argv, environ = list(sys.argv), _environ()
    common = [*TINY, "dataset=jsonl", f"dataset.path={data_file}"]

    fine = run_hydra_app(["--config-dir", str(folder_a), "plugins=[kvp_state_only_a]", *common,
                          f"hydra.run.dir={tmp_path / 'a'}"])
    assert fine == 0, capsys.readouterr().err
    assert (tmp_path / "a" / "results.json").exists()
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["plugins"] == {"kvp_state_only_a": str(folder_a / "kvp_state_only_a.py")}
    capsys.readouterr()

    # Another job of the same process, with another config folder: the first job's folder is not searched.
    refused = run_hydra_app(["--config-dir", str(folder_b), "plugins=[kvp_state_only_a]", *common,
                             f"hydra.run.dir={tmp_path / 'b'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert refused == 2 and "no module named 'kvp_state_only_a'" in err and str(folder_a) not in err
    assert not (tmp_path / "b").exists()  # refused before it wrote anything
    assert sys.argv == argv and _environ() == environ


def test_a_run_that_succeeds_after_a_refused_one_returns_0(tmp_path, data_file, monkeypatch, capsys):
    from kvprime.commands.app import run_hydra_app

    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    argv = list(sys.argv)
    common = [*TINY, "dataset=jsonl", f"dataset.path={data_file}"]
    assert run_hydra_app([*common, "on_too_long=maybe", f"hydra.run.dir={tmp_path / 'refused'}"]) == 2
    assert "on_too_long" in capsys.readouterr().err
    assert run_hydra_app(["--cfg", "job", *common]) == 0  # prints the config, runs nothing
    assert sys.argv == argv


def test_each_load_searches_only_the_folders_it_is_given(tmp_path, monkeypatch, forget_test_plugins):
    monkeypatch.chdir(tmp_path)
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    _plugin(folder_a, "kvp_state_plug", "from_folder_a")
    _plugin(folder_b, "kvp_state_plug", "from_folder_b")
    for folder, source in ((folder_a, "pkg_from_a"), (folder_b, "pkg_from_b")):
        _plugin(folder / "kvp_state_pkg", "__init__", source)

    first = plugins.load_modules(["kvp_state_plug", "kvp_state_pkg"], dirs=[folder_a])
    second = plugins.load_modules(["kvp_state_plug", "kvp_state_pkg"], dirs=[folder_b])
    assert plugins.origins(first) == {"kvp_state_plug": str(folder_a / "kvp_state_plug.py"),
                                      "kvp_state_pkg": str(folder_a / "kvp_state_pkg" / "__init__.py")}
    assert plugins.origins(second) == {"kvp_state_plug": str(folder_b / "kvp_state_plug.py"),
                                       "kvp_state_pkg": str(folder_b / "kvp_state_pkg" / "__init__.py")}
    with pytest.raises(ConfigError, match="no module named 'kvp_state_pkg'"):
        plugins.load_modules(["kvp_state_pkg"])  # a third load searching neither folder finds neither package
    assert plugins.load_modules(["kvp_state_plug"], dirs=[folder_a])["kvp_state_plug"] is first["kvp_state_plug"]


@pytest.mark.slow
def test_embedding_leaves_the_environment_alone(monkeypatch):
    import sentence_transformers  # noqa: F401 -- what importing the library sets (KMP_*) is the library's

    from kvprime.models.embedder import Embedder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = _environ()
    (value,) = Embedder().cosine_pairs([("Where does the river flow?", "Where does the river go?")])
    assert 0.5 < value <= 1.0
    assert _environ() == before and "HF_HUB_OFFLINE" not in os.environ


def test_the_private_hydra_names_kvprime_uses_are_where_it_imports_them():
    """A Hydra upgrade that moves or reshapes one of these fails here, by name."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import _run_hydra, get_args_parser

    from kvprime.commands import hydra_bridge
    from kvprime.scaleout import hydra_sweeper

    assert hydra_bridge._run_hydra is _run_hydra and hydra_bridge.get_args_parser is get_args_parser
    params = inspect.signature(_run_hydra).parameters
    assert {"args", "args_parser", "task_function", "config_path", "config_name"} <= set(params)
    parsed = get_args_parser().parse_args(["-m", "--config-dir", "x", "seed=1,2"])
    assert parsed.multirun and parsed.config_dir == "x" and parsed.overrides == ["seed=1,2"]
    # By name: Hydra's plugin scan re-executes its plugin modules, so the class object may be a newer one.
    ours = hydra_sweeper.BasicSweeper
    assert (ours.__module__, ours.__qualname__) == (BasicSweeper.__module__, "BasicSweeper")
    assert callable(BasicSweeper.split_arguments)
