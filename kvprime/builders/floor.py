"""The re-rotation's numerical floor of one loaded model, dtype and device, measured before a run scores.

``rope_fix=rerotate`` cuts the surrogate's S entries and rotates the document keys by -S; ``rope_fix=shift``
builds the same cache with no rotation at all (the document encoded at its final positions). In exact
arithmetic the two caches are equal, so whatever separates them is round-off: of the rotation itself, and of
the forward pass run at other RoPE angles. How large that is depends on the model, its dtype and the device's
kernels, so it is measured on the machine that scores, through the builders' own code paths, on a fixed probe
(a neutral paragraph, a question and an answer) with surrogates of a few token lengths.

A run that re-rotates refuses to score when the probe's NLL difference is above ``floor.max_nll_diff``:
past that, rerotate's numbers would carry an error that shift does not have. The floor also goes into the
run's metadata (``numerical_floor``), where the tie tolerance of the statistics reads it.
"""

from __future__ import annotations

import logging
import time

from ..cache.hf_internals import cache_layers, check_config_supports
from ..cache.scoring import score_batch
from ..cache.segments import Segments, tokenize
from ..errors import ConfigError
from . import BUILDERS
from .conditions import ConditionSpec
from .engine import Engine

log = logging.getLogger("kvprime")

# Written for this module: plain, neutral prose with no answer-bearing trick, long enough that the
# document's keys span many RoPE angles, short enough (about 50 tokens in a 50k-vocabulary BPE) to measure
# in well under a second on a laptop CPU.
PROBE_DOCUMENT = (
    "The village library opens at nine in the morning and closes at six in the evening. Its reading room "
    "has twelve long tables and a wall of maps. The building was a grain store until 1958, which is why its "
    "windows sit so high above the floor."
)
PROBE_QUESTION = "What was the library building used for before 1958?"
PROBE_ANSWER = "It was a grain store."
# The surrogate's first n tokens are cut out of the cache; any text long enough for the longest length works.
PROBE_SURROGATE = (
    "Which rooms does the library have, when is it open, who teaches chess there on Saturdays, what is read "
    "aloud each month, why are the windows high, how many tables are there, and what did the building hold "
    "long ago before it became a public library for the whole village and the farms around it?"
)
SURROGATE_LENGTHS = (4, 16, 48)

# floor.max_nll_diff=auto, in nats of mean answer NLL, per dtype of the loaded model. Measured on this probe
# (CPU): correct code gives ~2e-6 (SmolLM2-135M float32; tiny models <= 1e-5), 5e-3 (float16), 2-3e-2
# (bfloat16; tiny models <= 4e-2); a re-rotation by the wrong angle gives 0.45 (half the angle) to 1.5 (the
# wrong sign), skipping it (the broken C1 condition) 1.2. Each default sits well above its dtype's floor and
# well below those; an off-by-one rotation (3-5e-2) is caught in float32 only, being bfloat16 noise.
DEFAULT_MAX_NLL_DIFF = {"float32": 1e-3, "float64": 1e-3, "bfloat16": 1e-1, "float16": 5e-2}
_UNLISTED_DTYPE = "bfloat16"  # a dtype not listed gets the loosest default


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def tolerance(setting, dtype: str) -> tuple[float, str]:
    """(the NLL tolerance, where it came from) for ``floor.max_nll_diff`` and the model's dtype."""
    if setting in (None, "auto"):
        key = dtype if dtype in DEFAULT_MAX_NLL_DIFF else _UNLISTED_DTYPE
        return DEFAULT_MAX_NLL_DIFF[key], f"auto:{key}"
    return float(setting), "floor.max_nll_diff"


def rerotating(specs) -> list[str]:
    """The names of the conditions whose caches are re-rotated (``rope_fix=rerotate``)."""
    return [name for name, spec in specs.items() if spec.rope_fix == "rerotate"]


def wanted(measure, specs) -> tuple[bool, str]:
    """Whether ``floor.measure`` asks for a measurement for these conditions, and why (or why not)."""
    names = rerotating(specs)
    if measure is True:
        return True, "floor.measure=true"
    if measure is False:
        return False, "floor.measure=false"
    if names:
        return True, f"conditions re-rotate keys: {', '.join(names)}"
    return False, "no condition re-rotates keys (rope_fix=rerotate), so there is no re-rotation floor to measure"


def _max_abs(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def measure_floor(model, tokenizer, *, sink_ids, surrogate_lengths=SURROGATE_LENGTHS, max_nll_diff="auto",
                  max_context: int | None = None) -> dict:
    """Re-rotated vs exact (``shift``) truncated caches of the probe, per surrogate length: the largest key
    difference per layer, the value difference (zero: values carry no position) and the answer's NLL
    difference; also the uncorrected cache's (``rope_fix=none``) NLL difference, the size of a wrong
    re-rotation on this model. A JSON-able dict; ``measured`` is false (with ``reason``) when the model
    cannot re-rotate or the probe fits none of its windows."""
    t0 = time.perf_counter()
    dtype, device = dtype_name(model), str(next(model.parameters()).device)
    limit, source = tolerance(max_nll_diff, dtype)
    base = {"dtype": dtype, "device": device, "tolerance": limit, "tolerance_source": source}
    try:
        check_config_supports(model.config, "rerotate")
    except ConfigError as err:
        return {"measured": False, "reason": str(err), **base}

    engine = Engine(model, tokenizer, sink="none", max_context=max_context)
    defaults = ConditionSpec("floor_probe")
    doc = tuple(tokenize(tokenizer, defaults.document_template.format(document=PROBE_DOCUMENT)))
    prompt = tuple(tokenize(tokenizer, defaults.prompt_template.format(query=PROBE_QUESTION)))
    answer = tuple(tokenize(tokenizer, defaults.answer_template.format(answer=PROBE_ANSWER)))
    surrogate = tuple(tokenize(tokenizer, PROBE_SURROGATE))
    while len(surrogate) < max(surrogate_lengths):  # a tokenizer with very long tokens: repeat the text
        surrogate += surrogate
    specs = {fix: ConditionSpec(f"floor_probe_{fix}", builder="truncate_prefix", surrogate="query",
                                prefix_template="{surrogate}\n", rope_fix=fix) for fix in ("rerotate", "shift", "none")}
    roles = BUILDERS["truncate_prefix"].roles

    used, skipped, work = [], [], []
    for n in surrogate_lengths:
        seg = Segments(sink=tuple(sink_ids), prefix=surrogate[:n], document=doc, prompt=prompt,
                       answer=answer).with_roles(roles)
        if engine.fits(seg, specs["rerotate"]):
            used.append(n)
            work += [(spec, seg) for spec in specs.values()]
        else:
            skipped.append(n)
    if not used:
        return {"measured": False, **base,
                "reason": f"the probe ({len(doc)} document tokens plus surrogates of {list(surrogate_lengths)} "
                          "tokens) fits neither the model's context nor its sliding window"}
    # As a run does a chunk: the encodes as padded batches (of about two rows: their lengths differ by up to the
    # longest surrogate), the caches from the builder, the answers scored in one batch (every cache holds the
    # same sink and document, so nothing is padded). The floor so includes the batching's rounding, which the
    # run's numbers carry. The module-level scorer, not Engine.score_many: instrumenting a run's scoring (tests,
    # profilers) should not see the probe.
    longest = len(sink_ids) + max(used) + len(doc)
    engine.prefill([r for spec, seg in work for r in engine.plan(spec, seg)], batch_tokens=2 * longest)
    primed = [engine.build(spec, seg) for spec, seg in work]
    scores = score_batch(model, [(p, seg.prompt, seg.answer) for p, (_, seg) in zip(primed, work, strict=True)])
    done = list(zip(primed, scores, strict=True))
    per_length: dict[str, float] = {}
    key_per_layer: list[float] = []
    value_max = uncorrected = 0.0
    for i, n in enumerate(used):
        built = {fix: done[3 * i + j] for j, fix in enumerate(specs)}  # (PrimedCache, Score) per rope_fix
        pairs = list(zip(cache_layers(built["rerotate"][0].cache), cache_layers(built["shift"][0].cache), strict=True))
        diffs = [_max_abs(kr, ks) for (kr, _), (ks, _) in pairs]
        key_per_layer = [max(a, b) for a, b in zip(key_per_layer, diffs, strict=True)] if key_per_layer else diffs
        value_max = max([value_max] + [_max_abs(vr, vs) for (_, vr), (_, vs) in pairs])
        nll = {fix: score.nll for fix, (_, score) in built.items()}
        per_length[str(n)] = abs(nll["rerotate"] - nll["shift"])
        uncorrected = max(uncorrected, abs(nll["none"] - nll["shift"]))
    max_nll = max(per_length.values())
    return {
        "measured": True, **base,
        "model_type": getattr(model.config.get_text_config(decoder=True), "model_type", None),
        "surrogate_lengths": used, "skipped_surrogate_lengths": skipped,
        "document_tokens": len(doc), "answer_tokens": len(answer),
        "max_key_abs_diff": max(key_per_layer), "max_key_abs_diff_per_layer": key_per_layer,
        "max_value_abs_diff": value_max,
        "max_nll_abs_diff": max_nll, "nll_abs_diff_per_length": per_length,
        "uncorrected_nll_abs_diff": uncorrected,
        "within_tolerance": max_nll <= limit,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def describe(floor: dict) -> str:
    """The floor as one terminal line."""
    where = f"({floor.get('dtype')}, {floor.get('device')})"
    if not floor.get("measured"):
        return f"numerical floor {where}: not measured: {floor.get('reason')}"
    return (f"numerical floor {where}: re-rotated vs exact keys max |diff| {floor['max_key_abs_diff']:.1e}, "
            f"NLL |diff| {floor['max_nll_abs_diff']:.1e} (tolerance {floor['tolerance']:.0e}; uncorrected "
            f"truncation {floor['uncorrected_nll_abs_diff']:.1e}; {floor['seconds']:.2f} s)")


def check(floor: dict, specs) -> None:
    """Refuse, before any score, a run whose re-rotating conditions would carry more than the tolerance."""
    names = rerotating(specs)
    if not floor.get("measured") or not names or floor["max_nll_abs_diff"] <= floor["tolerance"]:
        return
    setting = ("floor.max_nll_diff=auto, the default for " + floor["tolerance_source"].split(":", 1)[1]
               if floor["tolerance_source"].startswith("auto:") else "floor.max_nll_diff")
    raise ConfigError(
        f"numerical floor: on this model ({floor['dtype']}, {floor['device']}) a re-rotated cache scores the "
        f"probe answer {floor['max_nll_abs_diff']:.2e} nats away from the exact rope_fix=shift cache, above the "
        f"tolerance {floor['tolerance']:g} ({setting}); the conditions that re-rotate ({', '.join(names)}) "
        f"would carry that error in every score. Use rope_fix=shift, which is exact, for them (e.g. "
        f"conditions.{names[0]}.rope_fix=shift), or raise floor.max_nll_diff if a difference of this size is "
        "acceptable for your comparisons."
    )


def for_run(floor_cfg, specs, model, tokenizer, *, sink_ids, max_context: int | None = None) -> dict:
    """What a run does before scoring: measure when ``floor.measure`` asks for it, log one line, refuse above
    the tolerance (``check``). Returns the dict for ``metadata["numerical_floor"]``."""
    floor_cfg = floor_cfg or {}
    measure, reason = wanted(floor_cfg.get("measure", "auto"), specs)
    if not measure:
        return {"measured": False, "reason": reason}
    floor = measure_floor(model, tokenizer, sink_ids=sink_ids, max_nll_diff=floor_cfg.get("max_nll_diff", "auto"),
                          max_context=max_context)
    log.info(describe(floor))
    check(floor, specs)
    return floor
