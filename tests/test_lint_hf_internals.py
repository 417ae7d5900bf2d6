"""transformers' private names stay in ``kvprime.cache.hf_internals``: the hub commit of a config and the device
of a cache are read there, and no other module of kvprime reads them itself."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kvprime.cache import hf_internals as hf
from kvprime.cache.tiny import tiny_config, tiny_model

KVPRIME = Path(hf.__file__).resolve().parents[1]


def test_commit_hash_is_the_configs_hub_commit_or_none():
    config = tiny_config()
    assert hf.commit_hash(config) is None
    config._commit_hash = "0123abcd"
    assert hf.commit_hash(config) == "0123abcd"


def test_cache_device_is_where_the_keys_are():
    model = tiny_model()
    ids = torch.tensor([[1, 2, 3]])
    cache = hf.encode(model, ids, torch.arange(3).unsqueeze(0))
    assert hf.cache_device(cache) == hf.cache_layers(cache)[0][0].device == torch.device("cpu")


def test_no_module_but_hf_internals_reads_cache_layers_or_the_commit_attribute():
    raw = re.compile(r"_commit_hash|\.cache\.layers\b|\.key_cache\b|\.value_cache\b|\.layers\[\d+\]\.(keys|values)")
    found = [f"{p.relative_to(KVPRIME)}:{n}" for p in sorted(KVPRIME.rglob("*.py")) if p.name != "hf_internals.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert found == []
