"""POST /v1/chat/completions and /v1/completions."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from app.auth import require_api_key
from app.generation import generate
from app.openai_schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await generate(request, body, "chat")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await generate(request, body, "text")
