"""The re-rotation's numerical floor, measured at load: below the per-dtype default for every RoPE variant
kvprime corrects (fp32 and bf16, tiny position-sensitive models), above it for a broken re-rotation, and a run
that records it in metadata.json or refuses, before any score, with one paragraph."""

import json
import os

import pytest
import torch
from fixtures import cli

from kvprime.builders import floor
from kvprime.builders.conditions import ConditionSpec
from kvprime.cache import hf_internals as hf
from kvprime.cache.tiny import (
    ROPE_VARIANTS,
    position_sensitive,
    tiny_model,
    tiny_tokenizer,
)
from kvprime.config.compose import compose
from kvprime.errors import ConfigError
from kvprime.pipeline import runner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SPECS = {"bare": ConditionSpec("bare"),
         "truncated_oracle": ConditionSpec("truncated_oracle", builder="truncate_prefix", rope_fix="rerotate",
                                           surrogate="query", prefix_template="{surrogate} "),
         "truncated_shift": ConditionSpec("truncated_shift", builder="truncate_prefix", rope_fix="shift",
                                          surrogate="query", prefix_template="{surrogate} ")}
# Re-rotations that are wrong in the ways a RoPE correction goes wrong.
_real_rotate = hf.rotate_keys
BROKEN = {
    "skipped": lambda keys, delta, inv_freq: keys,  # the uncorrected cache (the notebooks' C1)
    "wrong_sign": lambda keys, delta, inv_freq: _real_rotate(keys, -delta, inv_freq),
}


def _model(variant: str, dtype: str):
    tok = tiny_tokenizer()
    arch, overrides = ROPE_VARIANTS[variant]
    return position_sensitive(tiny_model(arch, seed=1, vocab_size=len(tok), **overrides)).to(DTYPES[dtype]), tok


def _measure(model, tok, **kw):
    return floor.measure_floor(model, tok, sink_ids=[tok.bos_token_id], **kw)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_floor_is_below_the_default_and_a_broken_rerotation_is_refused(variant, dtype, monkeypatch):
    model, tok = _model(variant, dtype)
    got = _measure(model, tok)
    limit = floor.DEFAULT_MAX_NLL_DIFF[dtype]
    assert got["measured"] and got["dtype"] == dtype and got["device"] == str(model.device)
    assert got["tolerance"] == limit and got["tolerance_source"] == f"auto:{dtype}"
    assert got["surrogate_lengths"] == list(floor.SURROGATE_LENGTHS) and not got["skipped_surrogate_lengths"]
    assert len(got["max_key_abs_diff_per_layer"]) == model.config.num_hidden_layers
    assert 0 < got["max_key_abs_diff"] == max(got["max_key_abs_diff_per_layer"])  # round-off, not identity
    assert got["max_nll_abs_diff"] < limit / 2 and got["within_tolerance"]
    assert got["uncorrected_nll_abs_diff"] > 2 * limit  # the probe does see a misplaced key
    json.dumps(got)  # it goes into metadata.json as it is
    floor.check(got, SPECS)

    for name, wrong in BROKEN.items():
        monkeypatch.setattr(hf, "rotate_keys", wrong)
        broken = _measure(model, tok)
        assert broken["max_nll_abs_diff"] > limit and not broken["within_tolerance"], name
        with pytest.raises(ConfigError) as err:
            floor.check(broken, SPECS)
        message = str(err.value)
        assert "\n" not in message and "rope_fix=shift" in message and "floor.max_nll_diff" in message
        assert "truncated_oracle" in message and "truncated_shift" not in message
        assert f"{broken['max_nll_abs_diff']:.2e}" in message


def test_float32_floor_is_far_below_an_off_by_one_rotation(monkeypatch):
    """In float32 even a one-position error stands well above the floor (in bfloat16 it is within noise)."""
    model, tok = _model("default", "float32")
    exact = _measure(model, tok)["max_nll_abs_diff"]
    monkeypatch.setattr(hf, "rotate_keys", lambda k, d, inv: _real_rotate(k, d + 1, inv))
    assert _measure(model, tok)["max_nll_abs_diff"] > 100 * max(exact, 1e-6)


def test_tolerance_comes_from_the_setting_or_the_dtype():
    assert floor.tolerance("auto", "float32") == (1e-3, "auto:float32")
    assert floor.tolerance("auto", "bfloat16") == (floor.DEFAULT_MAX_NLL_DIFF["bfloat16"], "auto:bfloat16")
    assert floor.tolerance(0.25, "float32") == (0.25, "floor.max_nll_diff")
    assert floor.tolerance("auto", "float8_e4m3fn")[1] == "auto:bfloat16"  # unlisted: the loosest default
    model, tok = _model("default", "float32")
    got = _measure(model, tok, max_nll_diff=1e-30)
    assert got["tolerance"] == 1e-30 and got["tolerance_source"] == "floor.max_nll_diff"


def test_measure_setting_and_conditions_decide():
    shift_only = {k: v for k, v in SPECS.items() if k != "truncated_oracle"}
    assert floor.wanted("auto", SPECS)[0] and "truncated_oracle" in floor.wanted("auto", SPECS)[1]
    assert not floor.wanted("auto", shift_only)[0]
    assert floor.wanted(True, shift_only) == (True, "floor.measure=true")
    assert floor.wanted(False, SPECS) == (False, "floor.measure=false")
    model, tok = _model("default", "float32")
    assert floor.for_run({"measure": "auto"}, shift_only, model, tok, sink_ids=[tok.bos_token_id]) == {
        "measured": False, "reason": floor.wanted("auto", shift_only)[1]}
    # Measured on request, but nothing re-rotates: recorded, never refused.
    got = floor.for_run({"measure": True, "max_nll_diff": 1e-30}, shift_only, model, tok,
                        sink_ids=[tok.bos_token_id])
    assert got["measured"] and not got["within_tolerance"]


def test_a_probe_wider_than_the_sliding_window_is_not_measured():
    tok = tiny_tokenizer()
    model = tiny_model("gemma3_text", seed=1, vocab_size=len(tok))  # window 64: the probe does not fit
    got = _measure(model, tok)
    assert not got["measured"] and "sliding window" in got["reason"]
    floor.check(got, SPECS)  # nothing measured, nothing refused
    assert floor.describe(got).startswith("numerical floor (float32, cpu): not measured")


# ---------------------------------------------------------------- the run


@pytest.fixture()
def samples_file(river_samples):
    return river_samples(3)


def _cli(tmp_path, *args):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return cli.run(["run", *args], env=env, cwd=tmp_path, timeout=300)


@pytest.mark.integration
def test_cli_run_records_the_floor_and_refuses_above_the_tolerance(tmp_path, samples_file):
    common = ["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}", "condition=truncated_oracle",
              "stats.n_boot=1000", "progress=false"]
    out = tmp_path / "ok"
    proc = _cli(tmp_path, *common, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())["numerical_floor"]
    assert meta["measured"] and meta["dtype"] == "float32" and meta["max_nll_abs_diff"] < meta["tolerance"] == 1e-3
    assert "numerical floor (float32, cpu): re-rotated vs exact keys" in proc.stdout + proc.stderr
    assert "timings_s" in json.loads((out / "metadata.json").read_text())

    # bfloat16: the tiny model's float32 floor can be exactly 0, which no tolerance > 0 refuses.
    refused = tmp_path / "refused"
    proc = _cli(tmp_path, *common, "model.dtype=bfloat16", "floor.max_nll_diff=1e-30", f"hydra.run.dir={refused}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("kvprime: error:") == 1
    paragraph = " ".join(proc.stderr.split("kvprime: error:", 1)[1].split())  # wrapped to the terminal's width
    assert paragraph.startswith("numerical floor: on this model (bfloat16, cpu)")
    assert "rope_fix=shift" in paragraph and "truncated_oracle" in paragraph and "floor.max_nll_diff" in paragraph
    assert not (refused / "scores.jsonl").exists() or not (refused / "scores.jsonl").read_text()


def test_run_without_measurement_records_why(tmp_path, samples_file):
    cfg = compose(["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}",
                   "condition=truncated_oracle", "stats.n_boot=1000", "progress=false", "floor.measure=false"])
    runner.run_experiment(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["numerical_floor"] == {"measured": False, "reason": "floor.measure=false"}
