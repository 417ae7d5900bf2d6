"""Every touch of transformers' KV-cache and RoPE internals lives here.

The cache API changed in transformers 5 (``key_cache``/``to_legacy_cache`` are gone; layers expose
``.keys``/``.values``; ``crop`` only removes from the end) and RoPE modules changed with it
(``rope_parameters``, per-layer-type frequencies in Gemma3). transformers 5.24 renamed the forward keyword
``past_key_values`` to ``cache`` (and the output field with it): see ``call``. When the next version moves
things again, this is the only file to mend; everything else in kvprime sees plain tensors and calls the
model through ``call``/``step`` here.

Shapes: keys/values are ``[batch, kv_heads, seq, head_dim]``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import ConfigError

# Model types whose attention rotates keys with the half-split ``rotate_half`` layout, with the rotary
# dims first (partial rotary keeps the rest unrotated). Re-rotation is only exact for a known layout;
# other RoPE models can still use ``rope_fix=shift``, which never re-rotates.
HALF_SPLIT_ROPE_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3", "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2",
        "smollm3", "helium", "cohere2",
    }
)

# Frequencies that depend on the sequence length seen so far: a key's rotation is then not a function of
# its position alone, so neither re-rotation nor shifted encodes reproduce the reference exactly.
_LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


class RopeUnsupported(ConfigError):
    """The model's positional scheme cannot be corrected exactly by the requested method."""


@dataclass(frozen=True)
class LayerRope:
    inv_freq: torch.Tensor  # fp32, [rotary_dim // 2]
    sliding_window: int | None

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()


@dataclass(frozen=True)
class RopeSpec:
    model_type: str
    rope_types: tuple[str, ...]
    layers: tuple[LayerRope, ...]
    half_split: bool

    @property
    def sliding_windows(self) -> set[int]:
        return {layer.sliding_window for layer in self.layers if layer.sliding_window is not None}


# ---------------------------------------------------------------- config-level checks (no weights needed)


def rope_types_of_config(config) -> tuple[str, ...]:
    """The rope types a config declares, or () when it has no rotary embeddings."""
    config = config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None)
    if not params:
        return ()
    if "rope_type" in params or "rope_theta" in params:
        return (params.get("rope_type", "default"),)
    # Gemma3-style: one entry per layer type.
    return tuple(sorted({p.get("rope_type", "default") for p in params.values() if isinstance(p, dict)}))


def check_config_supports(config, rope_fix: str) -> None:
    """Refuse, before any weights load, a correction the model's positional scheme cannot do exactly."""
    model_type = getattr(config, "model_type", "?")
    types = rope_types_of_config(config)
    if not types:
        raise RopeUnsupported(
            f"model_type '{model_type}' has no rotary position embeddings, so a truncated cache cannot be "
            f"position-corrected (rope_fix={rope_fix}). Use conditions with builder 'full' or "
            f"'truncate_suffix' for this model, or pick a RoPE model."
        )
    bad = [t for t in types if any(d in t for d in _LENGTH_DEPENDENT_ROPE_TYPES)]
    if bad and rope_fix in ("rerotate", "shift"):
        raise RopeUnsupported(
            f"model_type '{model_type}' uses rope_type {bad[0]!r}, whose frequencies change with the sequence "
            f"length, so rope_fix={rope_fix} cannot reproduce the reference cache exactly. Accepted rope types "
            f"for correction: default, linear, llama3, yarn (and other length-independent types)."
        )
    if rope_fix == "rerotate" and model_type not in HALF_SPLIT_ROPE_MODEL_TYPES:
        raise RopeUnsupported(
            f"rope_fix=rerotate is only verified for the half-split RoPE layout of model types "
            f"{sorted(HALF_SPLIT_ROPE_MODEL_TYPES)}; '{model_type}' is not among them. Use rope_fix=shift, "
            f"which needs no re-rotation."
        )


# ---------------------------------------------------------------- RoPE


def rope_spec(model) -> RopeSpec:
    """Per-layer RoPE frequencies (fp32, the module's own ``inv_freq`` buffers) and sliding windows."""
    config = model.config.get_text_config(decoder=True)
    rotary = getattr(model.base_model, "rotary_emb", None)
    types = rope_types_of_config(config)
    if rotary is None or not types:
        raise RopeUnsupported(
            f"model_type '{config.model_type}' exposes no rotary embedding module (model.base_model.rotary_emb); "
            "truncated caches cannot be position-corrected for it."
        )
    windows = sliding_windows(model)
    layer_types: list[str] = getattr(config, "layer_types", None) or []
    layers = []
    for i in range(config.num_hidden_layers):
        if hasattr(rotary, "inv_freq"):
            inv = rotary.inv_freq
        else:  # one frequency set per layer type (Gemma3: local 1e4, global 1e6)
            inv = getattr(rotary, f"{layer_types[i]}_inv_freq")
        layers.append(LayerRope(inv_freq=inv.detach().float().cpu(), sliding_window=windows[i]))
    return RopeSpec(
        model_type=config.model_type,
        rope_types=types,
        layers=tuple(layers),
        half_split=config.model_type in HALF_SPLIT_ROPE_MODEL_TYPES,
    )


def rotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd keys by ``delta`` positions (negative moves them earlier): one int for every key, or a
    tensor of one delta per key position (``[seq]``, the keys' second-last dimension).

    RoPE is a rotation, so RoPE(k, p + d) = R(d) RoPE(k, p). Angles are built in fp32 from ``inv_freq``,
    never from the model's cos/sin, which carry yarn/longrope ``attention_scaling`` (that scale is already
    inside the cached key and must not be applied twice). The rotation runs in fp32 and is cast back once.
    """
    rot = 2 * inv_freq.numel()
    k = keys.float()
    inv = inv_freq.to(device=k.device, dtype=torch.float32)
    if isinstance(delta, torch.Tensor):
        angle = delta.to(device=k.device, dtype=torch.float32)[:, None] * inv[None, :]
    else:
        angle = float(delta) * inv
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = k[..., : rot // 2], k[..., rot // 2 : rot]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, k[..., rot:]), dim=-1)
    return out.to(keys.dtype)


# ---------------------------------------------------------------- caches


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers as key/value layers. transformers types them as a union with its linear-attention and
    placeholder layers, which the attention-only models kvprime runs never have."""
    return cast("list[DynamicLayer]", cache.layers)


def _filled(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values; transformers leaves them None only until the layer's first update, which every
    cache kvprime reads has had."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def cache_from_layers(model, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these per-layer (keys, values); the tensors are not copied."""
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in zip(_kv_layers(cache), layers, strict=True):
        layer.update(k, v)
    return cache


def repeat_cache(model, cache: DynamicCache, rows: int = 1) -> DynamicCache:
    """A new cache holding ``rows`` copies of a one-row cache: decoding appends to the copy, never to
    ``cache``, so one shared prefix serves any number of continuations."""
    return cache_from_layers(model, [(k.repeat(rows, 1, 1, 1), v.repeat(rows, 1, 1, 1))
                                     for k, v in cache_layers(cache)])


def keep_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only these batch rows of ``cache``, in this order (a decoding batch dropping its finished rows)."""
    cache.batch_select_indices(rows)


def cache_layers(cache: DynamicCache, upto: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values), or layers 0..``upto`` of a cache only they were run through."""
    return [_filled(layer) for layer in _kv_layers(cache)[:None if upto is None else upto + 1]]


def cache_device(cache: DynamicCache) -> torch.device:
    """Where the cache's tensors live (the device a continuation's inputs must be on)."""
    return _filled(_kv_layers(cache)[0])[0].device


def cache_length(cache: DynamicCache) -> int:
    if isinstance(cache, AssembledCache) and cache.unassembled:
        return cache.spans_length  # without assembling it
    return _filled(_kv_layers(cache)[0])[0].shape[-2]


def crop_to(cache: DynamicCache, length: int) -> None:
    """Drop entries past ``length`` in every layer (the scorer's way of undoing its own append)."""
    for layer in _kv_layers(cache):
        extra = _filled(layer)[0].shape[-2] - length
        if extra > 0:
            layer.crop(-extra)


def sliding_windows(model) -> list[int | None]:
    """Each layer's sliding window (None for full attention), as transformers' own cache would set it."""
    return [getattr(layer, "sliding_window", None) if isinstance(layer, DynamicSlidingWindowLayer) else None
            for layer in DynamicCache(config=model.config).layers]


def assemble(model, parts, spec: RopeSpec | None = None) -> DynamicCache:
    """A new cache made of spans of other caches, in order: ``parts`` is a list of
    ``(cache, start, stop, delta)``; a span with ``delta != 0`` has its keys rotated by ``delta`` positions
    with each layer's own frequencies (values carry no position and are kept as they are).

    The spans are copied together when the cache is first read (``AssembledCache``), so a batch of such caches
    can be stacked for scoring straight from their spans (``batch_caches.stack_caches``)."""
    if any(delta for *_, delta in parts) and spec is None:
        raise ValueError("a span with delta != 0 needs the model's RopeSpec to rotate its keys")
    return AssembledCache(model, parts, spec)


def materialize(cache: DynamicCache) -> DynamicCache:
    """Assemble a pending ``AssembledCache`` now (any other cache is returned as it is)."""
    cache.layers  # noqa: B018 -- reading the layers assembles it
    return cache


def _assembled_layers(parts, spec: RopeSpec | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sources = [(cache_layers(cache), start, stop, delta) for cache, start, stop, delta in parts]
    layers = []
    for i in range(len(sources[0][0])):
        keys, values = [], []
        for source, start, stop, delta in sources:
            k = source[i][0][..., start:stop, :]
            if delta:
                assert spec is not None  # assemble() is given the RoPE spec whenever a span moves
                k = rotate_keys(k, delta, spec.layers[i].inv_freq)
            keys.append(k)
            values.append(source[i][1][..., start:stop, :])
        layers.append((torch.cat(keys, dim=-2), torch.cat(values, dim=-2)))
    return layers


class AssembledCache(DynamicCache):
    """A DynamicCache made of spans of other caches (``assemble``), copied together on first read of its layers,
    so that ``batch_caches.stack_caches`` can stack many straight from their spans. Any read of ``layers`` (a
    forward, ``cache_layers``, ``crop_to``) assembles it first. Its sources must not change in its spans
    meanwhile (memoised encodes never do: the scorer only appends to a cache and crops it back)."""

    def __init__(self, model, parts, spec: RopeSpec | None):
        self._kvprime_spans = None  # DynamicCache.__init__ sets ``layers`` through the property below
        super().__init__(config=model.config)
        self._kvprime_spans = (list(parts), spec)
        self.spans_length = sum(stop - start for _, start, stop, _ in parts)

    @property
    def unassembled(self) -> bool:
        return self._kvprime_spans is not None

    @property
    def spans(self) -> list:
        return self._kvprime_spans[0] if self._kvprime_spans is not None else []

    @property
    def spans_rope(self) -> RopeSpec | None:
        return self._kvprime_spans[1] if self._kvprime_spans is not None else None

    @property
    def layers(self):
        if self._kvprime_spans is not None:
            (parts, spec), self._kvprime_spans = self._kvprime_spans, None
            for layer, (k, v) in zip(self._layers, _assembled_layers(parts, spec), strict=True):
                layer.update(k, v)
        return self._layers

    @layers.setter
    def layers(self, value):
        self._layers = value


# ---------------------------------------------------------------- the cache keyword

# transformers <= 5.23 takes the KV cache as ``past_key_values=`` and returns it as ``out.past_key_values``.
# 5.24 renamed both to ``cache``; the old keyword still works there but raises a FutureWarning ("will be
# removed in version 5.40.0") and the old output field logs a deprecation. Passing ``cache=`` to 5.23 would
# not fail: it would fall into ``**kwargs`` and the cache would be silently ignored. So the keyword is read
# from each module class's own forward signature (the decorators keep it visible through ``__wrapped__``):
# ``cache`` where the forward names it, else ``past_key_values``.
CACHE_KEYWORD = "cache"
LEGACY_CACHE_KEYWORD = "past_key_values"


@functools.cache
def _cache_keyword_of(cls) -> str:
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if CACHE_KEYWORD in params:
        return CACHE_KEYWORD
    # ``past_key_values`` named, or a forward that takes only ``**kwargs`` (a wrapper around a model): the old
    # name, which every transformers version up to 5.39 accepts (5.24+ maps it to ``cache`` with a warning).
    return LEGACY_CACHE_KEYWORD


def cache_keyword(module) -> str:
    """The keyword under which ``module``'s forward takes the KV cache: ``cache`` or ``past_key_values``."""
    cls: type = type(module)  # annotated: mypy does not see type[Any] as hashable for the cache
    return _cache_keyword_of(cls)


def call(module, cache: DynamicCache | None, **kwargs):
    """``module(**kwargs)`` with ``cache`` passed under the keyword this transformers wants (omitted if None).

    ``module`` is a causal LM or its decoder (``model.base_model``). Every kvprime call that hands a cache to
    a model goes through here."""
    if cache is not None:
        kwargs[cache_keyword(module)] = cache
    return module(**kwargs)


def returned_cache(output) -> DynamicCache | None:
    """The cache a forward returned, read from the field this transformers fills (``cache`` from 5.24,
    ``past_key_values`` before): reading the old name on 5.24 logs a deprecation."""
    names = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set(output.keys())
    return getattr(output, CACHE_KEYWORD if CACHE_KEYWORD in names else LEGACY_CACHE_KEYWORD)


# ---------------------------------------------------------------- forward passes


@torch.inference_mode()
def encode(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> DynamicCache:
    """KV states of ``input_ids`` at ``position_ids``. Runs the decoder only: an encode needs no logits."""
    cache = new_cache(model)
    call(model.base_model, cache, input_ids=input_ids, position_ids=position_ids,
         attention_mask=torch.ones_like(input_ids), use_cache=True)
    return cache


@torch.inference_mode()
def encode_batch(model, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int]) -> list[DynamicCache]:
    """Encode right-padded rows in one pass and split the result into one cache per row.

    Right padding needs no special care: under causal attention a real token never attends to the pads that
    follow it, so each row's real entries are what an unpadded encode of that row computes (up to float
    rounding from the batched matmuls). The per-row caches are views of the batch tensors."""
    cache = new_cache(model)
    mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            < torch.tensor(lengths, device=input_ids.device)[:, None]).long()
    call(model.base_model, cache, input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
         use_cache=True)
    return [cache_from_layers(model, [(k[r:r + 1, :, :n], v[r:r + 1, :, :n]) for k, v in cache_layers(cache)])
            for r, n in enumerate(lengths)]


@torch.inference_mode()
def logits_batch(model, cache: DynamicCache, cache_mask: torch.Tensor, input_ids: torch.Tensor,
                 input_mask: torch.Tensor, position_ids: torch.Tensor, keep_last: int) -> torch.Tensor:
    """Logits of the last ``keep_last`` positions of left-padded rows read against a stacked cache."""
    out = call(model, cache, input_ids=input_ids, position_ids=position_ids,
               attention_mask=torch.cat([cache_mask, input_mask], dim=1), use_cache=True, logits_to_keep=keep_last)
    return out.logits


@torch.inference_mode()
def logits_after(
    model, cache: DynamicCache | None, input_ids: torch.Tensor, position_ids: torch.Tensor, keep_last: int
) -> torch.Tensor:
    """Logits of the last ``keep_last`` positions of ``input_ids`` read against ``cache`` (appends to it)."""
    past = cache_length(cache) if cache is not None else 0
    out = call(
        model,
        cache,
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=torch.ones((input_ids.shape[0], past + input_ids.shape[1]), dtype=torch.long,
                                  device=input_ids.device),
        use_cache=cache is not None,
        logits_to_keep=keep_last,
    )
    return out.logits


@torch.inference_mode()
def step(model, input_ids: torch.Tensor, *, cache: DynamicCache | None = None,
         attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
         keep_last: int = 0) -> tuple[torch.Tensor, DynamicCache]:
    """One decoding forward: (logits of the last ``keep_last`` positions, 0 = all; the cache after it).

    Without ``cache`` the model starts its own (a prefill); with one, the new entries are appended to it.
    ``attention_mask``/``position_ids`` as the model takes them (None: the model's defaults)."""
    kwargs = {"input_ids": input_ids, "use_cache": True, "logits_to_keep": keep_last}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = call(model, cache, **kwargs)
    after = returned_cache(out)
    assert after is not None  # use_cache=True: the model returns its cache
    return out.logits, after


def commit_hash(config) -> str | None:
    """The hub commit a config was loaded from (None for a local folder or a config built in-process).
    transformers keeps it only in a private attribute."""
    return getattr(config, "_commit_hash", None)


# ---------------------------------------------------------------- RoPE bases of a config (asset conversion)


def rope_thetas_of_config(config) -> dict[str | None, float]:
    """The RoPE base(s) a (text) config declares: ``{None: theta}`` for one base (5.x ``rope_parameters``
    or 4.x ``rope_theta``), ``{layer type: theta}`` for per-layer-type RoPE (Gemma3), ``{}`` for none.

    Reads attributes only, so the asset conversion can check a config before (or without) a model."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, Mapping):
        if "rope_theta" in params:
            return {None: float(params["rope_theta"])}
        by_type: dict[str | None, float] = {str(k): float(v["rope_theta"]) for k, v in params.items()
                   if isinstance(v, Mapping) and "rope_theta" in v}
        if by_type:
            return by_type
    if getattr(config, "rope_theta", None) is not None:
        return {None: float(config.rope_theta)}
    return {}


# ---------------------------------------------------------------- selective recompute (kvprime.cache.recompute)


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward after the layers it needed (caught in ``encode_layers``)."""


@torch.inference_mode()
def encode_layers(model, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int],
                  upto: int) -> DynamicCache:
    """Right-padded rows through decoder layers 0..``upto`` only: the returned cache holds those layers' entries.
    The forward is stopped before layer ``upto + 1`` runs, so it costs ``upto + 1`` layers, not all of them."""
    cache = new_cache(model)
    mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            < torch.tensor(lengths, device=input_ids.device)[:, None]).long()
    layers = model.base_model.layers
    handle = None
    if upto + 1 < len(layers):
        def stop(*_):
            raise _StopForward
        handle = layers[upto + 1].register_forward_pre_hook(stop)
    try:
        call(model.base_model, cache, input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
             use_cache=True)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
    return cache


@torch.inference_mode()
def masked_extend(model, cache: DynamicCache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  allowed: torch.Tensor) -> DynamicCache:
    """Append ``input_ids`` at ``position_ids`` to ``cache`` (modified in place and returned), each new row
    attending exactly where ``allowed`` ([batch, 1, new, cached + new], bool) is True.

    transformers returns a 4-D mask unchanged for every layer type (``masking_utils._preprocess_mask_arguments``
    exits early on it), so full and sliding layers both use it as given; it is passed additive (0 or the dtype's
    lowest value), which eager and sdpa attention both read the same way."""
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    call(model.base_model, cache, input_ids=input_ids, position_ids=position_ids, attention_mask=additive,
         use_cache=True)
    return cache
