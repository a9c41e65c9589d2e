"""ConServe's co-serving engine: a Llama-family model on a paged KV cache with continuous batching."""
from engine.config import EngineConfig
from engine.engine import Engine, EngineStats
from engine.errors import EngineError, InvalidRequestError, ModelLoadError
from engine.output import RequestFailedError, RequestOutput, RequestStream
from engine.request import RequestClass
from engine.sampling_params import SamplingParams

__all__ = [
    "Engine", "EngineConfig", "EngineStats", "EngineError", "InvalidRequestError", "ModelLoadError",
    "RequestClass", "RequestFailedError", "RequestOutput", "RequestStream", "SamplingParams",
]
