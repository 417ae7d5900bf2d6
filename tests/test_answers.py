"""Greedy answer decoding from primed caches: equal to model.generate on a full cache, batched equal to one at a
time, masks and positions honoured as the scorer honours them, and the primed caches left untouched."""

import pytest
import torch

from kvprime.builders import PrimedCache
from kvprime.builders.engine import Engine
from kvprime.cache import answers
from kvprime.cache import hf_internals as hf
from kvprime.cache.segments import tokenize
from kvprime.cache.tiny import position_sensitive, tiny_model

DOC = "The river flows through the city and into the sea. Normans gave their name to Normandy, a region in France."
PROMPT = "\n\nQuestion: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def engine(tiny_tok):
    # Sharp attention and logits: greedy choices are then far from ties, so float rounding cannot flip them.
    return Engine(position_sensitive(tiny_model("llama", seed=3, vocab_size=len(tiny_tok))), tiny_tok)


def _eos(model) -> frozenset:
    eos = model.generation_config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos or [])


def _generate(engine, ids, n):
    """model.generate's greedy tokens, without the end token it stops at (decoding does not keep it)."""
    out = engine.model.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[:-1] if tokens and tokens[-1] in _eos(engine.model) else tokens


def test_full_cache_decoding_equals_model_generate(engine, tiny_tok):
    primed, _ = engine.prime(DOC)
    prompt = tokenize(tiny_tok, PROMPT)
    reference = _generate(engine, primed.token_ids + prompt, 12)
    [free] = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=12, end=_eos(engine.model))
    assert list(free.token_ids) == reference and free.stop == "max_new_tokens"
    # The stopping rules cut the same sequence where they should: a newline token is kept (its text may end the
    # answer), an end token is not.
    [line] = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=12,
                                  newline=frozenset({reference[4]}))
    k = reference.index(reference[4])
    assert list(line.token_ids) == reference[:k + 1] and line.stop == "newline"
    [end] = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=12, end=frozenset({reference[2]}))
    j = reference.index(reference[2])
    assert list(end.token_ids) == reference[:j] and end.stop == "eos"


def test_newlines_before_any_text_do_not_end_the_answer(engine, tiny_tok):
    primed, _ = engine.prime(DOC)
    prompt = tokenize(tiny_tok, PROMPT)
    reference = _generate(engine, primed.token_ids + prompt, 12)
    first, later = reference[0], next(t for t in reference[3:] if t != reference[0])

    def text_of(ids):  # the first token reads as a bare line break, the later one as text then a line break
        return "".join("\n" if t == first else "x\n" if t == later else "x" for t in ids)

    [d] = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=12,
                               newline=frozenset({first, later}), text_of=text_of)
    k = next(i for i, t in enumerate(reference) if t in (first, later) and "\n" in text_of(reference[:i + 1]).lstrip())
    assert k > 0 and list(d.token_ids) == reference[:k + 1] and d.stop == "newline"
    ids = tokenize(tiny_tok, "\n\n Paris.\nThe capital")
    assert answers.answer_text(tiny_tok, ids) == "Paris."


def _caches(engine, tiny_tok):
    """Caches of every kind a run builds: bare, full with the surrogate kept, truncated and re-rotated, shifted,
    offset, and one with masked entries; each with its own prompt length."""
    q = "What is the capital of France?"
    items = [
        engine.prime(DOC)[0],
        engine.prime(DOC, surrogate=q, builder="full")[0],
        engine.prime(DOC, surrogate=q)[0],  # truncate_prefix + rerotate
        engine.prime(DOC, surrogate=q, builder="truncate_prefix", rope_fix="shift")[0],
        engine.prime(DOC[:40], position_offset=7)[0],
        engine.prime(DOC, surrogate=q, builder="truncate_suffix")[0],
    ]
    masked = engine.prime(DOC, surrogate=q, builder="full")[0]
    attend = [True] * len(masked)
    attend[1:6] = [False] * 5
    items.append(PrimedCache(masked.cache, masked.token_ids, masked.position_ids, masked.next_position,
                             masked.kept_segments, masked.encoded_tokens, attend=attend))
    prompts = [PROMPT, "\nAnswer:", PROMPT, "\n\nQuestion: Where does the river flow?\nAnswer:", PROMPT,
               "\nAnswer:", PROMPT]
    return [(p, tokenize(tiny_tok, t)) for p, t in zip(items, prompts, strict=True)]


def test_batched_decoding_equals_one_at_a_time(engine, tiny_tok):
    items = _caches(engine, tiny_tok)
    newline, end = answers.stop_rules(engine.model, tiny_tok)
    alone = [answers.decode_batch(engine.model, [it], max_new_tokens=10, newline=newline, end=end)[0]
             for it in items]
    together = answers.decode_batch(engine.model, items, max_new_tokens=10, newline=newline, end=end)
    assert together == alone
    assert len({d.token_ids for d in alone}) > 1  # the rows differ: the batch did not just repeat one row
    # decode_many sorts and groups by cache length (here three batches), and returns input order.
    many = answers.decode_many(engine.model, tiny_tok, items, max_new_tokens=10, batch_tokens=3 * 40)
    assert [d.token_ids for d in many] == [d.token_ids for d in alone]
    assert [d.text for d in many] == [answers.answer_text(tiny_tok, d.token_ids) for d in alone]


def test_masked_entries_are_read_as_absent(engine, tiny_tok):
    """A cache whose entries 1..5 are marked not to be attended decodes as the same cache with them removed
    (every other key keeps its position): the attend mask is honoured as scoring honours it."""
    primed, _ = engine.prime(DOC, surrogate="What is the capital of France?", builder="full")
    prompt = tokenize(tiny_tok, PROMPT)
    attend = [True] * len(primed)
    attend[1:6] = [False] * 5
    masked = PrimedCache(primed.cache, primed.token_ids, primed.position_ids, primed.next_position,
                         primed.kept_segments, primed.encoded_tokens, attend=attend)
    cut = hf.assemble(engine.model, [(primed.cache, 0, 1, 0), (primed.cache, 6, len(primed), 0)])
    keep = [i for i, a in enumerate(attend) if a]
    removed = PrimedCache(cut, [primed.token_ids[i] for i in keep], [primed.position_ids[i] for i in keep],
                          primed.next_position, primed.kept_segments, primed.encoded_tokens)
    a = answers.decode_batch(engine.model, [(masked, prompt)], max_new_tokens=10)
    b = answers.decode_batch(engine.model, [(removed, prompt)], max_new_tokens=10)
    c = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=10)
    assert a == b
    assert a != c  # the masked entries matter to this model: the identity above is not vacuous


def test_decoding_leaves_the_primed_caches_untouched(engine, tiny_tok):
    items = _caches(engine, tiny_tok)
    before = [[(k.clone(), v.clone()) for k, v in hf.cache_layers(p.cache)] for p, _ in items]
    nll_before = [engine.score(p, _seg(prompt, [5, 6, 7])).nll for p, prompt in items]
    answers.decode_batch(engine.model, items, max_new_tokens=8)
    answers.decode_batch(engine.model, items[:1], max_new_tokens=8)
    for (p, _), layers in zip(items, before, strict=True):
        assert hf.cache_length(p.cache) == len(layers[0][0][0, 0]) == len(p)
        for (k, v), (k0, v0) in zip(hf.cache_layers(p.cache), layers, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
    assert [engine.score(p, _seg(prompt, [5, 6, 7])).nll for p, prompt in items] == nll_before


def _seg(prompt, answer):
    from kvprime.cache.segments import Segments

    return Segments(prompt=tuple(prompt), answer=tuple(answer))


def test_a_sliding_window_ends_the_row_before_it_is_crossed(engine, tiny_tok):
    primed, _ = engine.prime(DOC)
    prompt = tokenize(tiny_tok, PROMPT)
    [free] = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=12)
    window = len(primed) + len(prompt) + 5
    [capped] = answers.decode_batch(engine.model, [(primed, prompt)], max_new_tokens=12, window=window)
    assert capped.stop == "window" and capped.token_ids == free.token_ids[:5]


def test_answer_text_is_the_first_line_stripped(tiny_tok):
    ids = tokenize(tiny_tok, " Paris.\nThe capital")
    assert answers.answer_text(tiny_tok, ids) == "Paris."
    newline = answers.stop_rules(tiny_model("llama", vocab_size=len(tiny_tok)), tiny_tok)[0]
    assert any(i in newline for i in ids)
    assert all("\n" in tiny_tok.decode([i]) for i in newline)
    assert not any("\n" in tiny_tok.decode([i]) for i in set(range(len(tiny_tok))) - newline)


@pytest.mark.slow
def test_smollm2_answers_equal_generate_and_are_scored():
    """The real packaged model: a full cache's greedy answer is model.generate's, cut at the answer's line."""
    from kvprime.analysis import answer_quality

    eng = Engine.load("smollm2_135m_instruct")
    doc = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
           "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")
    primed, _ = eng.prime(doc)
    prompt = tokenize(eng.tokenizer, "\n\nQuestion: Where did the Norse raiders come from?\nAnswer:")
    reference = _generate(eng, primed.token_ids + prompt, 16)
    [free] = answers.decode_batch(eng.model, [(primed, prompt)], max_new_tokens=16, end=_eos(eng.model))
    assert list(free.token_ids) == reference
    [d] = answers.decode_many(eng.model, eng.tokenizer, [(primed, prompt)], max_new_tokens=16)
    text = eng.tokenizer.decode(reference, skip_special_tokens=True)
    assert d.stop == "newline" and d.text == text.strip().split("\n")[0].strip() and len(d.text.split()) > 2
    assert list(d.token_ids) == reference[:d.n_tokens]
    assert answer_quality.f1(d.text, ["Denmark, Iceland and Norway", "the North"]) > 0
