"""The web app: one page (HTML, CSS and plain JavaScript shipped in this package, no CDN) and
the JSON API behind it.

    GET  /                  the page
    GET  /api/health        {"status": "ok", "models": N}
    GET  /api/info          {"models": [model_info], "max_upload_bytes", "max_question_chars"}
    GET  /api/examples      [{"id", "question", "answer", "url"}]
    GET  /api/examples/{i}  the example's PNG
    POST /api/ask           multipart: image (file), question (text), model (optional id)
                            → inference.ask's dict, plus timing_ms.total

Every error is a JSON object {"error": "one line", "status": code} with a 4xx code for a bad
request (400 malformed, 404 unknown, 413 too large, 415 not an image or not multipart, 422
a field missing or invalid) and the server goes on serving. Uploads are read into memory with
a size bound and decoded there: nothing is written to disk, and no path a client sends is
ever opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from vlmoe.data import DataError, decode_image_bytes
from vlmoe.serve.examples import Example
from vlmoe.serve.inference import MAX_QUESTION_CHARS, ServedModel, ask, model_info

log = logging.getLogger("vlmoe.serve")

DEFAULT_MAX_UPLOAD = 4 * 1024 * 1024
#: decoded images above this many pixels are refused before decoding (a small PNG can
#: describe a huge canvas)
MAX_PIXELS = 4096 * 4096
#: room for the multipart boundaries, headers and the text fields around the image
FORM_OVERHEAD = 64 * 1024
#: bodies up to this many times the limit are read (and dropped) before the 413 is sent
DRAIN_FACTOR = 4
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}


class ApiError(Exception):
    """A bad request: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def create_app(
    models: list[ServedModel],
    examples: list[Example] | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
) -> FastAPI:
    """The app serving `models` (one, or two side by side); the first answers by default."""
    if not models:
        raise ValueError("create_app: expected at least one model")
    by_id = {m.id: m for m in models}
    info = {
        "models": [model_info(m) for m in models],
        "max_upload_bytes": max_upload_bytes,
        "max_question_chars": MAX_QUESTION_CHARS,
    }
    app = FastAPI(title="vlmoe serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_page_routes(app, examples or [])

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(models)}

    @app.get("/api/info")
    def get_info() -> dict[str, Any]:
        return info

    @app.post("/api/ask")
    async def post_ask(request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        form = await read_form(request, max_upload_bytes)
        try:
            served, image, question = await _ask_inputs(form, by_id, models[0], max_upload_bytes)
        finally:
            await form.close()
        result = await run_in_threadpool(ask, served, image, question)
        result["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        return result

    return app


def _add_page_routes(app: FastAPI, examples: list[Example]) -> None:
    """/, /static/{app.js,app.css} and the example images: all read into memory here, so
    that no name a client sends ever reaches open()."""
    files = resources.files("vlmoe.serve") / "static"
    page = (files / "index.html").read_text(encoding="utf-8")
    static = {name: (files / name).read_bytes() for name in STATIC}

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in static:
            raise ApiError(404, f"/static/{name}: no such file")
        return Response(static[name], media_type=STATIC[name])

    @app.get("/api/examples")
    def list_examples() -> list[dict[str, Any]]:
        return [
            {"id": i, "question": e.question, "answer": e.answer, "url": f"/api/examples/{i}"}
            for i, e in enumerate(examples)
        ]

    @app.get("/api/examples/{index}")
    def example_image(index: str) -> Response:
        if not index.isdigit() or int(index) >= len(examples):
            raise ApiError(404, f"example {index!r}: expected 0 to {len(examples) - 1}")
        return Response(examples[int(index)].png, media_type="image/png")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(422, f"invalid request: {e.errors()[0].get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # A bug, not a bad request: log it whole for the operator, tell the client one line.
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__})")


async def read_form(request: Request, max_upload_bytes: int) -> FormData:
    """The request's multipart form, read into memory; at most max_upload_bytes of image plus
    FORM_OVERHEAD are accepted (413 beyond, before reading the rest)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            f"expected Content-Type multipart/form-data with fields image and question, "
            f"got {ctype or 'none'!r}",
        )
    limit = max_upload_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        # far too large: answer now (the connection closes under the client's upload)
        raise ApiError(413, _too_large(int(declared), max_upload_bytes, "request"))
    body, n = bytearray(), 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > DRAIN_FACTOR * limit:
            raise ApiError(413, _too_large(n, max_upload_bytes, "request"))
        if n <= limit:
            body += chunk
    if n > limit:
        # read to the end but kept nothing: a client (a browser's fetch) that is still sending
        # when the answer comes sees a reset connection instead of this message
        raise ApiError(413, _too_large(n, max_upload_bytes, "request"))

    async def once() -> AsyncIterator[bytes]:
        yield bytes(body)

    parser = MultiPartParser(
        request.headers, once(), max_files=1, max_fields=8, max_part_size=FORM_OVERHEAD
    )
    # Starlette spools a file part over 1 MB to a temporary file; the body is already bounded
    # and in memory, so keep every part there too: an upload never touches the disk.
    parser.spool_max_size = limit
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body ({e.message})") from None
    except Exception as e:  # python-multipart raises several types on a broken body
        raise ApiError(400, f"malformed multipart body ({type(e).__name__}: {e})") from None


def _too_large(n: int, limit: int, what: str) -> str:
    return f"{what} too large: {n:,} bytes (the image may be at most {limit:,} bytes)"


async def _ask_inputs(
    form: FormData, by_id: dict[str, ServedModel], default: ServedModel, max_upload_bytes: int
) -> tuple[ServedModel, Any, str]:
    """Validate the ask form → (model, uint8 image [3, S, S], question)."""
    model_id = form.get("model") or default.id
    if not isinstance(model_id, str) or model_id not in by_id:
        raise ApiError(404, f"model {model_id!r}: expected one of {', '.join(by_id)}")
    served = by_id[model_id]
    question = form.get("question")
    if not isinstance(question, str):
        raise ApiError(422, "question: expected a text field 'question', got none")
    question = question.strip()
    if not question:
        raise ApiError(422, "question: expected a non-empty question, got an empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise ApiError(
            422, f"question: expected at most {MAX_QUESTION_CHARS} characters, got {len(question)}"
        )
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "image: expected a file field 'image', got none")
    data = await upload.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise ApiError(413, _too_large(upload.size or len(data), max_upload_bytes, "image"))
    if not data:
        raise ApiError(422, "image: expected an image file, got an empty file")
    name = f"image {upload.filename!r}" if upload.filename else "image"
    try:
        image = decode_image_bytes(data, served.image_size, name=name, max_pixels=MAX_PIXELS)
    except DataError as e:
        status = 413 if "too large" in str(e) else 415
        raise ApiError(status, str(e)) from None
    return served, image, question
