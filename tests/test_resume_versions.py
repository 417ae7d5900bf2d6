"""Resuming a run directory another kvprime started (issue 21, item 7): the directory records the kvprime that
started it, and a resume whose config has settings the directory's lacks says it is a version change, names the
version and commit, the settings added since and the two ways forward, and changes nothing."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from fixtures import cli, runs

from kvprime.config.compose import compose
from kvprime.pipeline import metadata, runner

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false"]
OLD = {"kvprime": "0.0.9", "commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}


@pytest.fixture()
def data_file(tiny_exp21_run):
    """The data of the shared finished run (read only)."""
    return tiny_exp21_run.parent / "samples.jsonl"


def _args(data_file, *extra):
    return [*TINY, "dataset=jsonl", f"dataset.path={data_file}", *extra]


@pytest.fixture()
def finished(tiny_exp21_run, tmp_path):
    """A private copy of the shared finished exp21 run: each test changes it."""
    return runs.copy(tiny_exp21_run, tmp_path)


def _as_if_started_by_an_older_kvprime(run_dir: Path, *, drop=("floor", "generation.model"), identity=OLD):
    """config.json without settings a later kvprime added, and the older kvprime's identity."""
    cfg = json.loads((run_dir / "config.json").read_text())
    for dotted in drop:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[leaf]
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if identity is None:
        (run_dir / metadata.VERSION_FILE).unlink()
    else:
        (run_dir / metadata.VERSION_FILE).write_text(json.dumps(identity))


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_records_the_kvprime_that_started_it_and_a_resume_keeps_that_record(finished, data_file):
    recorded = json.loads((finished / metadata.VERSION_FILE).read_text())
    assert recorded == metadata.identity() and recorded["kvprime"]
    # config.json stays the config alone: resume compares it.
    assert "kvprime" not in json.loads((finished / "config.json").read_text())
    (finished / metadata.VERSION_FILE).write_text(json.dumps(OLD))  # same settings, started by another build
    (finished / "metadata.json").unlink()  # not finished: the resume runs
    runner.run_experiment(compose(_args(data_file, "resume=true")), finished)
    assert json.loads((finished / metadata.VERSION_FILE).read_text()) == OLD


def test_resuming_a_directory_whose_config_lacks_new_settings_blames_the_version_not_overrides(finished, data_file):
    _as_if_started_by_an_older_kvprime(finished)
    with pytest.raises(runner.RunDirConflict) as err:
        runner.run_experiment(compose(_args(data_file, "resume=true")), finished)
    text = str(err.value)
    assert f"started by kvprime 0.0.9 (git commit {OLD['commit'][:12]})" in text
    assert f"this is kvprime {metadata.identity()['kvprime']}" in text
    assert "settings added since, which its config.json lacks: floor, generation.model" in text
    assert "change of kvprime version, not an override" in text
    assert f"`git checkout {OLD['commit']}`" in text and "`pip install kvprime==0.0.9`" in text
    assert "start a new run" in text and "differ from the ones it was started with" not in text
    assert "\n" not in text


def test_settings_added_and_settings_changed_are_told_apart(finished, data_file):
    _as_if_started_by_an_older_kvprime(finished, drop=("stats.power",))
    with pytest.raises(runner.RunDirConflict) as err:
        runner.run_experiment(compose(_args(data_file, "resume=true", "seed=7")), finished)
    text = str(err.value)
    assert "config.json lacks: stats.power" in text
    assert "these settings differ from the ones it was started with: dataset.seed, generation.seed, seed." in text


def test_a_changed_setting_alone_is_still_an_override_to_undo(finished, data_file):
    with pytest.raises(runner.RunDirConflict) as err:
        runner.run_experiment(compose(_args(data_file, "resume=true", "dataset.n_samples=2")), finished)
    text = str(err.value)
    assert "differs from the one" in text and "['dataset']" in text and "version" not in text


def test_without_a_version_record_the_finished_runs_metadata_names_the_version(finished, data_file):
    meta = json.loads((finished / "metadata.json").read_text())
    meta["versions"]["kvprime"], meta["git"] = "0.0.8", {"commit": "fedcba9876543210", "dirty": True}
    (finished / "metadata.json").write_text(json.dumps(meta))
    _as_if_started_by_an_older_kvprime(finished, identity=None)
    with pytest.raises(runner.RunDirConflict, match=r"started by kvprime 0\.0\.8 \(git commit fedcba987654, with "
                                                    r"uncommitted changes\)"):
        runner.run_experiment(compose(_args(data_file, "resume=true")), finished)
    (finished / "metadata.json").unlink()  # stopped before the end, by a kvprime that recorded no version
    with pytest.raises(runner.RunDirConflict, match="started by an older kvprime .it recorded neither its version"):
        runner.run_experiment(compose(_args(data_file, "resume=true")), finished)


@pytest.mark.integration
def test_the_cli_refuses_in_one_paragraph_exit_2_and_leaves_the_directory_byte_identical(finished, data_file, tmp_path):
    _as_if_started_by_an_older_kvprime(finished)
    before = _tree(finished)
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1"}
    out = cli.run(["run", *_args(data_file),
                   "resume=true", f"hydra.run.dir={finished}"], env=env,
                  cwd=tmp_path, timeout=600)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "change of kvprime version" in " ".join(out.stderr.split())
    assert _tree(finished) == before
