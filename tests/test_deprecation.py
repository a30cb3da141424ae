"""The one helper behind every renamed keyword argument."""

from __future__ import annotations

import warnings

import pytest

from hub_dfq.deprecation import MovedInto, renamed_arguments
from hub_dfq.errors import ArgumentTypeError


@renamed_arguments(n="num_images", reconstruct_config=MovedInto("settings", "reconstruct"))
def make(model: str, num_images: int = 256, *, settings: dict | None = None) -> tuple:
    return model, num_images, settings


def test_an_old_name_warns_once_and_maps_to_the_new_one():
    with pytest.warns(FutureWarning) as caught:
        assert make("m", n=8) == ("m", 8, None)
    assert [str(w.message) for w in caught] == ["`n` is deprecated: use `num_images`"]
    assert caught[0].filename == __file__  # points at the caller's line
    with pytest.warns(FutureWarning, match=r"use `settings=\{'reconstruct': \.\.\.\}`"):
        assert make("m", reconstruct_config=1, settings={"distill": 2}) == ("m", 256, {"distill": 2, "reconstruct": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make("m", 4, settings={"x": 1}) == ("m", 4, {"x": 1})  # new names: no warning


@pytest.mark.parametrize("call", [lambda: make("m", 4, n=8), lambda: make("m", num_images=4, n=8),
                                  lambda: make("m", reconstruct_config=1, settings={"reconstruct": 2})],
                         ids=["positional", "keyword", "moved"])
def test_old_and_new_name_together_is_one_clear_error(call):
    with pytest.raises(ArgumentTypeError, match=r"^make\(\) got both `\w+` \(deprecated\) and `.+`: pass only"):
        call()


def test_a_rename_to_a_missing_argument_fails_when_decorating():
    with pytest.raises(TypeError, match="no argument 'num'"):
        renamed_arguments(n="num")(make.__wrapped__)
