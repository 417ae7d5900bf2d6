"""Structured configs: the dataclasses of kvprime.config.schema, stored in Hydra's ConfigStore, are the one source of
every setting's type and default; conf/ repeats none of them; a value of the wrong type, refused by OmegaConf while
Hydra composes, is answered with kvprime's own paragraph (the one settings.check gives), on the command line too."""

from __future__ import annotations

import json
import os
from dataclasses import fields

import pytest
from fixtures import cli
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from kvprime.config import confdir, schema, settings
from kvprime.config.compose import compose, user_error
from kvprime.data import OPTIONS
from kvprime.errors import ConfigError

TINY = ["model=tiny_random_llama", "dataset=exp21_sanity"]
GROUPS = ("model", "dataset")  # their options (YAML files) set their own values for some declared keys


def _declared_defaults() -> dict:
    """Every setting's default as the dataclasses declare it, nested as in the config; a following key
    (generation.seed, dataset.seed: ``${seed}``) holds the default of the key it follows."""
    top, out = schema.Settings(), {}
    sections = {f.name: f.metadata["section"]() for f in fields(schema.Settings) if "section" in f.metadata}
    for f in fields(schema.Settings):
        if f.name not in sections:
            out[f.name] = getattr(top, f.name)
            continue
        out[f.name] = {g.name: getattr(sections[f.name], g.name) for g in fields(sections[f.name])}
        for g in fields(sections[f.name]):
            if g.metadata["follows"]:
                out[f.name][g.name] = getattr(top, g.metadata["follows"])
    return out


def _at(cfg, key: str):
    section, _, name = key.rpartition(".")
    return (cfg[section] if section else cfg)[name]


def _yaml(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(confdir.CONF_DIR / group / f"{name}.yaml"), resolve=False)


def test_the_config_store_holds_the_schema_that_config_yaml_names_first():
    schema.register()
    stored = ConfigStore.instance().load(f"{schema.SCHEMA_NAME}.yaml")
    assert OmegaConf.get_type(stored.node) is schema.Settings
    for section in ("stats", "generation", "answer", "floor", "batch", "run", "multidoc"):
        assert OmegaConf.get_type(stored.node[section]) is type(getattr(schema.Settings(), section))
    assert OmegaConf.load(confdir.CONF_DIR / "config.yaml").defaults[0] == schema.SCHEMA_NAME
    # the settings' check is the schema's: one key list, one rule per key
    assert list(settings.SPECS) == list(schema.SPECS) and settings.Stats is schema.Stats


def test_composing_with_no_overrides_gives_the_dataclass_defaults():
    expected, cfg = _declared_defaults(), compose([])
    for key, spec in schema.SPECS.items():
        if spec.section not in GROUPS:
            assert _at(cfg, key) == _at(expected, key), key
            assert type(_at(cfg, key)) is type(_at(expected, key)), key
    assert cfg["generation"]["seed"] == cfg["dataset"]["seed"] == cfg["seed"] == 42  # they follow seed


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_gets_the_declared_defaults_of_the_keys_it_does_not_set(group):
    expected = _declared_defaults()[group]
    for name in confdir.names(group):
        own = _yaml(group, name)
        cfg = compose([f"{group}={name}", *(["dataset.path=x"] if own.get("path") == "???" else [])])
        checked = settings.check(cfg, only=(group,))[group]
        for key, default in expected.items():
            given = own.get(key, default)
            assert checked[key] == (cfg["seed"] if given == "${seed}" else given), (name, key)


def test_config_yaml_repeats_no_default():
    top = OmegaConf.to_container(OmegaConf.load(confdir.CONF_DIR / "config.yaml"), resolve=False)
    assert set(top) == {"defaults", "hydra"}  # every run-level setting's default is the schema's


def test_the_composed_config_keeps_the_key_order_and_the_values_runs_record():
    """config.json is the composed config, checked: a run's file must read as before the schema for the same
    overrides (resume and merge compare it with older runs'; people diff it). So the schema's fields keep
    config.yaml's order, the group options' keys keep their YAML's order, and a number is recorded as given."""
    cfg = compose([*TINY, "generation.temperature=0", "stats.equivalence_margin=1"])
    assert list(cfg) == ["seed", "resume", "save_tokens", "per_token", "on_too_long", "progress", "metrics", "plugins",
                         "batch", "run", "multidoc", "generation", "answer", "floor", "stats", "tracking", "model",
                         "dataset", "conditions", "experiment"]
    assert list(cfg["generation"]) == ["temperature", "max_new_tokens", "seed", "batch_size", "clean",
                                       "shared_prefix", "store", "model"]
    assert list(cfg["stats"]) == ["n_boot", "alpha", "confidence", "equivalence_margin", "tie_tolerance", "power"]
    assert [list(cfg[s]) for s in ("batch", "run", "multidoc", "answer", "floor")] == [
        ["samples", "encode_tokens", "score_tokens", "extend_prefixes"], ["num_shards", "shard"],
        ["k", "distractors", "gold_slot"], ["max_new_tokens"], ["measure", "max_nll_diff"]]
    for group, name in (("model", "tiny_random_llama"), ("dataset", "exp21_sanity")):
        assert list(cfg[group]) == list(_yaml(group, name)), group
    checked = settings.check(cfg, loader_options=OPTIONS, condition_selected=False)
    assert json.dumps(checked) == json.dumps(cfg)  # nothing to fill, nothing moved
    assert type(cfg["generation"]["temperature"]) is int and type(cfg["stats"]["equivalence_margin"]) is int


def test_settings_check_fills_a_plain_dict_with_the_dataclass_defaults():
    expected, filled = _declared_defaults(), settings.defaults()
    for key in schema.SPECS:
        assert _at(filled, key) == _at(expected, key), key
    with pytest.raises(ConfigError, match=r"stats\.alpah=0\.1 is not accepted.*Did you mean stats\.alpha\?"):
        settings.check({"stats": {"alpah": 0.1}})  # a key the dataclass lacks is refused in a plain dict too


# (override, the setting, the value OmegaConf refuses) for fields typed int, float, bool, list and a section
TYPED = [
    ("seed=abc", "seed", "abc"),
    ("seed=1.5", "seed", 1.5),
    ("stats.alpha=abc", "stats.alpha", "abc"),
    ("stats.n_boot=true", "stats.n_boot", True),
    ("run.shard=[0]", "run.shard", [0]),
    ("resume=maybe", "resume", "maybe"),
    ("metrics=answer", "metrics", "answer"),
    ("stats.confidence=high", "stats.confidence", "high"),
    ("answer.max_new_tokens=1.5", "answer.max_new_tokens", 1.5),
    ("generation.seed=abc", "generation.seed", "abc"),
]


@pytest.mark.parametrize("override, key, value", TYPED, ids=[t[0] for t in TYPED])
def test_a_value_of_the_wrong_type_gets_the_settings_paragraph_while_composing(override, key, value):
    with pytest.raises(ConfigError) as info:
        compose([*TINY, override])
    assert str(info.value) == settings.paragraph(key, value)
    assert str(info.value).startswith(f"{key}={settings.show(value)} is not accepted")


def test_a_typed_field_takes_what_omegaconf_converts_and_a_name_is_never_made_from_another_value():
    # bool, int and float fields hold what OmegaConf converts to their type without changing its meaning
    cfg = compose([*TINY, "resume=1", "progress=yes", "seed='7'", "stats.alpha='0.1'"])
    assert (cfg["resume"], cfg["progress"], cfg["seed"], cfg["dataset"]["seed"], cfg["stats"]["alpha"]) == \
        (True, True, 7, 7, 0.1)
    # a directory, a model config or a module is never made from a bool or a number: those fields are typed Any
    for override, key, value in (("generation.store=true", "generation.store", True),
                                 ("generation.model=3", "generation.model", 3), ("plugins=[3]", "plugins", [3])):
        with pytest.raises(ConfigError) as info:
            settings.check(compose([*TINY, override]))
        assert str(info.value) == settings.paragraph(key, value)


def test_a_value_for_a_whole_section_gets_the_same_paragraph_as_the_check():
    with pytest.raises(ConfigError) as composed:
        compose([*TINY, "stats=0.05"])
    with pytest.raises(ConfigError) as checked:
        settings.check({"stats": 0.05})
    assert str(composed.value) == str(checked.value)
    assert str(composed.value).startswith("stats=0.05 is not accepted: stats is a group of settings")


def test_a_config_file_with_a_wrong_type_or_an_unknown_key_is_named(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "bad_alpha.yaml").write_text("# @package _global_\ndefaults:\n  - exp21\n"
                                                           "stats:\n  alpha: abc\n")
    (tmp_path / "experiment" / "bad_key.yaml").write_text("# @package _global_\ndefaults:\n  - exp21\n"
                                                         "generation:\n  temprature: 0\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    with pytest.raises(ConfigError) as info:
        compose([*TINY, search, "experiment=bad_alpha"])
    assert str(info.value) == settings.paragraph("stats.alpha", "abc") + " It was set in the config " \
                                                                         "'experiment/bad_alpha'."
    with pytest.raises(ConfigError) as info:
        compose([*TINY, search, "experiment=bad_key"])
    message = str(info.value)
    assert message.startswith("generation.temprature (set in the config 'experiment/bad_key') is not accepted")
    assert "Did you mean generation.temperature?" in message and "\n" not in message


def test_other_composition_errors_keep_hydras_message():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        compose([*TINY, "experiment=no_such_experiment"])
    assert user_error(ValueError("not Hydra's")) is None


def test_the_typed_fields_accept_what_the_shipped_configs_give():
    for experiment in confdir.names("experiment"):
        cfg = compose([*TINY, f"experiment={experiment}"])
        settings.check(cfg, condition_selected=False)
    assert compose([*TINY, "generation.temperature=0", "stats.alpha=0.1"])["stats"]["alpha"] == 0.1


# ------------------------------------------------------------------------------------ through the command line

def _kvprime(args, tmp_path, timeout=600):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return cli.run(["run", *args], env=env, cwd=tmp_path, timeout=timeout)


@pytest.mark.integration
@pytest.mark.parametrize("args, key, value", [
    (["stats.alpha=abc"], "stats.alpha", "abc"),
    (["seed=abc"], "seed", "abc"),
    (["-m", "seed=1,abc"], "seed", "abc"),  # a sweep's bad job is refused before any job runs
])
def test_the_cli_refuses_a_value_of_the_wrong_type_in_kvprimes_paragraph(tmp_path, args, key, value):
    out = _kvprime([*args, *TINY], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert " ".join(out.stderr.split()) == "kvprime: error: " + " ".join(settings.paragraph(key, value).split())
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("config.json"))


@pytest.mark.integration
def test_cfg_job_shows_every_setting_with_its_default(tmp_path):
    out = _kvprime(["--cfg", "job", *TINY], tmp_path)
    assert out.returncode == 0, out.stderr
    shown = OmegaConf.to_container(OmegaConf.create(out.stdout), resolve=True)
    expected = _declared_defaults()
    for key, spec in schema.SPECS.items():
        if spec.section != "model":  # the tiny model's own device is cpu
            assert _at(shown, key) == _at(expected, key), key
    assert shown["model"]["device"] == "cpu" and shown["model"]["sink"] == expected["model"]["sink"]


@pytest.mark.integration
def test_a_sweep_composes_each_job(tmp_path):
    sweep = tmp_path / "sweep"
    out = _kvprime(["-m", "seed=1,2", *TINY, "progress=false", f"stats.n_boot={schema.MIN_N_BOOT}",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for job, seed in (("0", 1), ("1", 2)):
        cfg = json.loads((sweep / job / "config.json").read_text())
        assert cfg["seed"] == cfg["dataset"]["seed"] == cfg["generation"]["seed"] == seed
        assert cfg["stats"]["alpha"] == schema.Stats().alpha
