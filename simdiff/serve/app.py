"""The ``simdiff serve`` ASGI application (Starlette): one page, a JSON API, sampling in worker threads.

Routes (every one fixed; no route maps a request path or parameter onto the filesystem):

- ``GET /``, ``/app.js``, ``/style.css``: the page (package data in ``simdiff/serve/static/``).
- ``GET /api/models``: the models this server samples (by id), the sampler and grid names, the limits.
- ``POST /api/sample``: a JSON object of parameters (:data:`simdiff.serve.models.PARAMS`) -> 202 ``{"id", ...}``;
  a bad parameter -> 400 ``{"error": <one line naming it>, "param": <its name>}``; an unknown model -> 404; the
  model's queue full -> 429 with ``Retry-After``.
- ``GET /api/jobs/{id}``: status, progress (``done`` / ``total`` network calls), queue position, the image URL once
  done, or the error.
- ``GET /api/jobs/{id}/image.png``: the job's PNG grid.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simdiff.generate import SEED_LIMIT
from simdiff.samplers import GRID_KINDS, SAMPLERS
from simdiff.serve.jobs import Job, JobStore, ModelWorker, QueueFull
from simdiff.serve.models import Limits, ModelEntry, ParamError, parse_request

__all__ = ["create_app", "MAX_BODY"]

#: the largest request body read (bytes); a sample request is a few hundred.
MAX_BODY = 16_384
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/style.css": ("style.css", "text/css; charset=utf-8")}
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "param": param}, status_code=status, headers={**_HEADERS, **(headers or {})})


def _static(name: str) -> bytes:
    try:
        return resources.files("simdiff.serve").joinpath("static", name).read_bytes()
    except FileNotFoundError:
        raise RuntimeError(f"simdiff/serve/static/{name} is missing from this installation (the package data of "
                           f"simdiff serve); reinstall simdiff") from None


def create_app(entries: list[ModelEntry], *, limits: Limits = Limits(), device: torch.device | str = "cpu",
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app serving ``entries`` (and nothing else) on ``device``.

    Args:
        entries: the models, each chosen by its ``id`` (ids must be distinct).
        limits: images and steps per request, waiting requests per model.
        allowed_hosts: when given, requests whose ``Host`` header names another host are refused (400), which
            keeps a web page on another site from reaching a loopback server through DNS rebinding.
    """
    by_id = {e.id: e for e in entries}
    if len(by_id) != len(entries):
        raise ValueError("model ids must be distinct")
    if not entries:
        raise ValueError("simdiff serve needs at least one model")
    workers = {e.id: ModelWorker(e, max_queue=limits.max_queue, device=device) for e in entries}
    store = JobStore()
    pages = {path: (_static(name), media) for path, (name, media) in _STATIC.items()}

    async def page(request: Request) -> Response:
        body, media = pages[request.url.path]
        return Response(body, media_type=media, headers={**_HEADERS, "Cache-Control": "no-cache"})

    async def models(request: Request) -> Response:
        doc: dict[str, Any] = {"models": [e.info() for e in entries], "samplers": sorted(SAMPLERS),
                               "grids": sorted(GRID_KINDS), "device": str(device),
                               "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps,
                                          "max_queue": limits.max_queue, "seed_limit": SEED_LIMIT}}
        return JSONResponse(doc, headers=_HEADERS)

    async def sample(request: Request) -> Response:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return _error(413, f"the request body is larger than {MAX_BODY} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                return _error(413, f"the request body is larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        try:
            req = parse_request(body, by_id, limits)
        except ParamError as e:
            return _error(e.status, str(e), e.param)
        job = Job(req)
        try:
            ahead = workers[req.entry.id].submit(job)
        except QueueFull as e:
            return _error(429, str(e), headers={"Retry-After": "2"})
        store.add(job)
        return JSONResponse(job.to_json(ahead), status_code=202, headers=_HEADERS)

    def _job(request: Request) -> Job | None:
        return store.get(request.path_params["job_id"])

    async def job_status(request: Request) -> Response:
        job = _job(request)
        if job is None:
            return _error(404, "unknown job (finished jobs are kept for a while only)")
        return JSONResponse(job.to_json(workers[job.request.entry.id].position(job)), headers=_HEADERS)

    async def job_image(request: Request) -> Response:
        job = _job(request)
        if job is None:
            return _error(404, "unknown job (finished jobs are kept for a while only)")
        if job.png is None:
            return _error(409, f"job {job.id} has no image yet (status {job.status})")
        return Response(job.png, media_type="image/png", headers={**_HEADERS, "Cache-Control": "max-age=3600"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        for w in workers.values():  # waiting jobs are dropped; a running one finishes in its (daemon) thread
            w.close(timeout=0.0)

    routes = [Route(path, page) for path in _STATIC]
    routes += [Route("/api/models", models), Route("/api/sample", sample, methods=["POST"]),
               Route("/api/jobs/{job_id:str}", job_status), Route("/api/jobs/{job_id:str}/image.png", job_image)]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.workers, app.state.jobs, app.state.entries = workers, store, by_id
    return app
