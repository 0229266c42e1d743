"""Jobs: a pipeline run in the background, its status, progress events and result."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.common import imageio
from services.common.steps import parse_steps

from ..core import Gateway, output_bytes
from ..deps import PROTECTED, gateway
from ..errors import HttpError
from ..fields import IMAGE_TYPES, OUTPUT, PROCESSING_ERRORS, STEPS, errors, image_body, json_answer
from ..jobs import FINISHED, Job

router = APIRouter(tags=["jobs"], dependencies=PROTECTED)
EVENT_KEEPALIVE_SECONDS = 15
# While a job runs with no change (inside one tile), a progress event this often: its fraction and eta move.
PROGRESS_TICK_SECONDS = 1.0
JOB_SCHEMA = {
    "type": "object",
    "required": ["id", "status", "status_url"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
        "status_url": {"type": "string"},
        "progress": {
            "type": "object",
            "description": "tiles_done, tiles_total, and fraction: done so far, moving inside a tile too",
        },
        "eta_seconds": {
            "type": ["number", "null"],
            "description": "seconds left of its run (from the tiles done so "
            "far, before the first from the services' measured speeds); null when unknown",
        },
        "estimated_seconds": {"type": "number", "description": "its run's length estimated at submission (0: none)"},
        "steps": {"type": "array"},
        "attempts": {
            "type": "integer",
            "description": "runs started (a run is started again once if the gateway replica running it stops)",
        },
        "timings_ms": {"type": "object"},
        "result_url": {"type": "string"},
        "expires_at": {"type": "string"},
        "error": {"type": "object"},
    },
}


# One server-sent event (keep-alive comments aside).
EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["progress", "done", "failed"]},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": JOB_SCHEMA},
    },
}


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Start a pipeline as a job (the body of /v1/process): checked along the whole chain, then its id at once",
    openapi_extra={"requestBody": image_body({"steps": STEPS, **OUTPUT}, ("steps",))},
    responses={202: json_answer("the job: {id, status, status_url}", JOB_SCHEMA), **errors(*PROCESSING_ERRORS)},
)
async def submit_job(request: Request, gw: Gateway = Depends(gateway)):
    req = await gw.read(request)
    steps = parse_steps(req.fields)
    fmt, quality = gw.output_options(req.fields)
    image, _ = await gw.decode(req.data)
    result = await gw.mesh.validate(image, steps)  # refused now for anything /v1/process would refuse
    needs = imageio.decoded_bytes(req.data, gw.config.max_input_pixels) + output_bytes(result.image)
    if needs > gw.budget.limit:
        raise HttpError(
            413,
            "too_large_for_gateway",
            f"this job needs {needs} bytes of decoded pixels; the "
            f"gateway holds at most {gw.budget.limit} (GATEWAY_MAX_PIXEL_BYTES)",
        )
    estimated = await gw.estimate_seconds(image, result.steps)
    del image  # the queue keeps the upload, decoded again when the job runs
    job = await gw.jobs.submit(req.data, steps, fmt, quality, needs, estimated)
    status_url = f"{base_url(request)}/v1/jobs/{job.id}"
    return JSONResponse(
        {"id": job.id, "status": job.status, "status_url": status_url},
        status_code=202,
        headers={"Location": status_url},
    )


@router.get(
    "/v1/jobs/{job_id}",
    summary="A job's status, progress, timings and, when done, result_url",
    responses={200: json_answer("the job", JOB_SCHEMA), **errors(401, 404, 429)},
)
async def job_status(job_id: str, request: Request, gw: Gateway = Depends(gateway)):
    return (await gw.jobs.get(job_id)).view(base_url(request))


@router.get(
    "/v1/jobs/{job_id}/events",
    summary="Server-sent events: `progress` at each change and every second while it runs, then `done` or `failed`",
    response_class=Response,
    responses={
        200: {
            "description": "an event stream; each event's data is the job as JSON",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        },
        **errors(401, 404, 429),
    },
)
async def job_events(job_id: str, request: Request, gw: Gateway = Depends(gateway)):
    changes = gw.jobs.watch(job_id, PROGRESS_TICK_SECONDS)
    first = await anext(changes)  # 404 here, before the stream starts, for an unknown job
    root = base_url(request)

    async def stream():
        latest: Job | None = first
        quiet = 0.0
        async for job in prepend(first, changes):
            if job is None:
                quiet += PROGRESS_TICK_SECONDS
                if latest is not None and latest.status == "running":
                    yield f"event: progress\ndata: {json.dumps(latest.view(root))}\n\n"
                elif quiet >= EVENT_KEEPALIVE_SECONDS:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                continue
            latest, quiet = job, 0.0
            event = job.status if job.status in FINISHED else "progress"
            yield f"event: {event}\ndata: {json.dumps(job.view(root))}\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get(
    "/v1/jobs/{job_id}/result",
    summary="The finished image",
    response_class=Response,
    responses={200: {"description": "the image", "content": IMAGE_TYPES}, **errors(401, 404, 409, 429)},
)
async def job_result(job_id: str, gw: Gateway = Depends(gateway)):
    job = await gw.jobs.get(job_id)
    if job.status != "done" or job.result is None:
        raise HttpError(409, "job_not_done", f"the job is {job.status}")
    return await gw.stored_response(
        job.result.file_id, HttpError(404, "result_expired", "the job's result has expired")
    )


async def prepend(first, rest):
    yield first
    async for item in rest:
        yield item
