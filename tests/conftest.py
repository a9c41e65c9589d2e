"""Fixtures shared across test packages: the bundled model, loaded once per session because it takes seconds."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def bundled_model():
    import torch

    from engine.loader import load_model

    return load_model(None, torch.float32)
