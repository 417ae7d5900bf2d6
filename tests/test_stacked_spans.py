"""Stacking caches straight from their spans (``hf_internals.AssembledCache``, ``batch_caches.stack_caches``) against
the per-cache way: assemble each cache alone (its own rotations and concatenations), then copy it into its padded
row. Same numbers, bit for bit, across RoPE variants and dtypes; far fewer tensor operations per batch."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvprime.cache import batch_caches
from kvprime.cache import hf_internals as hf
from kvprime.cache.tiny import ROPE_VARIANTS, tiny_model

VOCAB = 256


def _sources(model, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 9 + 5 * i
        ids = torch.randint(3, VOCAB, (1, length), generator=g)
        start = 3 * i  # encoded at different positions, as shifted and offset encodes are
        out.append(hf.encode(model, ids, torch.arange(start, start + length)[None]))
    return out


def _recipes(src):
    """Caches built as the builders build them: a sink kept, a document moved by -S, spans of several sources,
    a span kept where it is, and a plain (not assembled) cache among them."""
    a, b, c, d = src
    return [
        [(a, 0, 1, 0), (a, 4, 9, -3)],  # truncate_prefix: sink, document re-rotated by -S
        [(b, 0, 1, 0), (b, 3, 14, -2), (c, 1, 7, 5)],  # independent: documents moved to their slots
        [(c, 0, 12, 0)],  # truncate_suffix: a leading span kept where it is
        [(d, 0, 1, 4), (d, 2, 20, -1), (a, 0, 9, 7)],
    ]


def _reference_stack(caches, width):
    """The per-cache way: assemble each cache alone, then copy it into its right-padded row."""
    layers = []
    for i in range(len(caches[0].layers)):
        k0, v0 = caches[0].layers[i].keys, caches[0].layers[i].values
        keys = k0.new_zeros((len(caches), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(caches), v0.shape[1], width, v0.shape[3]))
        for r, c in enumerate(caches):
            n = hf.cache_length(c)
            keys[r, :, :n], values[r, :, :n] = c.layers[i].keys[0], c.layers[i].values[0]
        layers.append((keys, values))
    return layers


@pytest.mark.parametrize("variant", ["default", "yarn", "partial_rotary_phi", "partial_rotary_phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacking_from_spans_equals_assembling_each_cache(variant, dtype):
    arch, overrides = ROPE_VARIANTS[variant]
    model = tiny_model(arch, seed=1, vocab_size=VOCAB, **overrides).to(dtype)
    spec = hf.rope_spec(model)
    src = _sources(model, 4)
    plain = src[3]
    lazy = [hf.assemble(model, parts, spec) for parts in _recipes(src)] + [plain]
    eager = [hf.assemble(model, parts, spec) for parts in _recipes(src)] + [plain]
    for c in eager:
        c.layers  # noqa: B018 -- reading the layers assembles the cache alone
    assert all(c.unassembled for c in lazy[:-1]) and not any(getattr(c, "unassembled", False) for c in eager)
    lengths = [hf.cache_length(c) for c in lazy]
    assert lengths == [hf.cache_length(c) for c in eager] == [6, 18, 12, 28, hf.cache_length(plain)]

    stacked, mask = batch_caches.stack_caches(model, lazy)
    assert all(c.unassembled for c in lazy[:-1])  # stacked without assembling any of them
    reference = _reference_stack(eager, max(lengths))
    for (k, v), (rk, rv) in zip(hf.cache_layers(stacked), reference, strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    assert mask.tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]
    # A moved span really was rotated (the comparison above would pass if neither path rotated anything).
    unmoved = hf.assemble(model, [(a, s, e, 0) for a, s, e, _ in _recipes(src)[0]], spec)
    assert not torch.equal(hf.cache_layers(unmoved)[0][0], hf.cache_layers(eager[0])[0][0])


def test_from_spans_false_assembles_each_cache_and_stacks_the_same_tensors():
    """``from_spans=False`` (the bench's one-by-one timing) takes the per-cache way: every cache is assembled alone,
    and the stack is the same bit for bit."""
    model = tiny_model("llama", seed=1, vocab_size=VOCAB)
    spec = hf.rope_spec(model)
    src = _sources(model, 4)
    spans = [hf.assemble(model, parts, spec) for parts in _recipes(src)]
    per_cache = [hf.assemble(model, parts, spec) for parts in _recipes(src)]
    a, a_mask = batch_caches.stack_caches(model, spans)
    b, b_mask = batch_caches.stack_caches(model, per_cache, from_spans=False)
    assert all(c.unassembled for c in spans) and not any(c.unassembled for c in per_cache)
    assert torch.equal(a_mask, b_mask)
    for (k, v), (rk, rv) in zip(hf.cache_layers(a), hf.cache_layers(b), strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)


def test_extend_batch_passes_from_spans_to_its_stack():
    """Continuing pasts with ``from_spans=False`` assembles them (the per-cache way) and gives the same caches."""
    model = tiny_model("llama", seed=1, vocab_size=VOCAB)
    spec = hf.rope_spec(model)
    src = _sources(model, 4)
    ids, pos, lengths = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[6, 7, 8], [18, 19, 20]]), [3, 2]
    out = {}
    for from_spans in (True, False):
        pasts = [hf.assemble(model, parts, spec) for parts in _recipes(src)[:2]]
        out[from_spans] = batch_caches.extend_batch(model, pasts, ids, pos, lengths, from_spans=from_spans)
        assert all(c.unassembled for c in pasts) == from_spans
    for x, y in zip(out[True], out[False], strict=True):
        for (k, v), (rk, rv) in zip(hf.cache_layers(x), hf.cache_layers(y), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)


def test_rotation_by_columns_equals_rotate_keys():
    """Each moved span equals ``rotate_keys`` of that span (the re-rotation the identity tests prove exact)."""
    model = tiny_model("llama", seed=1, vocab_size=VOCAB)
    spec = hf.rope_spec(model)
    (a,) = _sources(model, 1)
    stacked, _ = batch_caches.stack_caches(model, [hf.assemble(model, [(a, 0, 1, 0), (a, 2, 9, -2)], spec)])
    for i, (k, _) in enumerate(hf.cache_layers(stacked)):
        assert torch.equal(k[0, :, :1], a.layers[i].keys[0, :, :1])
        assert torch.equal(k[0, :, 1:8], hf.rotate_keys(a.layers[i].keys[..., 2:9, :], -2, spec.layers[i].inv_freq)[0])


def test_an_assembled_cache_reads_like_any_cache():
    """Any read of its layers assembles it; a forward can append to it and crop back."""
    model = tiny_model("llama", seed=1, vocab_size=VOCAB)
    spec = hf.rope_spec(model)
    (a,) = _sources(model, 1)
    cache = hf.assemble(model, [(a, 0, 1, 0), (a, 2, 9, -2)], spec)
    assert cache.unassembled and hf.cache_length(cache) == 8
    logits = hf.logits_after(model, cache, torch.tensor([[5, 6]]), torch.tensor([[8, 9]]), keep_last=1)
    assert not cache.unassembled and hf.cache_length(cache) == 10 and torch.isfinite(logits).all()
    hf.crop_to(cache, 8)
    assert hf.cache_length(cache) == 8
    with pytest.raises(ValueError, match="RopeSpec"):
        hf.assemble(model, [(a, 2, 9, -2)], None)


class _CountOps(TorchDispatchMode):
    """Counts the tensor operations that compute or copy (a kernel launch each on a GPU); views are free."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def test_stacking_from_spans_takes_a_fixed_number_of_operations_per_layer():
    """The host work of a scoring batch: per layer a fixed number of tensor operations, not several per cache
    (on a GPU each is a kernel launch, which is what bounds a small model there)."""
    model = tiny_model("llama", seed=1, vocab_size=VOCAB)
    spec = hf.rope_spec(model)
    src = _sources(model, 4)
    counts = {}
    for n in (4, 32):
        caches = [hf.assemble(model, parts, spec) for parts in _recipes(src) * (n // 4)]
        with _CountOps() as batched:
            batch_caches.stack_caches(model, caches)
        with _CountOps() as one_by_one:
            for c in caches:
                c.layers  # noqa: B018
            _reference_stack(caches, max(hf.cache_length(c) for c in caches))
        caches = [hf.assemble(model, parts, spec) for parts in _recipes(src) * (n // 4)]
        with _CountOps() as switched_off:  # the bench's one-by-one timing
            batch_caches.stack_caches(model, caches, from_spans=False)
        counts[n] = (batched.n, one_by_one.n, switched_off.n)
    layers = model.config.num_hidden_layers
    (b4, o4, s4), (b32, o32, s32) = counts[4], counts[32]
    assert o32 > 7 * o4 * 0.9  # one cache at a time: the work grows with the caches
    assert s32 > 7 * s4 * 0.9 and s32 > 10 * b32  # from_spans=False is that way
    assert b32 == b4 and b32 < o32 / 10  # from spans: the same operations for 4 caches as for 32
    assert b32 <= 40 * layers
