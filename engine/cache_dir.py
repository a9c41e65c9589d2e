"""Where ConServe keeps what it derives from models and reuses across runs (profiles, converted tokenizers)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "conserve"
