"""Generated surrogates: seeded, batch-independent sampling and the on-disk store."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import pytest
import torch

from kvprime.surrogates import generation
from kvprime.surrogates.generation import (
    GENERATION_TEMPLATES,
    GenerationSettings,
    GumbelSampler,
    build_prompt,
    clean,
    doc_hash,
    generate,
    row_seed,
)
from kvprime.surrogates.store import SurrogateStore, ensure

TEMPLATE = GENERATION_TEMPLATES["target_question"]

# Clearly unequal lengths (a few tokens to ~100), so batches carry real left padding.
DOCS = [
    "Normans.",
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    ("Super Bowl 50 was an American football game to determine the champion of the National Football League. "
     "The river flows through the city and into the sea; its water is used for farming, drinking and power."),
    "What is the population of Japan?",
    "Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "A passage of text describes a place, a person or an event. " * 3,
]


@pytest.fixture(scope="module")
def tiny():
    from kvprime.cache.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model("llama", vocab_size=len(tok)), tok


def _settings(**kw) -> GenerationSettings:
    base = dict(temperature=1.0, max_new_tokens=8, seed=42, batch_size=4)
    base.update(kw)
    return GenerationSettings(**base)


# ---------------------------------------------------------------- sampling


def test_generation_is_deterministic_under_seed(tiny):
    model, tok = tiny
    a = generate(model, tok, DOCS, TEMPLATE, _settings())
    b = generate(model, tok, DOCS, TEMPLATE, _settings())
    assert a == b
    assert len(a) == len(DOCS) and all(isinstance(s, str) for s in a)
    assert len(set(a)) > 1  # the random model at T=1 gives diverse outputs, so the next check means something
    c = generate(model, tok, DOCS, TEMPLATE, _settings(seed=7))
    assert c != a


# The random model's logits span < 1, so at T=1 the Gumbel noise dominates and a wrong logit would often
# go unnoticed; greedy (T=0) and T=0.1 make any padding or masking error change the tokens.
@pytest.mark.parametrize("temperature", [0.0, 0.1, 1.0])
def test_batched_equals_one_at_a_time(tiny, temperature):
    model, tok = tiny
    lengths = [len(tok(build_prompt(tok, TEMPLATE, d))["input_ids"]) for d in DOCS]
    assert max(lengths) - min(lengths) > 50
    settings = _settings(temperature=temperature, max_new_tokens=12)
    batched = generate(model, tok, DOCS, TEMPLATE, dataclasses.replace(settings, batch_size=4))
    single = generate(model, tok, DOCS, TEMPLATE, dataclasses.replace(settings, batch_size=1))
    assert batched == single
    # Input order, not length order: each document's result equals generating it alone.
    assert [generate(model, tok, [d], TEMPLATE, settings)[0] for d in DOCS] == batched


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_result_does_not_depend_on_batch_mates(tiny, temperature):
    model, tok = tiny
    settings = _settings(temperature=temperature, batch_size=8)
    alone = generate(model, tok, DOCS[:2], TEMPLATE, settings)
    with_others = generate(model, tok, list(reversed(DOCS)), TEMPLATE, settings)
    assert with_others[-1] == alone[0] and with_others[-2] == alone[1]


class _EosAfter(torch.nn.Module):
    """Wraps a model so each row emits EOS once its real length (prompt and new tokens) is a multiple of 5: a row
    of prompt length p stops after (-p) % 5 tokens (0..4), whatever batch it is in and whichever rows are left."""

    def __init__(self, inner, eos_id: int):
        super().__init__()
        self.inner, self.eos_id, self.calls, self.rows = inner, eos_id, 0, []

    def forward(self, **kw):
        out = self.inner(**kw)
        self.calls += 1
        self.rows.append(kw["input_ids"].shape[0])
        out.logits[kw["attention_mask"].sum(-1) % 5 == 0, -1, self.eos_id] = 1e4
        return out


def test_rows_stop_at_eos_independently(tiny):
    model, tok = tiny
    wrapped = _EosAfter(model, tok.eos_token_id)
    settings = _settings(max_new_tokens=20)
    rows = [tok(build_prompt(tok, TEMPLATE, d))["input_ids"] for d in DOCS[:4]]
    expected = [-len(r) % 5 for r in rows]
    assert len(set(expected)) > 2  # rows finish at different steps
    gens = [torch.Generator().manual_seed(row_seed(42, d)) for d in DOCS[:4]]
    new = generation._generate_batch(wrapped, rows, gens, settings, tok.pad_token_id, {tok.eos_token_id},
                                     per_row_prefill=False)  # the wrapper reads the batch's attention mask
    assert [len(t) for t in new] == expected
    assert all(tok.eos_token_id not in t and tok.pad_token_id not in t for t in new)
    assert wrapped.calls == max(expected) + 1  # stops once every row is done
    # A finished row leaves the batch: each step runs only the rows still decoding.
    assert wrapped.rows == [len(rows)] + [sum(e > j for e in expected) for j in range(max(expected))]
    # Early-finished batch mates change nothing for the others.
    assert generate(wrapped, tok, DOCS, TEMPLATE, _settings(batch_size=6, shared_prefix=False),
                    per_row_prefill=False) == \
        generate(wrapped, tok, DOCS, TEMPLATE, _settings(batch_size=1, shared_prefix=False), per_row_prefill=False)


@pytest.mark.parametrize("temperature", [0.0, 0.1])
def test_prompts_prefilled_one_by_one_decode_like_a_padded_batch(tiny, temperature):
    """The CPU prefills each prompt alone and stacks the caches left-padded; the GPU prefills one left-padded
    batch. Same tokens either way, for prompts of unequal length (greedy and near-greedy, where a wrong
    mask or position would show)."""
    model, tok = tiny
    rows = [tok(build_prompt(tok, TEMPLATE, d))["input_ids"] for d in DOCS]
    assert len({len(r) for r in rows}) == len(rows)
    settings = _settings(temperature=temperature, max_new_tokens=12)

    def run(per_row):
        gens = [torch.Generator().manual_seed(row_seed(42, d)) for d in DOCS]
        return generation._generate_batch(model, rows, gens, settings, tok.pad_token_id, {-1}, per_row)

    by_row, batched = run(True), run(False)
    assert by_row == batched and all(len(t) == 12 for t in by_row)
    # And each equals that prompt generated alone.
    for i, r in enumerate(rows):
        alone = generation._generate_batch(model, [r], [torch.Generator().manual_seed(row_seed(42, DOCS[i]))],
                                           settings, tok.pad_token_id, {-1}, False)
        assert alone[0] == by_row[i]


def test_gumbel_sampler_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature = 0.7
    n = 20_000
    gens = [torch.Generator().manual_seed(row_seed(0, f"doc {i}")) for i in range(n)]
    scores = GumbelSampler(gens, temperature)(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1))
    freq = torch.bincount(scores.argmax(-1), minlength=len(logits)).double() / n
    expected = torch.softmax(logits.double() / temperature, -1)
    # ~4 standard errors at n=20k; softmax(logits) without the temperature differs by > 0.1 in the top entry.
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_gumbel_sampler_rows_are_private():
    def gens(*names):
        return [torch.Generator().manual_seed(row_seed(1, n)) for n in names]

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    together = GumbelSampler(gens("a", "b", "c"), 0.5)
    alone = GumbelSampler(gens("b"), 0.5)
    for _ in range(3):  # one draw per step: later steps stay aligned too
        t = together(None, logits)
        assert torch.equal(t[1], alone(None, logits[1:2])[0])
    assert torch.equal(GumbelSampler(gens("a"), 0.0)(None, logits[:1]), logits[:1])  # T=0: greedy


# ---------------------------------------------------------------- prompts and cleaning


def test_clean():
    assert clean('  "What is the capital of France?"  ') == "What is the capital of France?"
    assert clean("'quoted'\n") == "quoted"
    assert clean("\n  First line?  \nSecond line\nthird") == "First line?"
    assert clean('"Who won?\nExplanation: ..."') == "Who won?"
    assert clean("   ") == ""


def test_clean_first_content_line_skips_label_lines():
    text = "The question should be:\n\"Who founded Normandy?\"\nMore text"
    assert clean(text, "notebook") == "The question should be:"
    assert clean(text, "first_content_line") == "Who founded Normandy?"
    assert clean("Answer:\n\n", "first_content_line") == "Answer:"  # nothing else: the notebook rule
    with pytest.raises(ValueError, match="first_content_line"):
        clean("x", "smart")


def test_build_prompt_plain_and_chat(tiny):
    _, tok = tiny
    assert build_prompt(tok, "T", "D") == "T\n\nText:\nD\n\nQuery:"
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    assert build_prompt(chat_tok, "T", "D") == "<s>user:T\n\nText:\nD</s><s>assistant:"


def test_templates_and_settings_key():
    assert set(GENERATION_TEMPLATES) == {"target_question", "keyword_query", "symptom_scenario",
                                         "misconception_negative", "messy_realworld", "exp01"}
    assert GENERATION_TEMPLATES["exp01"] == GENERATION_TEMPLATES["target_question"]
    assert all(t.endswith("Document:") for t in GENERATION_TEMPLATES.values())
    assert GenerationSettings().key() == {"temperature": 0.3, "max_new_tokens": 45, "seed": 42,
                                         "clean": "first_content_line"}
    assert GenerationSettings(clean="notebook").key() != GenerationSettings().key()
    assert GenerationSettings(batch_size=1).key() == GenerationSettings(batch_size=32).key()
    assert doc_hash("é") == hashlib.sha256("é".encode()).hexdigest()


# ---------------------------------------------------------------- store


def _fake_generate(calls):
    def fake(model, tokenizer, documents, template_text, settings, *, progress=False, stats=None):
        calls.append(list(documents))
        return [f"q[{settings.seed}]:{d[:10]}" for d in documents]

    return fake


def _ensure(store, docs, settings=None, **kw):
    return ensure(store, None, None, model_id="m@abc", template_name="target_question", documents=docs,
                  settings=settings or _settings(), **kw)


def test_store_put_get_round_trip(tmp_path):
    store = SurrogateStore(tmp_path)
    key = store.key(model_id="m", template_name="t", template_text="x", settings=_settings(), document="d")
    assert store.get(key) is None
    store.put(key, 'Why "this"? é', {"a": 1})
    assert store.get(key) == 'Why "this"? é'
    path = tmp_path / key[:2] / f"{key}.json"
    entry = json.loads(path.read_text())
    assert entry["key"] == key and entry["meta"] == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_ensure_generates_only_missing(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    store = SurrogateStore(tmp_path)
    first = _ensure(store, DOCS[:3])
    assert calls == [DOCS[:3]]
    assert _ensure(store, DOCS[:3]) == first and len(calls) == 1  # rerun: no model call
    mixed = _ensure(store, [DOCS[4], DOCS[0], DOCS[3], DOCS[1]])
    assert calls[1] == [DOCS[4], DOCS[3]]
    assert mixed == [f"q[42]:{DOCS[4][:10]}", first[0], f"q[42]:{DOCS[3][:10]}", first[1]]
    assert _ensure(store, [DOCS[0], DOCS[0]]) == [first[0], first[0]] and len(calls) == 2


def test_ensure_with_real_generation_reuses_store(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    store = SurrogateStore(tmp_path)
    kw = dict(model_id="tiny", template_name="keyword_query", documents=DOCS[:3], settings=_settings())
    first = ensure(store, model, tok, **kw)
    assert first == generate(model, tok, DOCS[:3], GENERATION_TEMPLATES["keyword_query"], _settings())

    def boom(*a, **k):
        raise AssertionError("generate called although everything is stored")

    monkeypatch.setattr(generation, "generate", boom)
    assert ensure(store, model, tok, **kw) == first


@pytest.mark.parametrize("damage", ["truncate", "alter_text", "wrong_key", "missing_field"])
def test_corrupt_entry_is_deleted_and_regenerated(tmp_path, monkeypatch, damage):
    calls: list[list[str]] = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    store = SurrogateStore(tmp_path)
    good = _ensure(store, DOCS[:2])
    key = store.key(model_id="m@abc", template_name="target_question", template_text=TEMPLATE,
                    settings=_settings(), document=DOCS[1])
    path = store.path(key)
    raw = path.read_text()
    entry = json.loads(raw)
    if damage == "truncate":
        path.write_text(raw[: len(raw) // 2])
    elif damage == "alter_text":
        entry["text"] = "a tampered surrogate"
        path.write_text(json.dumps(entry))
    elif damage == "wrong_key":
        entry["key"] = "0" * 64
        path.write_text(json.dumps(entry))
    else:
        del entry["meta"]
        path.write_text(json.dumps(entry))

    with pytest.warns(UserWarning, match="corrupt"):
        assert store.get(key) is None
    assert not path.exists()

    path.write_text(raw[:10])  # damage it again, now through ensure
    with pytest.warns(UserWarning, match="corrupt"):
        again = _ensure(store, DOCS[:2])
    assert again == good
    assert calls[-1] == [DOCS[1]]
    assert json.loads(path.read_text())["text"] == good[1]


def test_store_keys(tmp_path):
    store = SurrogateStore(tmp_path)
    base = dict(model_id="m@abc", template_name="target_question", template_text=TEMPLATE,
                settings=_settings(), document=DOCS[0])
    k0 = store.key(**base)
    changed = [
        dict(model_id="m@def"),
        dict(template_name="keyword_query"),
        dict(template_text=TEMPLATE + " "),
        dict(settings=_settings(seed=43)),
        dict(settings=_settings(temperature=0.3)),
        dict(settings=_settings(max_new_tokens=45)),
        dict(document=DOCS[0] + " "),
    ]
    keys = [store.key(**{**base, **c}) for c in changed]
    assert k0 not in keys and len(set(keys)) == len(keys)
    assert store.key(**{**base, "settings": _settings(batch_size=1)}) == k0
    assert store.key(**{**base, "settings": _settings(batch_size=64)}) == k0
    assert len(k0) == 64 and int(k0, 16) >= 0


def test_unknown_template_is_refused(tmp_path):
    with pytest.raises(ValueError, match="target_question") as info:
        ensure(SurrogateStore(tmp_path), None, None, model_id="m", template_name="nope", documents=DOCS[:1],
               settings=_settings())
    assert "messy_realworld" in str(info.value) and "nope" in str(info.value)


def test_default_root_is_under_kvprime_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRIME_HOME", str(tmp_path))
    assert SurrogateStore().root == tmp_path / "surrogates"


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_batched_equals_single_and_seeded():
    from kvprime import Engine

    eng = Engine.load("smollm2_135m_instruct")
    passages = [
        ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
         "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."),
        ("Super Bowl 50 was an American football game to determine the champion of the National Football "
         "League (NFL) for the 2015 season. The Denver Broncos defeated the Carolina Panthers 24-10."),
        "Oxygen is a chemical element with symbol O and atomic number 8.",
    ]
    settings = GenerationSettings(batch_size=3)
    batched = generate(eng.model, eng.tokenizer, passages, TEMPLATE, settings)
    single = generate(eng.model, eng.tokenizer, passages, TEMPLATE, dataclasses.replace(settings, batch_size=1))
    again = generate(eng.model, eng.tokenizer, passages, TEMPLATE, settings)
    for p, q in zip(passages, batched, strict=True):
        print(f"\n[passage] {p[:70]}...\n[target_question] {q}")
    assert batched == single == again
    assert all(q and len(q.split()) <= 40 for q in batched)


# ---------------------------------------------------------------- the shared generation prefix


def _rows(tok):
    return [tok(build_prompt(tok, TEMPLATE, d))["input_ids"] for d in DOCS]


def test_shared_prefix_is_the_templates_opening_and_covers_every_prompt(tiny):
    model, tok = tiny
    shared = generation.shared_prefix(model, tok, TEMPLATE)
    assert shared is not None and len(shared.ids) >= generation.MIN_SHARED_PREFIX_TOKENS
    assert hf_cache_length(shared.cache) == len(shared.ids)
    rows = _rows(tok)
    assert all(shared.covers(r) for r in rows)
    # It is the longest opening the rows share, less at most the one token that could merge with a document.
    # strict=False: the rows differ in length; where they first differ is what counts
    common = min(next((j for j, (a, b) in enumerate(zip(rows[0], r, strict=False)) if a != b), len(r))
                 for r in rows[1:])
    assert common - 1 <= len(shared.ids) <= common


def hf_cache_length(cache):
    from kvprime.cache import hf_internals as hf

    return hf.cache_length(cache)


@pytest.mark.parametrize("per_row", [True, False])
def test_prefill_from_the_shared_prefix_equals_the_whole_prompt(tiny, per_row):
    """Logits and cache entries of a prefill that continues the shared prefix equal those of the whole prompt
    prefilled at once (padded rows of unequal lengths: the batched path's pads sit between prefix and row)."""
    from kvprime.cache import hf_internals as hf

    model, tok = tiny
    rows = _rows(tok)
    shared = generation.shared_prefix(model, tok, TEMPLATE)
    with torch.inference_mode():
        whole = generation._prefill(model, rows, tok.pad_token_id, per_row)
        cont = generation._prefill(model, rows, tok.pad_token_id, per_row, shared)
    torch.testing.assert_close(cont[0], whole[0], atol=1e-5, rtol=0)
    assert torch.equal(cont[3], whole[3])  # each row's last position
    # The real entries of each row (mask 1) agree, whatever the padding layout around them.
    for (wk, wv), (ck, cv) in zip(hf.cache_layers(whole[1]), hf.cache_layers(cont[1]), strict=True):
        for r in range(len(rows)):
            w, c = whole[2][r].bool(), cont[2][r].bool()
            torch.testing.assert_close(ck[r][:, c], wk[r][:, w], atol=1e-5, rtol=0)
            torch.testing.assert_close(cv[r][:, c], wv[r][:, w], atol=1e-5, rtol=0)
    # The shared cache itself is untouched by the continuations.
    assert hf.cache_length(shared.cache) == len(shared.ids)


@pytest.mark.parametrize("temperature", [0.0, 0.1, 1.0])
def test_shared_prefix_changes_no_surrogate(tiny, temperature):
    """Batched and one-at-a-time, row-by-row and padded prefill, with and without the shared prefix: one
    output. Greedy and T=0.1 make a wrong position or mask change the tokens."""
    model, tok = tiny
    settings = _settings(temperature=temperature, max_new_tokens=12)
    reference = generate(model, tok, DOCS, TEMPLATE, dataclasses.replace(settings, batch_size=1, shared_prefix=False))
    for batch_size in (1, 4):
        for per_row in (True, False):
            out = generate(model, tok, DOCS, TEMPLATE, dataclasses.replace(settings, batch_size=batch_size),
                           per_row_prefill=per_row)
            assert out == reference, (batch_size, per_row)


def test_shared_prefix_counts_the_work_it_saves(tiny):
    model, tok = tiny
    shared_len = len(generation.shared_prefix(model, tok, TEMPLATE).ids)
    on, off = {}, {}
    generate(model, tok, DOCS, TEMPLATE, _settings(), stats=on)
    generate(model, tok, DOCS, TEMPLATE, _settings(shared_prefix=False), stats=off)
    assert on["shared_prefix_tokens"] == shared_len and off["shared_prefix_tokens"] == 0
    assert [r[2] for r in on["rows"]] == [shared_len] * len(DOCS) and all(r[2] == 0 for r in off["rows"])
    assert [r[:2] for r in on["rows"]] == [r[:2] for r in off["rows"]]  # same prompts, same lengths generated
    assert [d["shared_prompt_tokens"] for d in on["documents"]] == [shared_len] * len(DOCS)


def test_a_prompt_the_prefix_does_not_cover_is_prefilled_whole(tiny):
    """A row that does not begin with the shared ids (a token merged across the boundary) must not continue
    from it; in a padded batch one such row sends the whole batch down the whole-prompt path."""
    model, tok = tiny
    rows = _rows(tok)
    shared = generation.shared_prefix(model, tok, TEMPLATE)
    odd = list(rows[1])
    odd[len(shared.ids) - 1] = (odd[len(shared.ids) - 1] + 1) % len(tok)
    assert not shared.covers(odd) and not shared.covers(shared.ids)
    mixed = [rows[0], odd, rows[2]]
    with torch.inference_mode():
        for per_row in (True, False):
            whole = generation._prefill(model, mixed, tok.pad_token_id, per_row)
            cont = generation._prefill(model, mixed, tok.pad_token_id, per_row, shared)
            torch.testing.assert_close(cont[0], whole[0], atol=1e-5, rtol=0)


def test_no_shared_prefix_on_sliding_window_models():
    from kvprime.cache import hf_internals as hf
    from kvprime.cache.tiny import ROPE_VARIANTS, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    arch, overrides = ROPE_VARIANTS["gemma3_per_layer"]
    model = tiny_model(arch, vocab_size=len(tok), **overrides)
    assert any(hf.sliding_windows(model))
    assert generation.shared_prefix(model, tok, TEMPLATE) is None


def test_rows_leave_the_batch_on_a_sliding_window_model():
    """Dropping finished rows selects batch rows of every cache layer, the sliding ones too: rows that stop at
    different steps still get the tokens they get alone (Gemma3's per-layer windows, greedy and sampled)."""
    from kvprime.cache.tiny import ROPE_VARIANTS, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    arch, overrides = ROPE_VARIANTS["gemma3_per_layer"]
    wrapped = _EosAfter(tiny_model(arch, vocab_size=len(tok), **overrides), tok.eos_token_id)
    for temperature in (0.0, 0.7):
        settings = _settings(temperature=temperature, shared_prefix=False, max_new_tokens=8)
        wrapped.rows = []
        together = generate(wrapped, tok, DOCS, TEMPLATE, dataclasses.replace(settings, batch_size=6),
                            per_row_prefill=False)
        assert len(set(wrapped.rows)) > 2  # the batch shrank step by step
        alone = generate(wrapped, tok, DOCS, TEMPLATE, dataclasses.replace(settings, batch_size=1),
                         per_row_prefill=False)
        assert together == alone and len({len(t) for t in together}) > 2
