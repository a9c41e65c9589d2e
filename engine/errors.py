"""Exception types raised by the engine, so callers can tell bad input from internal failures."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(EngineError):
    """Model files are missing, unreadable, or describe an architecture the engine does not run."""


class InvalidRequestError(EngineError, ValueError):
    """A prompt or sampling parameter is unusable; the message says what to change."""
