"""What the engine hands back for a request, and the stream that carries it from the engine thread to a caller."""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from engine.errors import EngineError


class RequestFailedError(EngineError):
    """The engine could not finish a request (for example the step computing it raised)."""


@dataclass
class RequestMetrics:
    """Seconds, derived from the request's event timestamps."""
    queued: float            # arrival -> first scheduled
    time_to_first_token: float | None
    e2e: float               # arrival -> finished
    num_preemptions: int


@dataclass
class RequestOutput:
    request_id: str
    delta: str                          # text produced since the previous output
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None    # "stop", "length" or "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Set on the final output only: the whole generated text and token ids, and timings.
    text: str | None = None
    token_ids: list[int] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None


class RequestStream:
    """Outputs of one request, in order. Iterate it with `async for` inside an event loop, or with a plain
    `for` from a thread; the engine thread pushes without waiting on the consumer."""

    def __init__(self, request_id: str, on_cancel: Callable[[str], None]):
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._items: deque[RequestOutput] = deque()
        self._cond = threading.Condition()
        self._done = False
        self._finished = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._event: asyncio.Event | None = asyncio.Event() if self._loop else None

    @property
    def finished(self) -> bool:
        """Whether the engine has put the final output (consumed or not)."""
        return self._finished

    def put(self, output: RequestOutput) -> None:
        with self._cond:
            self._finished = self._finished or output.finished
            self._items.append(output)
            self._cond.notify()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:
                pass  # the consumer's loop has closed; nobody is listening any more

    def cancel(self) -> None:
        """Abort the request in the engine (e.g. the client went away)."""
        if not self._done:
            self._on_cancel(self.request_id)

    def _pop(self) -> RequestOutput:
        out = self._items.popleft()
        if out.finished:
            self._done = True
            if out.error is not None:
                raise RequestFailedError(out.error)
        return out

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> RequestOutput:
        if self._done:
            raise StopIteration
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._pop()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._event is None:
            raise RuntimeError("this stream was created outside an event loop; iterate it with a plain for")
        while True:
            with self._cond:
                if self._items:
                    return self._pop()
                self._event.clear()
            await self._event.wait()

    def final(self) -> RequestOutput:
        """Block until the request finishes and return its final output."""
        last = None
        for last in self:
            pass
        if last is None:
            raise RequestFailedError(f"request {self.request_id} produced no output")
        return last
