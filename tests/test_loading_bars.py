"""progress=false silences transformers' weight-loading bars for the run, and leaves the switch as it was."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from kvprime.config.compose import compose
from kvprime.models import loading


def test_loading_bars_are_switched_for_the_block_and_restored():
    hf_logging.enable_progress_bar()
    with loading.loading_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with loading.loading_bars(True):
            assert hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.slow
def test_a_real_model_loads_without_a_bar_when_progress_is_off(capfd):
    cfg = compose([])["model"]  # the packaged SmolLM2
    hf_logging.enable_progress_bar()
    with loading.loading_bars(False):
        loading.load(cfg)
    assert "Loading weights" not in capfd.readouterr().err
    loading.load(cfg)  # the bars are back outside the block: the check above can fail
    assert "Loading weights" in capfd.readouterr().err
