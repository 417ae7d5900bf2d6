"""No silent override: a key kvprime does not read, in any section and however it arrived (a YAML file, or `+` on
the command line), is refused in one paragraph naming the key, its value, the keys the section accepts (the
closest first) and the one way a key becomes known (a plugin's declaration)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fixtures import cli
from omegaconf import OmegaConf

from kvprime.config import compose as composition
from kvprime.config import confdir, settings
from kvprime.config.compose import compose
from kvprime.data import LOADERS, OPTIONS, Sample, load_samples, register_loader
from kvprime.errors import ConfigError
from kvprime.pipeline.plan import plain

BASE = ["model=tiny_random_llama", "dataset=exp21_sanity", "progress=false"]


def _refusal(overrides, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        settings.check(plain(compose([*BASE, *overrides])), loader_options=OPTIONS, **kw)
    return str(info.value)


@pytest.mark.parametrize("override, shown, closest", [
    ("+sed=3", "sed=3", "seed"),
    ("+model.dtpye=bfloat16", "model.dtpye='bfloat16'", "dtype"),
    ("+dataset.n_sample=3", "dataset.n_sample=3", "n_samples"),
    ("+experiment.baselin=bare", "experiment.baselin='bare'", "baseline"),
    ("+stats.alpah=0.01", "stats.alpah=0.01", "alpha"),
    ("+generation.temprature=0", "generation.temprature=0", "temperature"),
])
def test_an_added_key_is_refused_naming_it_its_value_and_the_closest_known_key(override, shown, closest):
    message = _refusal([override])
    section = shown.split("=")[0].rpartition(".")[0]
    assert message.startswith(f"{shown} is not accepted")
    assert f"Did you mean {section + '.' if section else ''}{closest}?" in message
    accepted = re.search(r"Accepted in [^:]+: ([^.]+)\.", message).group(1).split(", ")
    assert accepted[0] == closest and len(accepted) > 3  # the closest first, then the section's other keys
    assert "plugin" in message and "register_loader(name, options=(...))" in message
    assert "\n" not in message  # one paragraph


def test_every_unknown_key_gets_its_paragraph_in_one_error():
    message = _refusal(["+sed=3", "+model.foo=1", "+experiment.bar=2"])
    assert message.startswith("3 settings are not accepted:")
    assert [ln.split("=")[0] for ln in message.splitlines()[1:]] == ["sed", "model.foo", "experiment.bar"]


def test_a_dataset_key_is_known_only_to_the_loader_that_declares_it():
    # mode is an option of msmarco_v11, not of the SQuAD loader
    message = _refusal(["dataset=squad_v11", "+dataset.mode=walkthrough"])
    assert "dataset.mode='walkthrough' is not accepted" in message and "(loader 'squad_v11')" in message
    cfg = plain(compose([*BASE, "dataset=msmarco_v11", "dataset.mode=walkthrough"]))
    assert settings.check(cfg, loader_options=OPTIONS)["dataset"]["mode"] == "walkthrough"
    with pytest.raises(ConfigError, match=r"dataset\.n_sample=3 is not accepted.*Did you mean dataset\.n_samples"):
        load_samples({"name": "exp21_sanity", "n_sample": 3})  # callers that bypass settings.check


def test_a_plugin_loader_declares_its_options():
    @register_loader("rooted_test", options=("root",))
    def rooted(cfg):
        yield Sample(f"{cfg['root']}-1", "p", "q", "a")

    try:
        cfg = plain(compose([*BASE, "dataset.name=rooted_test", "+dataset.root=here"]))
        assert settings.check(cfg, loader_options=OPTIONS)["dataset"]["root"] == "here"
        assert [s.sample_id for s in load_samples(cfg["dataset"]).samples] == ["here-1"]
        with pytest.raises(ConfigError, match=r"dataset\.rot='here'.*Did you mean dataset\.root\?.*: root, name"):
            load_samples({**cfg["dataset"], "rot": "here"})
    finally:
        LOADERS.pop("rooted_test")
        OPTIONS.pop("rooted_test")


def test_a_loader_registered_later_is_checked_when_the_data_loads():
    # A plugin's loader is imported after the settings check: its keys are judged by load_samples, not refused
    # by the check as unknown.
    cfg = plain(compose([*BASE, "dataset.name=later_test", "+dataset.root=here"]))
    assert settings.check(cfg, loader_options=OPTIONS)["dataset"]["root"] == "here"


def test_condition_keys_without_a_selected_condition_are_refused():
    cfg = plain(compose([*BASE, "+condition.rope_fix=shift"]))
    with pytest.raises(ConfigError, match=r"condition\.rope_fix='shift' is not accepted: no condition is selected.*"
                                          r"conditions\.<name>\.<key>.*bare, full_oracle"):
        settings.check(cfg, condition_selected=False)
    assert settings.check(cfg)["condition"] == {"rope_fix": "shift"}  # not judged when the caller cannot say
    chosen = plain(compose([*BASE, "condition=truncated_oracle", "condition.rope_fix=shift"]))
    assert settings.check(chosen, condition_selected=True)["condition"]["rope_fix"] == "shift"


def test_a_conditions_unknown_key_is_refused_before_any_model_loads():
    from kvprime.pipeline.plan import prepare

    with pytest.raises(ConfigError, match=r"condition 'bare' has unknown key\(s\) \['rope_fx'\]"):
        prepare(compose([*BASE, "+conditions.bare.rope_fx=shift"]))


def test_every_shipped_config_passes():
    for experiment in confdir.names("experiment"):
        settings.check(plain(compose([*BASE, f"experiment={experiment}"])), condition_selected=False)
    for model in confdir.names("model"):
        cfg = plain(compose([*BASE, f"model={model}"]))
        cfg["model"]["device"] = "cpu"  # the GPU models say auto; this machine may have none
        settings.check(cfg, condition_selected=False)
    for dataset in confdir.names("dataset"):
        extra = ["dataset.path=x"] if "path" in confdir.load("dataset", dataset) else []
        settings.check(plain(compose([*BASE, f"dataset={dataset}", *extra])), loader_options=OPTIONS)
    base = plain(compose(BASE))
    for condition in confdir.names("condition"):  # as condition=<name> composes it, without composing 49 times
        chosen = OmegaConf.to_container(confdir.load("condition", condition), resolve=True)
        settings.check({**base, "condition": chosen}, condition_selected=True)


def _yaml_keys(group: str, section: str | None = None) -> set[str]:
    out = set()
    for path in (confdir.CONF_DIR / group).rglob("*.yaml"):
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        out |= set(doc.get(section) or {}) if section else set(doc) - {"defaults"}
    return out


def _keys_read(*modules: str) -> set[str]:
    """The keys the modules read from a model config: cfg.get("key"), cfg["key"], _setting(cfg, "key", ...)."""
    root = Path(settings.__file__).parents[1]
    text = "".join((root / m).read_text() for m in modules)
    found = set(re.findall(r"\bcfg(?:\.get\(|\[)\"([a-z_]+)\"", text))
    for args in re.findall(r"_setting\(cfg, ([^)]*)\)", text):
        found |= set(re.findall(r"\"([a-z_]+)\"", args))
    return found


def test_the_declared_keys_are_those_the_yaml_files_give_and_the_code_reads():
    assert _yaml_keys("model") <= set(composition.MODEL_KEYS)
    assert _keys_read("models/loading.py", "models/shape_random.py") <= set(composition.MODEL_KEYS)
    assert _yaml_keys("experiment", "experiment") <= set(composition.EXPERIMENT_KEYS)
    for name, options in OPTIONS.items():
        assert set(options).isdisjoint(composition.DATASET_KEYS), name
    assert _yaml_keys("dataset") <= set(composition.DATASET_KEYS) | {k for o in OPTIONS.values() for k in o}


def test_hydras_refusal_gets_a_paragraph_that_does_not_steer_to_plus():
    def paragraph(key, value):
        return composition.not_in_config(key, value, settings.declared(), OPTIONS)

    message = paragraph("dataset.n_sample", "3")
    assert message.startswith("dataset.n_sample=3 is not accepted") and "Did you mean dataset.n_samples?" in message
    assert "+dataset.n_sample=3 is refused too" in message
    assert "Did you mean seed?" in paragraph("sed", "1")
    assert "Did you mean experiment.baseline?" in paragraph("experiment.baselin", "bare")
    assert "Did you mean stats.alpha?" in paragraph("stats.alpah", "0.1")
    # where + is how a key kvprime reads is added, Hydra's hint stands
    assert paragraph("model.overrides.hidden_size", "512") is None  # the tiny model's config values
    assert paragraph("conditions.bare.mask_sink", "true") is None  # a builder's param
    assert paragraph("hydra.job.foo", "1") is None


@pytest.mark.integration
def test_the_cli_refuses_a_key_added_with_plus_in_one_paragraph(tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = cli.run(["run", *BASE, "+dataset.n_sample=3"],
                  env=env, cwd=tmp_path, timeout=600)
    message = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "kvprime: error: dataset.n_sample=3 is not accepted" in message
    assert "Did you mean dataset.n_samples?" in message and "plugin" in message
    runs = tmp_path / "outputs" / "exp21"
    assert not runs.exists() or not [p for p in runs.iterdir() if p.name != "latest"]  # no run was started


@pytest.mark.integration
@pytest.mark.parametrize("override, expected", [
    # Without "+": Hydra refuses it with a hint to add the key with "+", which kvprime would refuse in turn.
    ("dataset.n_sample=3", "dataset.n_sample=3 is not accepted: this config has no key dataset.n_sample"),
    # A condition.* key with no condition selected: nothing would read it.
    ("+condition.rope_fix=shift", "condition.rope_fix"),
])
def test_the_cli_names_the_key_instead_of_hydras_hint(tmp_path, override, expected):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = cli.run(["run", *BASE, override],
                  env=env, cwd=tmp_path, timeout=600)
    message = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert expected in message, message
    assert "To append to your config use" not in message
    runs = tmp_path / "outputs" / "exp21"
    assert not runs.exists() or not [p for p in runs.iterdir() if p.name != "latest"]
