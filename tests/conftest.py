"""Fixtures for the library's own tests: small randomly initialised models (``builders``)."""

from __future__ import annotations

import os

import pytest
from builders import make_gpt2, make_mamba, wrap

from neuronspec.models.registry import LoadedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(params=["gpt2", "mamba"])
def family(request) -> str:
    return request.param


@pytest.fixture
def random_model(family) -> LoadedModel:
    return wrap(make_gpt2() if family == "gpt2" else make_mamba(), f"random-{family}")
