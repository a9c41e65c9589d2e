"""The gateway's side of the worker's internal stream: open a generation on a worker (trying another when one
cannot be reached) and read its events, turning a vanished worker into an error instead of a hang."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.errors import OpenAIError, upstream_error
from app.worker_router import WorkerRouter, WorkerView

# A request tries at most this many workers when connections fail before any output.
MAX_ATTEMPTS = 3


class WorkerLost(Exception):
    """The worker went away (or failed the request) after the response had started."""


class WorkerStream:
    """One generation running on one worker. Use `async with`; leaving it closes the connection, which
    makes the worker abort the request if it is still running."""

    def __init__(self, router: WorkerRouter, worker: WorkerView, response: httpx.Response):
        self.router = router
        self.worker = worker
        self.response = response
        self._closed = False

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The worker's events up to the finished one; WorkerLost if the stream breaks or ends early."""
        try:
            async for line in self.response.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if "error" in event:
                    raise WorkerLost(f"the engine failed this request: {event['error']}")
                yield event
                if event.get("finished"):
                    return
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            self.router.suspect(self.worker)
            raise WorkerLost(f"lost the connection to worker {self.worker.id}: {type(exc).__name__}") from exc
        self.router.suspect(self.worker)
        raise WorkerLost(f"worker {self.worker.id} ended the stream before the request finished")

    async def __aenter__(self) -> "WorkerStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.response.aclose()
        finally:
            self.router.release(self.worker)


async def open_generation(client: httpx.AsyncClient, router: WorkerRouter, model: str, payload: dict[str, Any],
                          headers: dict[str, str]) -> WorkerStream:
    """Start the generation on the least-loaded worker of `model`. The worker's own 4xx answers (a prompt
    over the context, say) come back as OpenAIError with its message."""
    tried: set[str] = set()
    last_failure = ""
    for _ in range(MAX_ATTEMPTS):
        try:
            worker = await router.choose(model, exclude=tried)
        except OpenAIError:
            if tried:  # every worker we could find failed to connect
                break
            raise
        tried.add(worker.id)
        router.acquire(worker)
        try:
            request = client.build_request("POST", f"{worker.url}/internal/generate", json=payload, headers=headers)
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            router.release(worker)
            router.suspect(worker)
            last_failure = f"{worker.id}: {type(exc).__name__}"
            continue
        except BaseException:
            router.release(worker)
            raise
        if response.status_code != 200:
            try:
                body = json.loads(await response.aread())
                error = body["error"]
            except (ValueError, KeyError, TypeError, httpx.TransportError):
                error = {"message": f"worker {worker.id} answered HTTP {response.status_code}",
                         "type": "server_error"}
            finally:
                await response.aclose()
                router.release(worker)
            # Only the worker's 400 is the client's fault; anything else (a wrong internal token, a crash) is ours.
            status = 400 if response.status_code == 400 else 502
            raise OpenAIError(error.get("message", "worker error"), status_code=status,
                              type=error.get("type", "server_error"), param=error.get("param"),
                              code=error.get("code"))
        return WorkerStream(router, worker, response)
    raise upstream_error(f"no worker of '{model}' could be reached ({last_failure}); retry shortly",
                         status_code=503)
