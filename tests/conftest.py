import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tok():
    from kvprime.cache.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_engine(tiny_tok):
    from kvprime.builders.engine import Engine
    from kvprime.cache.tiny import tiny_model

    return Engine(tiny_model("llama", vocab_size=len(tiny_tok)), tiny_tok)


@pytest.fixture(scope="session")
def tiny_exp01_run(tmp_path_factory):
    """One exp01 run of the tiny random model on 4 samples (surrogates generated into a private store), shared by
    the test modules that read a finished run; a test that changes it works on a copy."""
    from kvprime.config.compose import compose
    from kvprime.pipeline import runner

    tmp = tmp_path_factory.mktemp("tiny_exp01")
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city | of France and into the "
                                       f"sea near the tower {i}.\nBoats carry grain along it.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(4)]
    data = tmp / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["experiment=exp01", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}",
                   "stats.n_boot=1000", "progress=false", "generation.max_new_tokens=6", "generation.model=null",
                   f"generation.store={tmp / 'store'}"])
    out = tmp / "run"
    runner.run_experiment(cfg, out)
    return out
