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
    from kvprime.cache.engine import Engine
    from kvprime.cache.tiny import tiny_model

    return Engine(tiny_model("llama", vocab_size=len(tiny_tok)), tiny_tok)
