"""kvprime.config.settings: every setting's range is declared once, checked before any model loads, and each bad
value is answered with one paragraph naming the setting, the value and what is accepted."""

import copy
import json
import math
import subprocess
import sys

import pytest

from kvprime.cache import batching
from kvprime.config import settings
from kvprime.config.compose import compose
from kvprime.data import OPTIONS
from kvprime.errors import ConfigError
from kvprime.pipeline.plan import plain


@pytest.fixture(scope="module")
def base():
    """A composed, valid run config (tiny model, the one-sample sanity dataset)."""
    return plain(compose(["model=tiny_random_llama", "dataset=exp21_sanity", "progress=false"]))


def with_value(cfg, key, value):
    out = copy.deepcopy(cfg)
    *path, name = key.split(".")
    holder = out
    for part in path:
        holder = holder.setdefault(part, {})
    holder[name] = value
    return out


# Every setting: values outside its range, then good values on or next to its boundaries.
BAD = {
    "seed": ["abc", -1, 1.5, True, None, "42"],
    "resume": ["yes", 1, None],
    "save_tokens": ["true", 0],
    "per_token": [1, "no"],
    "on_too_long": ["ignore", None, True],
    "progress": ["on", 1.0],
    "plugins": ["my_builders", [""], [3], None],
    "metrics": ["answer", ["answer"], ["nll", "bleu"], ["nll", "nll"], [], None, "nll"],
    "answer.max_new_tokens": [0, -1, 1.5, "32", True, None],
    "stats.n_boot": [0, -5, settings.MIN_N_BOOT - 1, 10000.0, "10000", True, None],
    "stats.alpha": [2, 0, 1, 0.0, 1.0, -0.05, math.nan, math.inf, "0.05", True, None],
    "stats.confidence": [0, 1, 1.5, -0.95, math.nan, "0.95", False],
    "stats.equivalence_margin": [0, -0.02, math.inf, "0.02", True, None],
    "stats.tie_tolerance": [-1e-4, "AUTO", math.nan, "1e-4", True, None],
    "stats.power": [0, 1, 80, "0.8", None],
    "tracking.backend": ["wandb", "MLflow", None, True], "tracking.tracking_uri": ["", "  ", 5, True],
    "tracking.experiment_name": ["", 3, False],
    "generation.model": ["", "../escape", "a b", 3, True],
    "floor.measure": ["yes", 1, None],
    "floor.max_nll_diff": [0, -1e-3, "1e-3", math.inf, True],
    "generation.temperature": [-1, -1e-9, math.inf, math.nan, "0.3", True, None],
    "generation.max_new_tokens": [0, -1, 1.5, "45", True, None],
    "generation.seed": [-1, "abc", 2.0, True],
    "generation.batch_size": [0, -2, 1.5, "lots", "AUTO", True],
    "generation.clean": ["smart", None, ""],
    "generation.store": ["", "   ", 5, True],
    "batch.samples": [0, -1, 1.5, "lots", True],
    "batch.encode_tokens": [0, "2048", 2048.0, False],
    "batch.score_tokens": [0, -4096, 1.5, "big"],
    "batch.extend_prefixes": ["yes", 1, None],
    "generation.shared_prefix": ["yes", 0, None],
    "run.num_shards": [0, -1, 1.5, "2", True, None],
    "run.shard": [-1, 0.0, "0", True, None],
    "dataset.n_samples": [0, -1, 2.5, "10", True],
    "dataset.seed": [-1, "abc", 1.5, True],
    "dataset.group_by_passage": ["yes", 1, None],
    "model.device": ["tpu", "gpu", "CPU", "cuda:x", "cuda:-1", "cuda:99999", "cpu:0", "", 0, None],
    "model.dtype": ["float64", "fp16", "", None],
    "model.sink": ["eos", "BOS", None],
    "multidoc.k": [0, -1, 2.5, "3", True, None],
    "multidoc.distractors": ["bm25", "Random", None, 3],
    "multidoc.gold_slot": ["centre", 1, None],
}
GOOD = {
    "seed": [0, 1, 2**40],
    "resume": [True, False],
    "save_tokens": [True, False],
    "per_token": [True, False],
    "on_too_long": ["skip", "error"],
    "progress": [True, False],
    "plugins": [[], ["my_builders", "~/study/extra.py"]],
    "metrics": [["nll"], ["nll", "answer"], ["answer", "nll"]],
    "answer.max_new_tokens": [1, 32],
    "stats.n_boot": [settings.MIN_N_BOOT, 10000],
    "stats.alpha": [1e-12, 0.05, 1 - 1e-12],
    "stats.confidence": [1e-12, 0.95, 1 - 1e-12],
    "stats.equivalence_margin": [1e-6, 0.02, 1],
    "stats.tie_tolerance": ["auto", 0, 1e-4],
    "stats.power": [0.5, 0.8, 0.95],
    "tracking.backend": ["none", "mlflow"],
    "tracking.tracking_uri": [None, "sqlite:////tmp/mlflow.db", "http://localhost:5000"],
    "tracking.experiment_name": [None, "exp21"],
    "generation.model": [None, "qwen25_coder_05b_instruct"],
    "floor.measure": ["auto", True, False],
    "floor.max_nll_diff": ["auto", 1e-3, 1],
    "generation.temperature": [0, 0.0, 0.3, 2],
    "generation.max_new_tokens": [1, 45],
    "generation.seed": [0, 7],
    "generation.batch_size": [1, "auto", None],
    "generation.clean": list(settings.CLEAN_MODES),
    "generation.store": [None, "/tmp/kvprime-store"],
    "batch.samples": [1, "auto", None],
    "batch.encode_tokens": [1, "auto"],
    "batch.score_tokens": [1, "auto"],
    "batch.extend_prefixes": [True, False],
    "generation.shared_prefix": [True, False],
    "run.num_shards": [1, 5],
    "run.shard": [0],
    "dataset.n_samples": [1, None],
    "dataset.seed": [0, None],
    "dataset.group_by_passage": [True, False],
    "model.device": ["auto", "cpu"],
    "model.dtype": list(settings.DTYPES),
    "model.sink": list(settings.SINKS),
    "multidoc.k": [1, 3, 5],
    "multidoc.distractors": list(settings.DISTRACTOR_SOURCES),
    "multidoc.gold_slot": list(settings.GOLD_SLOTS),
}


def test_every_declared_setting_has_bad_and_good_cases():
    assert set(BAD) == set(settings.SPECS) == set(GOOD)


@pytest.mark.parametrize("key, value", [(k, v) for k, vs in BAD.items() for v in vs],
                         ids=lambda x: repr(x) if not isinstance(x, str) else x)
def test_bad_value_is_refused_with_the_setting_and_the_value(base, key, value):
    with pytest.raises(ConfigError) as info:
        settings.check(with_value(base, key, value))
    message = str(info.value)
    assert f"{key}={settings.show(value)}" in message
    assert len(message.splitlines()) == 1  # one paragraph: no other setting was blamed


@pytest.mark.parametrize("key, value", [(k, v) for k, vs in GOOD.items() for v in vs],
                         ids=lambda x: repr(x) if not isinstance(x, str) else x)
def test_good_value_passes_unchanged(base, key, value):
    cfg = with_value(base, key, value)
    if key == "run.shard":
        cfg["run"]["num_shards"] = 1
    out = settings.check(cfg)
    section, _, name = key.rpartition(".")
    got = (out[section] if section else out)[name]
    assert got == value or (got is value is None)
    assert type(got) is type(value)  # never converted (an int temperature stays an int)


def test_the_messages_say_what_is_accepted(base):
    cases = {
        ("stats.alpha", 2): "stats.alpha=2 is not accepted: stats.alpha is the significance level",
        ("stats.n_boot", 0): f"an integer >= {settings.MIN_N_BOOT}",
        ("seed", "abc"): "seed='abc' is not accepted",
        ("dataset.n_samples", 0): "dataset.n_samples=0 selects no sample; give a positive integer, or null for all.",
        ("generation.temperature", -1): "a number >= 0",
        ("on_too_long", "ignore"): "Accepted: skip | error (default: skip)",
        ("batch.samples", 0): f"or auto: {batching.DEFAULTS['cpu']['samples']} on cpu",
    }
    for (key, value), text in cases.items():
        with pytest.raises(ConfigError) as info:
            settings.check(with_value(base, key, value))
        assert text in str(info.value), (key, value, str(info.value))


def test_device_message_lists_this_machines_devices(base):
    import torch

    have = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    with pytest.raises(ConfigError, match="this machine has: " + ", ".join(have) + r" \(default: auto\)"):
        settings.check(with_value(base, "model.device", "tpu"))
    if torch.cuda.is_available():
        assert settings.check(with_value(base, "model.device", "cuda:0"))["model"]["device"] == "cuda:0"
        assert settings.check(with_value(base, "model.device", "cuda"))["model"]["device"] == "cuda"
    else:
        with pytest.raises(ConfigError, match="this machine has: cpu"):
            settings.check(with_value(base, "model.device", "cuda"))


def test_shard_must_be_below_num_shards(base):
    cfg = with_value(with_value(base, "run.num_shards", 3), "run.shard", 3)
    with pytest.raises(ConfigError, match=r"run\.shard=3 is not a shard of run\.num_shards=3.*from 0 to 2"):
        settings.check(cfg)
    assert settings.check(with_value(cfg, "run.shard", 2))["run"] == {"num_shards": 3, "shard": 2}


def test_a_misspelt_key_in_a_declared_section_is_named(base):
    with pytest.raises(ConfigError, match=r"stats\.alpah=0\.01 is not accepted.*Did you mean stats\.alpha\? "
                                          r"Accepted in stats: alpha, n_boot, confidence"):
        settings.check(with_value(base, "stats.alpah", 0.01))
    with pytest.raises(ConfigError, match=r"stats=0\.05 is not accepted: stats is a group of settings"):
        settings.check({**base, "stats": 0.05})


def test_seed_override_reaches_its_followers_but_is_reported_once(base):
    # seed=abc on the command line is refused while composing (the schema types seed as an integer); a config.json
    # holding it, and its followers' copies (${seed}), is refused once, naming seed.
    with pytest.raises(ConfigError) as info:
        compose(["model=tiny_random_llama", "dataset=exp21_sanity", "seed=abc"])
    assert str(info.value) == settings.paragraph("seed", "abc")
    cfg = with_value(with_value(with_value(base, "seed", "abc"), "dataset.seed", "abc"), "generation.seed", "abc")
    with pytest.raises(ConfigError) as info:
        settings.check(cfg)
    assert str(info.value).count("'abc'") == 1 and str(info.value).startswith("seed='abc'")


def test_every_bad_value_gets_its_own_paragraph(base):
    cfg = with_value(with_value(with_value(base, "stats.alpha", 2), "stats.n_boot", 0), "model.sink", "eos")
    with pytest.raises(ConfigError) as info:
        settings.check(cfg, origin="somewhere/config.json")
    lines = str(info.value).splitlines()
    assert lines[0] == "3 settings are not accepted (in somewhere/config.json):"
    assert [ln.split("=")[0] for ln in lines[1:]] == ["stats.n_boot", "stats.alpha", "model.sink"]


def test_missing_settings_get_the_declared_defaults_and_the_input_is_not_changed():
    cfg = {"seed": 7, "experiment": {"name": "x"}, "stats": {"alpha": 0.01}, "generation": {"temperature": 0}}
    before = copy.deepcopy(cfg)
    out = settings.check(cfg)
    assert cfg == before
    assert out["experiment"] == {"name": "x"}  # keys the schema does not declare are kept as they are
    assert out["stats"] == {"n_boot": 10000, "alpha": 0.01, "confidence": 0.95, "equivalence_margin": 0.02,
                            "tie_tolerance": "auto", "power": 0.8}
    assert out["floor"] == {"measure": "auto", "max_nll_diff": "auto"} and out["generation"]["model"] is None
    assert out["generation"]["temperature"] == 0 and out["generation"]["max_new_tokens"] == 45
    assert out["generation"]["seed"] == out["dataset"]["seed"] == 7  # they follow seed, as ${seed} does
    assert out["batch"] == {"samples": "auto", "encode_tokens": "auto", "score_tokens": "auto",
                            "extend_prefixes": False}
    assert out["run"] == {"num_shards": 1, "shard": 0} and out["dataset"]["n_samples"] is None
    assert out["model"] == {"device": "auto", "dtype": "float32", "sink": "bos"}
    assert settings.defaults()["seed"] == 42 and settings.defaults()["generation"]["seed"] == 42


def test_only_checks_and_fills_the_named_settings():
    cfg = {"seed": 3, "model": {"device": "tpu"}, "stats": {}}
    out = settings.check(cfg, only=("seed", "stats"))
    assert out["stats"]["n_boot"] == 10000 and out["model"] == {"device": "tpu"} and "generation" not in out
    with pytest.raises(ConfigError, match="stats.alpha=2"):
        settings.check({**cfg, "stats": {"alpha": 2}}, only=("seed", "stats"))


def test_every_shipped_model_and_dataset_passes(base):
    from kvprime.config import confdir

    for model in confdir.names("model"):
        cfg = plain(compose([f"model={model}", "dataset=exp21_sanity"]))
        cfg["model"]["device"] = "cpu"  # the GPU models say auto; this machine may have none
        assert settings.check(cfg)["model"]["dtype"] in settings.DTYPES
    for dataset in confdir.names("dataset"):
        reads_path = "path" in confdir.load("dataset", dataset)  # jsonl's path is ??? (must be set)
        cfg = plain(compose([f"dataset={dataset}", *(["dataset.path=x"] if reads_path else [])]))
        assert settings.check(cfg, loader_options=OPTIONS)["dataset"]["seed"] == 42


def test_describe_lists_every_setting_with_default_and_accepted_values():
    lines = settings.describe()
    assert len(lines) == len(settings.SPECS)
    by_key = {ln.split(" = ")[0]: ln for ln in lines}
    assert set(by_key) == set(settings.SPECS)
    assert by_key["stats.alpha"].startswith("stats.alpha = 0.05  (a number strictly between 0 and 1)")
    assert "the value of seed" in by_key["generation.seed"]
    assert "skip | error" in by_key["on_too_long"]


@pytest.mark.integration
def test_checking_a_good_config_imports_neither_torch_nor_transformers(base, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(base))
    code = ("import json, sys; from kvprime.config import settings; cfg = json.load(open(sys.argv[1])); "
            "settings.check(cfg); settings.describe(); cfg['stats']['alpha'] = 2\n"
            "try: settings.check(cfg)\nexcept settings.ConfigError: pass\nelse: raise SystemExit('not refused')\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_batching_and_data_use_the_declared_rule_and_paragraph():
    from kvprime.data import load_samples

    with pytest.raises(batching.BatchSettingError) as info:
        batching.resolve({"batch": {"samples": 0}}, device="cpu")
    assert str(info.value) == settings.paragraph("batch.samples", 0)
    with pytest.raises(ConfigError) as info:
        load_samples({"name": "exp21_sanity", "n_samples": 0})
    assert str(info.value) == "dataset.n_samples=0 selects no sample; give a positive integer, or null for all."
    with pytest.raises(ConfigError) as direct:
        settings.check({"dataset": {"n_samples": -3}})
    with pytest.raises(ConfigError) as via_data:
        load_samples({"name": "exp21_sanity", "n_samples": -3})
    assert str(direct.value) == str(via_data.value)
    assert len(load_samples({"name": "exp21_sanity", "n_samples": 1}).samples) == 1


# ------------------------------------------------------------------ through the public entry points

@pytest.mark.parametrize("override, key", [
    ("stats.alpha=2", "stats.alpha=2"),
    ("stats.n_boot=0", "stats.n_boot=0"),
    ("seed=abc", "seed='abc'"),
    ("dataset.n_samples=0", "dataset.n_samples=0"),
    ("generation.temperature=-1", "generation.temperature=-1"),
    ("model.device=tpu", "model.device='tpu'"),
])
def test_run_experiment_refuses_bad_settings_before_any_model_loads(override, key, tmp_path, monkeypatch):
    from kvprime.models import loading
    from kvprime.pipeline import runner

    def no_load(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(loading, "load", no_load)
    with pytest.raises(ConfigError) as info:  # composing refuses a value of the wrong type (seed=abc) itself
        runner.run_experiment(plain(compose(["model=tiny_random_llama", "dataset=exp21_sanity", "progress=false",
                                             override])), tmp_path / "r")
    assert str(info.value).startswith(key)  # the setting itself is named, not a later symptom of it
    assert not (tmp_path / "r" / "scores.jsonl").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from kvprime.pipeline import runner

    root = tmp_path_factory.mktemp("finished")
    data = root / "samples.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "passage": f"The river {i} flows into the sea near town {i}.",
                                        "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"}) + "\n"
                            for i in range(4)))
    cfg = plain(compose(["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}", "progress=false",
                         f"stats.n_boot={settings.MIN_N_BOOT}"]))
    runner.run_experiment(cfg, root / "run")
    return root / "run"


def test_report_fills_settings_an_older_config_json_lacks(finished_run, tmp_path):
    import shutil

    from kvprime.reporting.finalize import finalize

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["stats"]["confidence"], cfg["stats"]["alpha"]
    del cfg["generation"], cfg["run"], cfg["on_too_long"]
    cfg["model"]["device"] = "cuda:7"  # scored elsewhere: the report does not judge this machine's devices
    (old / "config.json").write_text(json.dumps(cfg))
    finalize(old)
    assert (old / "summary.csv").read_text() == (finished_run / "summary.csv").read_text()
    assert (old / "comparisons.csv").read_text() == (finished_run / "comparisons.csv").read_text()


def test_report_refuses_a_bad_stored_setting_and_names_the_file(finished_run, tmp_path):
    import shutil

    from kvprime.reporting.finalize import finalize

    bad = tmp_path / "bad"
    shutil.copytree(finished_run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["stats"]["alpha"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"stats\.alpha=2 is not accepted.*config\.json"):
        finalize(bad)


def test_stats_functions_default_to_the_schema_and_refuse_meaningless_arguments():
    import inspect

    from kvprime.analysis import stats
    from kvprime.analysis.exp01 import exp01_analyses

    for fn, names in ((stats.summarize, ("n_boot", "alpha", "confidence")),
                      (stats.paired_test, ("n_boot", "confidence")), (stats.verdict, ("alpha",)),
                      (exp01_analyses, ("n_boot", "confidence"))):
        for name in names:
            assert inspect.signature(fn).parameters[name].default == settings.default(f"stats.{name}"), (fn, name)
    with pytest.raises(ValueError, match="n_boot=0"):
        stats.paired_test([1.0, 2.0, 3.0], [0.5, 1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="confidence=1.5"):
        stats.paired_test([1.0, 2.0, 3.0], [0.5, 1.0, 2.0], n_boot=100, confidence=1.5)
    import pandas as pd

    scores = pd.DataFrame({"sample_id": ["a", "b", "a", "b"], "condition": ["x", "x", "y", "y"],
                           "nll": [1.0, 2.0, 0.5, 1.0]})
    with pytest.raises(ValueError, match="alpha=2"):
        stats.summarize(scores, baseline="x", n_boot=100, alpha=2)
