"""experiment=multidoc on the synthetic tasks needs no override (issue 23 item 4): conf/experiment_data/ holds what
each (experiment, data set) pair needs, composed after the experiment, and the user's overrides still win."""

from pathlib import Path

import pytest

from kvprime.config import confdir
from kvprime.config.compose import compose

TASKS = ("synthetic_kv", "synthetic_twohop", "synthetic_niah")
QUESTION = "Question: {query}\nAnswer:"
MULTIDOC_CONDITIONS = ("joint", "independent", "primed_static", "primed_generated", "primed_query", "primed_random")


@pytest.mark.parametrize("task", TASKS)
def test_multidoc_on_a_synthetic_task_gets_its_settings_with_no_override(task):
    cfg = compose(["experiment=multidoc", f"dataset={task}"])
    assert cfg["multidoc"]["k"] == 1
    assert cfg["answer"]["max_new_tokens"] == 16
    assert "answer" in cfg["metrics"]
    assert cfg["experiment"]["analyses"] == ["accuracy_by_position"]
    assert tuple(cfg["conditions"]) == MULTIDOC_CONDITIONS
    assert {c["prompt_template"] for c in cfg["conditions"].values()} == {QUESTION}
    # the rest of each condition is the experiment's
    assert cfg["conditions"]["primed_query"]["surrogate"] == "query"
    assert cfg["experiment"]["name"] == "multidoc" and cfg["dataset"]["name"] == task


def test_the_users_overrides_win_over_the_pairs_settings():
    cfg = compose(["experiment=multidoc", "dataset=synthetic_twohop", "multidoc.k=2", "answer.max_new_tokens=8",
                   "metrics=[nll]", "experiment.analyses=[]", "conditions.joint.prompt_template='Q: {query}'"])
    assert cfg["multidoc"]["k"] == 2 and cfg["answer"]["max_new_tokens"] == 8 and cfg["metrics"] == ["nll"]
    assert cfg["experiment"]["analyses"] == []
    assert cfg["conditions"]["joint"]["prompt_template"] == "Q: {query}"
    assert cfg["conditions"]["independent"]["prompt_template"] == QUESTION


@pytest.mark.parametrize("overrides", [["experiment=multidoc"], ["experiment=multidoc", "dataset=hotpotqa"],
                                       ["experiment=exp21", "dataset=synthetic_kv"]])
def test_other_pairs_are_untouched(overrides):
    cfg = compose(overrides)
    plain = compose([o for o in overrides if not o.startswith("dataset=")])
    assert cfg["answer"] == plain["answer"] and cfg["metrics"] == plain["metrics"]
    assert cfg["conditions"] == plain["conditions"] and cfg["multidoc"] == plain["multidoc"]
    assert "analyses" not in cfg["experiment"]


def test_one_selected_condition_keeps_the_pairs_prompt():
    from kvprime.pipeline.plan import plan_conditions

    cfg = compose(["experiment=multidoc", "dataset=synthetic_kv", "condition=multidoc/joint"])
    specs = plan_conditions(cfg, only="multidoc/joint")
    assert list(specs) == ["independent", "joint"]
    assert {s.prompt_template for s in specs.values()} == {QUESTION}


def test_every_pair_file_names_an_experiment_and_a_data_set_that_exist():
    """A misspelt file name would be skipped without a word (the defaults entry is optional)."""
    root = Path(confdir.CONF_DIR) / "experiment_data"
    pairs = sorted(p.relative_to(root).with_suffix("").parts for p in root.rglob("*.yaml"))
    assert pairs, root
    for experiment, dataset in pairs:
        assert experiment in confdir.names("experiment") and dataset in confdir.names("dataset"), (experiment, dataset)
