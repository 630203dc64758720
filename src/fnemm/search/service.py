"""The retrieval service: a FastAPI app over one :class:`~fnemm.search.gallery.Gallery`, and its page.

    POST /search/text    {"query": "a dog runs on the beach", "k": 10}  -> images
    POST /search/image   multipart: file=<photo>, k=10                  -> captions
    POST /search/similar multipart: file=<photo> or image=<id>, k=10    -> images like it
    GET  /images/{id}    a JPEG thumbnail of a gallery image (?size=256)
    GET  /healthz        what is loaded
    GET  /               the search page;  /docs, /redoc, /openapi.json: the API

The gallery is loaded once (``create_app(gallery)``) and reaches the routes through a
dependency (``get_gallery``). Routes only translate HTTP to gallery calls: the
gallery checks every query and raises ``FnemmError`` subclasses, which one exception
handler answers with their status and ``{"error": "one line"}``. Handlers are plain
functions run in FastAPI's thread pool, so requests proceed concurrently (searches
only read; the CNN takes turns; image decoding is bounded, see ``DECODES``).
"""

# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import asyncio
import logging
import os
import socket
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException

from fnemm.features.encode import decode_upload
from fnemm.io.errors import FnemmError, TooLarge
from fnemm.search.gallery import MAX_K, Gallery
from fnemm.search.schemas import (CaptionResults, SimilarResults, TextQuery, TextResults,
                                  errors)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# A client gets this long to send a request's headers, and this long between two parts
# of its body (seconds): a connection that trickles bytes (slowloris) is closed, and
# the body's wait answered with 408, instead of holding a connection forever.
HEADER_TIMEOUT = float(os.environ.get("FNEMM_HEADER_TIMEOUT", "10"))
BODY_TIMEOUT = float(os.environ.get("FNEMM_BODY_TIMEOUT", "30"))
# and the whole body, however it trickles in (a byte every few seconds never stalls long)
BODY_DEADLINE = float(os.environ.get("FNEMM_BODY_DEADLINE", "120"))
DEFAULT_THUMB = 256
# Decoded photos at once: a 50-megapixel RGBA upload decodes to ~200 MB, so the thread
# pool's 40 workers must not all decode together.
DECODES = threading.BoundedSemaphore(2)

log = logging.getLogger("fnemm.search.service")


# --- dependencies and helpers ------------------------------------------------------------

def get_gallery(request: Request) -> Gallery:
    return request.app.state.gallery


def upload_limit(request: Request) -> int:
    return request.app.state.max_upload_bytes


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.3g} MiB"


def url(image_id: str) -> str:
    return "/images/" + quote(image_id, safe="")


def with_urls(hits) -> list[dict]:
    return [{**h.to_dict(), "url": url(h.image)} for h in hits]


def read_upload(file: UploadFile, limit: int):
    """The uploaded photo, decoded (bounded in size, bytes and concurrent decodes)."""
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{file.filename}: upload over {mib(limit)}; send a smaller photo")
    with DECODES:
        return decode_upload(data, file.filename or "upload")


def took(t: float) -> float:
    return round(1000 * (time.perf_counter() - t), 2)


# --- the routes ----------------------------------------------------------------------------

class AnyId(Convertor):
    """An image id as it is: any characters, slashes and newlines too (Starlette's
    ``path`` stops at a newline, and an id is a file name)."""
    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anyid", AnyId())
router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page():
    return HTMLResponse(resources.files("fnemm.search").joinpath("web/index.html").read_text(encoding="utf-8"))


@router.get("/healthz", summary="what the service has loaded")
def healthz(gallery: Gallery = Depends(get_gallery)):
    return {"status": "ok", **gallery.info()}


@router.post("/search/text", response_model=TextResults, summary="a sentence -> the images that fit it",
             responses=errors({422: "empty, overlong or invalid query, k out of range, not JSON"}))
def search_text(body: TextQuery, gallery: Gallery = Depends(get_gallery)):
    t = time.perf_counter()
    hits = gallery.text(body.query, body.k)
    return {"query": body.query.strip(), "unknown_words": gallery.unknown_words(body.query),
            "results": with_urls(hits), "took_ms": took(t)}


@router.post("/search/image", response_model=CaptionResults, summary="a photo -> the captions that fit it",
             responses=errors({409: "the gallery has no captions, or cannot embed new photos",
                               413: "upload too big (bytes or pixels)", 415: "not an image",
                               422: "empty upload, no file, k out of range"}))
def search_image(file: UploadFile = File(..., description="a JPEG/PNG/... photo"),
                 k: int = Form(10, description=f"how many captions, 1 to {MAX_K}"),
                 gallery: Gallery = Depends(get_gallery), limit: int = Depends(upload_limit)):
    t = time.perf_counter()
    hits = gallery.image(read_upload(file, limit), k, files=False)
    return {"results": with_urls(hits), "took_ms": took(t)}


@router.post("/search/similar", response_model=SimilarResults, summary="a photo or a gallery image -> "
                                                                        "the gallery images most like it",
             responses=errors({404: "no such image id", 409: "the gallery cannot embed new photos",
                               413: "upload too big (bytes or pixels)", 415: "not an image",
                               422: "neither or both of file and image, k out of range"}))
def search_similar(file: Optional[UploadFile] = File(None, description="a photo"),  # noqa: UP007 (FastAPI)
                   image: Optional[str] = Form(None, description="or the id of a gallery image"),  # noqa: UP007
                   k: int = Form(10, description=f"how many images, 1 to {MAX_K}"),
                   gallery: Gallery = Depends(get_gallery), limit: int = Depends(upload_limit)):
    if (file is None) == (image is None):
        raise FnemmError("send either file=<photo> or image=<id of a gallery image>")
    t = time.perf_counter()
    hits = gallery.similar(image if image is not None else read_upload(file, limit), k, files=False)
    return {"results": with_urls(hits), "took_ms": took(t)}


@router.get("/images/{image_id:anyid}", summary="a JPEG thumbnail of a gallery image",
            responses={200: {"content": {"image/jpeg": {}}},
                       **errors({404: "no such image, or its file is missing", 422: "size out of range"})})
def thumbnail(image_id: str, size: int = Query(DEFAULT_THUMB, description="longest side in pixels"),
              gallery: Gallery = Depends(get_gallery)):
    return Response(gallery.thumbnail(image_id, size), media_type="image/jpeg",
                    headers={"Cache-Control": "public, max-age=86400"})


# --- errors --------------------------------------------------------------------------------

async def fnemm_error(request: Request, exc: FnemmError):
    return JSONResponse({"error": str(exc), **getattr(exc, "details", {})}, status_code=exc.status)


async def http_error(request: Request, exc: HTTPException):
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "form", "header"):
            where = ".".join(str(x) for x in loc[1:]) or "body"
        else:
            where = ".".join(str(x) for x in loc) or "request"
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON; send {\"query\": \"...\", \"k\": 10}")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)


async def internal_error(request: Request, exc: Exception):
    log.exception("internal error on %s", request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with a 413
    before it is stored: at once when its Content-Length says so, else (chunked) as
    soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"request body over {mib(self.limit)}; send a smaller photo"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"error": self._message()}, status_code=413)(scope, receive, send)
        seen, complete = 0, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_DEADLINE

        async def limited():
            nonlocal seen, complete
            if complete:                  # the body is in: what remains is waiting for a disconnect
                return await receive()
            left = deadline - loop.time()
            if left <= 0:
                raise HTTPException(status_code=408, detail=f"the request body took over {BODY_DEADLINE:g} s; "
                                                            f"send it again, faster")
            try:
                message = await asyncio.wait_for(receive(), min(BODY_TIMEOUT, left))
            except asyncio.TimeoutError:
                why = f"stalled for {BODY_TIMEOUT:g} s" if BODY_TIMEOUT <= left else f"took over {BODY_DEADLINE:g} s"
                raise HTTPException(status_code=408, detail=f"the request body {why}; send it again") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, limited, send)


def header_timeout_protocol():
    """uvicorn's h11 protocol, with a deadline for each request's headers (HEADER_TIMEOUT
    from the connection's start, or from the previous response): uvicorn has none, so a
    client sending a byte now and then would keep its connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._waiting_for = self.cycle          # headers arrive when a new cycle starts
            self._deadline = self.loop.call_later(HEADER_TIMEOUT, self._too_slow)

        def _too_slow(self):
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data):
            super().data_received(data)
            if self.cycle is not self._waiting_for and self._deadline is not None:
                self._deadline.cancel()              # the headers are in
                self._deadline = None

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()                          # the next request on this connection

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return HeaderTimeout


def create_app(gallery: Gallery, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The ASGI app serving ``gallery`` (already loaded)."""
    try:                                   # /docs from Swagger UI files in the package, no CDN
        from fastapi_offline import FastAPIOffline as make_app
    except ImportError:
        make_app = FastAPI
    app = make_app(title="fnemm retrieval service",
                   description="Image-caption retrieval with a Full-Network Embedding model: "
                               f"{len(gallery)} images, {len(gallery.captions)} captions.",
                   version=gallery.manifest.get("fnemm", ""))
    app.state.gallery, app.state.max_upload_bytes = gallery, max_upload_bytes
    app.include_router(router)
    app.add_exception_handler(FnemmError, fnemm_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodyLimit, limit=max_upload_bytes + 64 * 1024)     # + multipart headers
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: any free one; the caller reads which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FnemmError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                         f"choose another --port (0: any free one)") from None
    sock.listen(2048)
    return sock


def share_malloc_arenas() -> None:
    """Keep the memory the server holds near what its bounded work in flight needs
    (DECODES, the CNN's lock). glibc gives each thread its own arena, keeps there what
    the thread freed, and raises its mmap threshold after big frees, so a server whose
    threads had each once decoded a 50-megapixel upload, or run the CNN, kept all of
    it: 16 such uploads at once peaked at 5.6 GiB. Two arenas for all threads, a fixed
    32 MiB mmap threshold, and PIL image blocks of 64 MiB (so decoded images are mmap'd
    and really freed): 1.55 GiB, and uploads no slower (median 184 vs 202 ms over 5
    interleaved runs of 15; a fixed 256 KiB threshold alone gave 1.3 GiB but 1.6x slower
    uploads, the CNN's activation maps faulting in anew each time)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)                                    # M_ARENA_MAX
        libc.mallopt(-3, 32 << 20)                             # M_MMAP_THRESHOLD: fixed at 32 MiB
    except (OSError, AttributeError):
        pass                                                   # not glibc: nothing to tune
    from PIL import Image
    Image.core.set_block_size(64 << 20)     # decoded images in blocks above that: mmap'd, freed for real


def serve(index: str | Path, host: str = "127.0.0.1", port: int = 8000, checkpoint=None, features=None,
          device: str = "cpu", max_upload_bytes: int = MAX_UPLOAD_BYTES, quiet: bool = False) -> None:
    """Load ``index`` once, then serve it with uvicorn until interrupted. The first line
    printed names the address, with the real port when ``port`` is 0."""
    import uvicorn
    share_malloc_arenas()
    gallery = Gallery.from_index(index, checkpoint, features, device)
    gallery.encoder                         # load the CNN now: a missing weights file fails at start
    app = create_app(gallery, max_upload_bytes)
    sock = listen(host, port)
    port = sock.getsockname()[1]
    if host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"listening on {host}: whoever reaches port {port} can search and upload, with no "
                      f"authentication; share it behind a proxy that checks who asks", stacklevel=2)
    # the address is what the command answers (with --port 0, the only way to learn it), not
    # a message: printed even when --quiet silences the fnemm logger
    print(f"fnemm serve: http://{host}:{port}/ ({len(gallery)} images, {len(gallery.captions)} captions "
          f"from {index}; API docs: /docs)", flush=True)
    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                            timeout_keep_alive=5, http=header_timeout_protocol())
    uvicorn.Server(config).run(sockets=[sock])
