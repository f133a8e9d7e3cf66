"""Every example in a docstring of vaegan and its first-party plugins runs and shows what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
import vaegan_plugins

import vaegan

MODULES = sorted(
    name for package in (vaegan, vaegan_plugins)
    for name in [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": torch.nn}, optionflags=doctest.ELLIPSIS,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"
