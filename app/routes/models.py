"""GET /v1/models: the models that alive workers serve right now."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from app.auth import require_api_key
from app.errors import model_not_found
from app.openai_schemas import model_card, model_list

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return model_list(await request.app.state.router.models(), request.app.state.started)


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    if model_id not in await request.app.state.router.models():
        raise model_not_found(model_id)
    return model_card(model_id, request.app.state.started)
