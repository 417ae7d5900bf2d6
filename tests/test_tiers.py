"""The tier guard of tests/conftest.py: a fast test that starts a process fails naming the marker it needs; the
same test marked integration runs. Checked on a small suite run by pytest in this process, with the guard's own
conftest and fixtures."""

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
HERE = Path(__file__).resolve().parent

STARTS_A_PROCESS = '''
import subprocess, sys
import pytest

def test_unmarked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

@pytest.mark.integration
def test_marked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_git_is_allowed():
    subprocess.run(["git", "--version"], check=True, capture_output=True)
'''


# integration: the inner suite's marked test starts a process, which this test's own guard would refuse if it
# were fast
@pytest.mark.integration
def test_a_fast_test_that_starts_a_process_fails_naming_the_marker(pytester):
    pytester.makeconftest((HERE / "conftest.py").read_text())
    shutil.copytree(HERE / "fixtures", pytester.path / "fixtures")
    pytester.makepyfile(test_inner=STARTS_A_PROCESS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-W", "ignore")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["E *TierError: a fast test started a process (python*): mark it "
                                 "@pytest.mark.integration*"])
