"""One generation per surrogate entry: processes filling the same store at once split the work through
per-entry locks, wait for what another is generating and read it, and a killed holder blocks no one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvprime.surrogates import generation
from kvprime.surrogates import store as store_module
from kvprime.surrogates.generation import GENERATION_TEMPLATES, GenerationSettings
from kvprime.surrogates.store import SurrogateStore, ensure

TEMPLATE = GENERATION_TEMPLATES["target_question"]
SETTINGS = dict(temperature=1.0, max_new_tokens=8, seed=42, batch_size=4)
DOCS = [f"Passage {i}: the river passes mill number {i} before it reaches the sea at the {i}th bay." + " More." * i
        for i in range(10)]

# A process that fills the store for its documents as `kvprime surrogates generate` does (store.ensure with
# the tiny random model), starting when the test says go, and records how many surrogates it generated.
FILLER = r"""
import json, sys, time
from pathlib import Path
from kvprime.cache.tiny import tiny_model, tiny_tokenizer
from kvprime.surrogates import generation
from kvprime.surrogates.generation import GenerationSettings
from kvprime.surrogates.store import SurrogateStore, ensure

root, docs_file, out, ready, go = map(Path, sys.argv[1:6])
docs = json.loads(docs_file.read_text())
tok = tiny_tokenizer()
model = tiny_model("llama", vocab_size=len(tok))
real = generation.generate
generated = []

def counted(*args, **kwargs):
    texts = real(*args, **kwargs)
    generated.extend(args[2])
    time.sleep(1.0)  # holds its entries unwritten a while: the other process is meanwhile deciding what to do
    return texts

generation.generate = counted
ready.touch()
while not go.exists():
    time.sleep(0.01)
texts = ensure(SurrogateStore(root), model, tok, model_id="tiny", template_name="target_question", documents=docs,
               settings=GenerationSettings(**json.loads(sys.argv[6])))
out.write_text(json.dumps({"texts": dict(zip(docs, texts)), "generated": generated}))
"""

# A process that holds one entry's lock until told to write the entry (then exits) or is killed.
HOLDER = r"""
import sys, time
from pathlib import Path
from kvprime.surrogates.store import SurrogateStore

root, key, held, write = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
store = SurrogateStore(root)
lock = store.lock(key)
lock.acquire()
held.touch()
while not write.exists():
    time.sleep(0.01)
store.put(key, "written by the holder", {"by": "holder"})
lock.release()
"""


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path.name} did not appear"
        time.sleep(0.02)


def _start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_two_processes_generate_each_entry_once(tmp_path):
    """Two processes start together on overlapping documents (in opposite orders, so both claim some entries):
    every distinct entry is generated exactly once, both get the same texts, and those are what generating
    each document alone gives."""
    from kvprime.cache.tiny import tiny_model, tiny_tokenizer

    sets = {"a": DOCS[:8], "b": DOCS[2:][::-1]}
    go = tmp_path / "go"
    procs = {}
    for name, docs in sets.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(docs))
        procs[name] = _start(FILLER, tmp_path / "store", tmp_path / f"{name}.json", tmp_path / f"{name}.out",
                             tmp_path / f"{name}.ready", go, json.dumps(SETTINGS))
    for name, proc in procs.items():
        _wait_for(tmp_path / f"{name}.ready", proc)
    go.touch()
    for proc in procs.values():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    out = {name: json.loads((tmp_path / f"{name}.out").read_text()) for name in procs}

    generated = out["a"]["generated"] + out["b"]["generated"]
    assert sorted(generated) == sorted(DOCS)  # each of the 10 distinct entries once, none twice
    shared = set(sets["a"]) & set(sets["b"])
    assert {d: out["a"]["texts"][d] for d in shared} == {d: out["b"]["texts"][d] for d in shared}
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    alone = {d: generation.generate(model, tok, [d], TEMPLATE, GenerationSettings(**SETTINGS))[0] for d in DOCS}
    assert {**out["a"]["texts"], **out["b"]["texts"]} == alone


def _fake_generate(calls: list):
    def fake(model, tokenizer, documents, template_text, settings, *, progress=False, stats=None):
        calls.append(list(documents))
        return [f"generated:{d[:12]}" for d in documents]

    return fake


def _ensure_in_thread(store, docs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["texts"] = ensure(store, None, None, model_id="m", template_name="target_question", documents=docs,
                                  settings=GenerationSettings(**SETTINGS))
        except BaseException as err:  # noqa: BLE001 -- handed to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _key(store, doc):
    return store.key(model_id="m", template_name="target_question", template_text=TEMPLATE,
                     settings=GenerationSettings(**SETTINGS), document=doc)


@pytest.mark.integration
@pytest.mark.parametrize("holder_ends", ["writes", "is_killed"])
def test_an_entry_another_process_holds_is_waited_for(tmp_path, monkeypatch, holder_ends):
    """While another process holds an entry's lock, ensure generates only the free entries and waits; it then
    reads what the holder wrote, or, if the holder was killed without writing (kill -9), generates it itself."""
    calls: list = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    store = SurrogateStore(tmp_path / "store")
    held, write = tmp_path / "held", tmp_path / "write"
    holder = _start(HOLDER, store.root, _key(store, DOCS[0]), held, write)
    try:
        _wait_for(held, holder)
        thread, box = _ensure_in_thread(store, [DOCS[0], DOCS[1]])
        end = time.monotonic() + 20
        while not calls and time.monotonic() < end:
            time.sleep(0.02)
        thread.join(0.5)
        assert thread.is_alive() and calls == [[DOCS[1]]]  # generated the free entry, waiting for the held one
        if holder_ends == "writes":
            write.touch()
            holder.communicate(timeout=30)
        else:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
        thread.join(20)
        assert not thread.is_alive(), "ensure still waits after the holder ended"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert "error" not in box, box.get("error")
    if holder_ends == "writes":
        assert box["texts"] == ["written by the holder", f"generated:{DOCS[1][:12]}"]
        assert calls == [[DOCS[1]]]
    else:
        assert box["texts"] == [f"generated:{DOCS[0][:12]}", f"generated:{DOCS[1][:12]}"]
        assert calls == [[DOCS[1]], [DOCS[0]]]
        assert store.get(_key(store, DOCS[0])) == box["texts"][0]


def test_claims_a_bounded_number_of_entries_at_a_time(tmp_path, monkeypatch):
    """A process holds at most CLAIM_AT_MOST (or one generation batch, if larger) locks at once, generates
    those, writes them and lets go before claiming more; every lock is free afterwards."""
    calls: list = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    monkeypatch.setattr(store_module, "CLAIM_AT_MOST", 3)
    store = SurrogateStore(tmp_path)
    settings = GenerationSettings(**{**SETTINGS, "batch_size": 2})
    texts = ensure(store, None, None, model_id="m", template_name="target_question", documents=DOCS[:7],
                   settings=settings)
    assert calls == [DOCS[:3], DOCS[3:6], DOCS[6:7]]
    assert texts == [f"generated:{d[:12]}" for d in DOCS[:7]]
    for d in DOCS[:7]:
        lock = store.lock(_key(store, d))
        lock.acquire(timeout=0)  # raises Timeout if ensure left it held
        lock.release()
    calls.clear()
    settings = GenerationSettings(**{**SETTINGS, "batch_size": 5})
    ensure(store, None, None, model_id="m", template_name="target_question", documents=DOCS, settings=settings)
    assert calls == [DOCS[7:]]  # the stored ones are not generated again
    calls.clear()
    ensure(store, None, None, model_id="m2", template_name="target_question", documents=DOCS, settings=settings)
    assert calls == [DOCS[:5], DOCS[5:]]  # a generation batch larger than CLAIM_AT_MOST is claimed whole
