"""``POST /v1/images/generations``: the OpenAI Images API subset (b64_json or url). On a text model
the prompt is the prompt (and ``negative_prompt`` an extension); on a class model it names the
class."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, Field

from model.errors import FieldError
from service.api.auth import CallerDep
from service.api.deps import ClientGoneDep, ServiceDep, prompt_fields
from service.api.files import result_urls
from service.messages import JobRequest, ResponseFormat
from service.request import PROMPT_RESULT_FIELDS, NegativePrompt, Prompt

router = APIRouter(prefix="/v1", tags=["openai"])


class OpenAIImageRequest(BaseModel):
    model_config = {"extra": "forbid"}

    prompt: Prompt = Field(
        ..., description="Text models: the prompt. Class models: a class label or name."
    )
    negative_prompt: NegativePrompt | None = Field(
        None, description="Extension, text models: what guidance steers away from."
    )
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    size: str | None = Field(None, description="WxH; must be the model's size")
    response_format: ResponseFormat = Field(
        "b64_json", description="b64_json: the image in the answer; url: a signed URL to it"
    )


@router.post("/images/generations", summary="OpenAI Images API subset (b64_json or url)")
async def openai_images(
    body: OpenAIImageRequest,
    http: Request,
    svc: ServiceDep,
    caller: CallerDep,
    gone: ClientGoneDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    info = svc.openai_model(body.model, "image", body.prompt)
    side = info.image_size
    if body.size is not None and body.size != f"{side}x{side}":
        raise FieldError("size", f"this model makes {side}x{side} images, got {body.size!r}")
    request = JobRequest(
        model=info.name,
        num_images=body.n,
        timeout_s=svc.settings.default_timeout_s,
        response_format=body.response_format,
        **prompt_fields(info, body.prompt, body.negative_prompt),
    )
    # Waits; a client that disconnects first cancels the job (SKIPDIT_CANCEL_ON_DISCONNECT).
    record, result = await svc.submit_and_wait(request, idempotency_key, caller, gone)
    if body.response_format == "url":
        data = [{"url": url} for url in result_urls(svc, http, record, len(result.images))["urls"]]
    else:
        data = [{"b64_json": base64.b64encode(i).decode()} for i in result.images]
    return {
        "created": int(record.created_at),
        "data": data,
        # Text models: the prompt's tokens and whether the encoder cut it (an extension).
        **{k: v for k, v in result.meta.items() if k in PROMPT_RESULT_FIELDS},
    }
