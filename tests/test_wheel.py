"""The wheel carries what a run needs: every sub-package and the configs (conf/ as kvprime/conf/), and an
installed wheel runs an experiment from an unrelated directory, writing under ./outputs there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists kvprime's packages by hand (see its comment): a new sub-package must be added."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "kvprime").rglob("__init__.py")}
    assert not found - listed, (f"sub-packages {sorted(found - listed)} are missing from [tool.setuptools] packages "
                                "in pyproject.toml, so a wheel would not contain them: add them there")
    assert listed - found == {"kvprime.conf"}, f"listed, not in kvprime/: {sorted(listed - found - {'kvprime.conf'})}"


def _checkout_copy(dest: Path) -> Path:
    """The files of the checkout as git sees them (tracked or not ignored, deleted ones left out), so the
    build writes nothing into the checkout and leaves out its build outputs, venv and run directories."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.integration
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src = _checkout_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    # No isolation: the build uses this environment's setuptools instead of downloading one (no network).
    # The dependency check is skipped because build-system.requires names `wheel`, which setuptools >= 70.1
    # no longer needs and this environment need not have.
    _run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", dist, src])
    (wheel,) = dist.glob("kvprime-*.whl")
    (sdist,) = dist.glob("kvprime-*.tar.gz")
    conf_files = sorted(str(p.relative_to(src / "conf")) for p in (src / "conf").rglob("*.yaml"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("kvprime/conf/")}
        typed = "kvprime/py.typed" in zf.namelist()
    assert shipped == {f"kvprime/conf/{f}" for f in conf_files}
    assert typed, "the wheel must carry kvprime/py.typed: pyproject declares the package typed"
    with tarfile.open(sdist) as tf:
        assert any(n.endswith("/conf/config.yaml") for n in tf.getnames()), "the sdist must carry conf/ too"

    # A fresh environment gets the wheel alone; torch and the other dependencies are borrowed from this
    # environment's site-packages through a .pth file (the directories a .pth adds are not scanned for .pth
    # files themselves, so this environment's editable kvprime stays out of it).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "--quiet", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KVPRIME_OUTPUT_ROOT", "PYTHONPATH")}
    env["KVPRIME_HOME"] = str(tmp_path / "home")
    where = _run([python, "-c",
                  "import kvprime, kvprime.config.confdir as c; print(kvprime.__file__); print(c.CONF_DIR)"],
                 cwd=elsewhere, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), f"not the installed wheel: {where}"

    proc = _run([venv / "bin" / "kvprime", "run", "model=tiny_random_llama", "dataset=exp21_sanity",
                 "stats.n_boot=1000", "progress=false"], cwd=elsewhere, env=env, timeout=300)
    found = re.search(r"kvprime: run directory (\S+)", proc.stderr)
    assert found, proc.stderr[-3000:]
    run_dir = Path(found.group(1))
    assert run_dir.is_relative_to(elsewhere / "outputs" / "exp21"), run_dir
    assert (run_dir / "report.md").is_file()
    assert (run_dir / "report.html").is_file()  # the templates shipped
