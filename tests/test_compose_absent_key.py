"""A key kvprime reads that the composed config leaves out (exp21 sets no experiment.analyses) is refused with the
way that works, +key=value, which then composes; a misspelt key is still refused, saying that "+" is refused too."""

import pytest

from kvprime.config.compose import compose
from kvprime.errors import ConfigError


def test_a_known_key_the_config_leaves_out_is_refused_with_the_plus_that_adds_it():
    with pytest.raises(ConfigError) as err:
        compose(["experiment=exp21", "experiment.analyses=[accuracy_by_position]"])
    message = str(err.value)
    assert "add it with +experiment.analyses=[accuracy_by_position]" in message and "refused too" not in message
    cfg = compose(["experiment=exp21", "+experiment.analyses=[accuracy_by_position]"])
    assert list(cfg["experiment"]["analyses"]) == ["accuracy_by_position"]


def test_a_misspelt_key_is_still_refused_saying_that_plus_is_refused_too():
    with pytest.raises(ConfigError, match=r"\+dataset.n_sample=3 is refused too.*Did you mean dataset.n_samples"):
        compose(["dataset.n_sample=3"])
