"""Online generation through the gateway: the OpenAI request goes to a worker, the worker's events come back
as OpenAI's completion objects or server-sent chunks. Used by /v1/chat/completions and /v1/completions."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from app import openai_schemas as oa
from app.errors import SERVER_ERROR, error_body, upstream_error
from app.openai_schemas import ChatCompletionRequest, CompletionRequest
from app.worker_client import WorkerLost, WorkerStream, open_generation

log = logging.getLogger(__name__)
Kind = Literal["chat", "text"]


async def generate(request: Request, body: ChatCompletionRequest | CompletionRequest, kind: Kind) -> Response:
    state = request.app.state
    completion_id = oa.new_completion_id(kind)
    payload = {"request_id": completion_id, "prompt": body.engine_prompt(), "params": body.sampling_params(),
               "request_class": "online"}
    headers = {"x-conserve-internal-token": state.settings.internal_token} if state.settings.internal_token else {}
    timer = state.request_metrics.timer(body.model, "online")
    stream = await open_generation(state.http, state.router, body.model, payload, headers)
    created = oa.now()
    if body.stream:
        return StreamingResponse(_sse(stream, body, kind, completion_id, created, timer),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _until_done_or_gone(request, _complete(stream, body, kind, completion_id, created, timer))


async def _complete(stream: WorkerStream, body, kind: Kind, completion_id: str, created: int, timer) -> Response:
    parts: list[str] = []
    async with stream:
        try:
            async for event in stream.events():
                timer.tokens_arrived(len(event["token_ids"]))
                parts.append(event["delta"])
                if event["finished"]:
                    timer.finished(event["finish_reason"], event["prompt_tokens"])
                    usage = oa.usage(event["prompt_tokens"], event["completion_tokens"])
                    build = oa.chat_completion if kind == "chat" else oa.text_completion
                    return JSONResponse(build(completion_id, body.model, created, "".join(parts),
                                              event["finish_reason"], usage))
        except WorkerLost as exc:
            timer.finished("abort", 0)
            log.warning("request %s: %s", completion_id, exc)
            raise upstream_error(f"the worker serving this request failed ({exc}); retry the request",
                                 status_code=503) from exc
    raise AssertionError("unreachable: events() ends with a finished event or raises")


async def _until_done_or_gone(request: Request, work) -> Response:
    """Run a non-streaming request, abandoning it (which aborts it on the worker) as soon as the client
    disconnects: nobody would read the answer, and its engine slot is better spent on someone who will."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(stream: WorkerStream, body, kind: Kind, completion_id: str, created: int,
               timer) -> AsyncIterator[str]:
    include_usage = body.include_usage()
    first = True
    async with stream:  # leaving it (including when the client disconnects) aborts the request on the worker
        try:
            async for event in stream.events():
                timer.tokens_arrived(len(event["token_ids"]))
                text = event["delta"]
                finished = event["finished"]
                reason = event.get("finish_reason") if finished else None
                if kind == "chat":
                    if first or text:
                        yield _data(oa.chat_chunk(completion_id, body.model, created, content=text, first=first,
                                                  include_usage=include_usage))
                        first = False
                    if finished:
                        yield _data(oa.chat_chunk(completion_id, body.model, created, finish_reason=reason,
                                                  include_usage=include_usage))
                elif text or finished:
                    yield _data(oa.text_completion_chunk(completion_id, body.model, created, text=text,
                                                         finish_reason=reason, include_usage=include_usage))
                if finished:
                    timer.finished(reason, event["prompt_tokens"])
                    if include_usage:
                        usage = oa.usage(event["prompt_tokens"], event["completion_tokens"])
                        build = oa.chat_usage_chunk if kind == "chat" else oa.text_completion_usage_chunk
                        yield _data(build(completion_id, body.model, created, usage))
            yield "data: [DONE]\n\n"
        except WorkerLost as exc:
            # Headers are long gone: the error travels as an event, which OpenAI's SDKs raise as APIError.
            log.warning("stream %s: %s", completion_id, exc)
            yield _data(error_body(f"the worker serving this request failed ({exc}); retry the request",
                                   SERVER_ERROR, code="worker_lost"))
        finally:
            if not timer.done:  # the client left, or the worker failed: not a success of any kind
                timer.finished("abort", 0)


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
