"""The directories a command made are remembered per command (``rundir.created_scope``), not per process: a second
run in the same process neither sees nor removes what the first one made."""

from __future__ import annotations

from pathlib import Path

from kvprime.files import rundir


def test_a_scope_remembers_what_it_made_and_removes_only_that(tmp_path):
    before = tmp_path / "existing"
    before.mkdir()
    with rundir.created_scope():
        made = rundir.make_dirs(before / "a" / "b", "test.dir")
        assert rundir.created_here(made) and rundir.created_here(before / "a")
        assert not rundir.created_here(before)
        rundir.remove_created(made)
    assert not (before / "a").exists() and before.is_dir()


def test_a_second_scope_does_not_see_the_first_ones_directories(tmp_path):
    with rundir.created_scope():
        first = Path(rundir.new_run_dir(str(tmp_path / "exp")))
        assert rundir.created_here(first)
    with rundir.created_scope() as created:
        assert created == [] and not rundir.created_here(first)
        rundir.remove_created(first)  # not this command's: left alone
    assert first.is_dir()


def test_a_nested_scope_records_into_the_enclosing_one(tmp_path):
    with rundir.created_scope() as outer:
        rundir.expect_created(tmp_path / "run")
        with rundir.created_scope() as inner:
            assert inner is outer and rundir.created_here(tmp_path / "run")
            made = rundir.make_dirs(tmp_path / "other", "test.dir")
        assert outer == [tmp_path / "run", made]


def test_outside_a_scope_nothing_is_remembered(tmp_path):
    made = rundir.make_dirs(tmp_path / "x" / "y", "test.dir")
    assert not rundir.created_here(made)
    rundir.remove_created(made)
    assert made.is_dir()
