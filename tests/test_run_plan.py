"""The typed run plan: ``prepare`` returns a frozen RunPlan that later stages read by attribute, and plan.json is
written from it, in the run directory's format (shards' plan.json files are compared byte for byte)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvprime.builders.conditions import builder_notes
from kvprime.config.compose import compose
from kvprime.data import LoadResult
from kvprime.files.results_io import write_json
from kvprime.pipeline.plan import RunPlan, prepare


def _exp01_overrides(folder) -> list[str]:
    """The overrides of conftest's ``tiny_exp01_run`` (its data and store beside its run directory)."""
    return ["experiment=exp01", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={folder / 'samples.jsonl'}",
            "stats.n_boot=1000", "progress=false", "generation.max_new_tokens=6", "generation.model=null",
            f"generation.store={folder / 'store'}"]


def test_plan_json_is_written_from_the_plan_in_the_run_directorys_format(tiny_exp01_run, tmp_path):
    plan = prepare(compose(_exp01_overrides(tiny_exp01_run.parent)))
    plan.write(tmp_path)
    assert (tmp_path / "plan.json").read_bytes() == (tiny_exp01_run / "plan.json").read_bytes()
    # The format, key for key and in order, as kvprime merge and kvprime report read it.
    write_json(tmp_path / "expected.json", {"only": None,
                                            "conditions": {n: s.to_dict() for n, s in plan.conditions.items()},
                                            "builder_notes": builder_notes(plan.conditions), "plugins": {}})
    assert (tmp_path / "plan.json").read_bytes() == (tmp_path / "expected.json").read_bytes()


def test_the_plan_is_typed_frozen_and_holds_the_selection_the_shard_and_the_pool(tiny_exp01_run):
    overrides = _exp01_overrides(tiny_exp01_run.parent)
    whole = prepare(compose(overrides))
    part = prepare(compose([*overrides, "run.num_shards=2", "run.shard=1", "batch.samples=1"]))
    assert isinstance(whole, RunPlan) and isinstance(whole.selection, LoadResult)
    assert list(whole.conditions) == list(part.conditions) and whole.conditions["A1_baseline"].name == "A1_baseline"
    assert [s.sample_id for s in whole.samples] == ["s0", "s1", "s2", "s3"]
    assert [s.sample_id for s in part.samples] == ["s1", "s3"]  # its shard ...
    assert part.selection.samples == whole.selection.samples  # ... of the whole selection
    assert part.pool == whole.pool == tuple(s.query for s in whole.selection.samples)
    assert whole.model["name"] == "tiny_random_llama" and whole.seed == 42 and whole.only is None
    assert whole.plugins == {} and not whole.grouped and whole.load_data_s >= 0
    assert [c["treatment"] for c in whole.comparisons]  # the experiment's named comparisons, checked
    with pytest.raises(dataclasses.FrozenInstanceError):
        whole.only = "A1_baseline"
    with pytest.raises(TypeError):
        whole.conditions["extra"] = whole.conditions["A1_baseline"]


def test_one_condition_and_its_baseline(tiny_exp01_run):
    plan = prepare(compose([*_exp01_overrides(tiny_exp01_run.parent), "condition=truncated_oracle"]),
                   "truncated_oracle", condition_selected=True)
    assert plan.only == "truncated_oracle" and len(plan.conditions) == 2
    assert json.loads(json.dumps(plan.record()))["only"] == "truncated_oracle"
