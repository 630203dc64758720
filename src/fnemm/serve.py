"""The retrieval service: a FastAPI app over one index folder, and its web page.

    POST /search/text    {"query": "a dog runs on the beach", "k": 10}  -> images
    POST /search/image   multipart: file=<photo>, k=10                  -> captions
    GET  /images/{id}    a JPEG thumbnail of a gallery image (?size=256)
    GET  /healthz        what is loaded
    GET  /               the search page;  /docs, /redoc, /openapi.json: the API

The index is loaded once, before the first request (``create_app(gallery)``).
Every error the user can cause is a 4xx with ``{"error": "one line"}``; handlers
are plain functions that FastAPI runs in its thread pool, so requests proceed
concurrently (searches only read; the CNN takes turns, see ``StoreEncoder``).
"""

# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import io
import logging
import sys
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

from fnemm.errors import FnemmError
from fnemm.index import Gallery

MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 50_000_000            # bigger uploads are refused before decoding (decompression bombs)
THUMB_SIZES = (64, 1024)            # allowed ?size= range
DEFAULT_THUMB = 256

log = logging.getLogger("fnemm.serve")


def _fastapi():
    try:
        import fastapi
        try:
            import python_multipart  # noqa: F401  (FastAPI's form parser)
        except ImportError:
            import multipart  # noqa: F401  (its name before python-multipart 0.0.13)
    except ImportError:
        raise FnemmError("the service needs FastAPI; pip install 'fnemm[serve]' "
                         "(fastapi, uvicorn, python-multipart, faiss-cpu)") from None
    return fastapi


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.3g} MiB"


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
            from starlette.responses import JSONResponse
            return await JSONResponse({"error": self._message()}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    from starlette.exceptions import HTTPException
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, limited, send)


def page_html() -> str:
    return resources.files("fnemm").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(gallery: Gallery, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_k: int = MAX_K):
    """The ASGI app serving ``gallery`` (already loaded)."""
    fastapi = _fastapi()
    from fastapi import File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from PIL import Image, UnidentifiedImageError
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException

    try:                                   # /docs from Swagger UI files in the package, no CDN
        from fastapi_offline import FastAPIOffline as make_app
    except ImportError:
        make_app = fastapi.FastAPI
    app = make_app(
        title="fnemm retrieval service",
        description="Image-caption retrieval with a Full-Network Embedding model: "
                    f"{len(gallery)} images, {len(gallery.captions)} captions.",
        version=gallery.manifest.get("fnemm", ""))

    class TextQuery(BaseModel):
        query: str = Field(..., description=f"a sentence, 1 to {MAX_QUERY_CHARS} characters",
                           examples=["a dog runs on the beach"])
        k: int = Field(10, description=f"how many images, 1 to {max_k}")

    class ImageHit(BaseModel):
        rank: int
        score: float
        image: str
        url: str
        captions: list[str]

    class TextResults(BaseModel):
        query: str
        unknown_words: list[str]
        results: list[ImageHit]
        took_ms: float

    class CaptionHit(BaseModel):
        rank: int
        score: float
        caption: str
        image: str
        url: str

    class ImageResults(BaseModel):
        results: list[CaptionHit]
        took_ms: float

    class Error(BaseModel):
        error: str = Field(..., description="one line: what was wrong and what to send instead")

    def errors(why: dict[int, str]) -> dict:
        """OpenAPI ``responses`` for the 4xx a route answers, all ``{"error": "..."}``."""
        return {code: {"model": Error, "description": text} for code, text in why.items()}

    def fail(status: int, message: str):
        raise HTTPException(status_code=status, detail=message)

    def check_k(k: int) -> None:
        if not 1 <= k <= max_k:
            fail(422, f"k={k}: must be between 1 and {max_k}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(page_html())

    @app.get("/healthz", summary="what the service has loaded")
    def healthz():
        return {"status": "ok", **gallery.info()}

    @app.post("/search/text", response_model=TextResults, summary="a sentence -> the images that fit it",
              responses=errors({422: "empty or overlong query, k out of range, not JSON"}))
    def search_text(body: TextQuery):
        query = body.query.strip()
        if not query:
            fail(422, "query is empty; give a sentence, e.g. \"a dog runs on the beach\"")
        if len(body.query) > MAX_QUERY_CHARS:
            fail(422, f"query is {len(body.query)} characters; at most {MAX_QUERY_CHARS}")
        check_k(body.k)
        t = time.perf_counter()
        hits = gallery.text(query, body.k)
        return {"query": query, "unknown_words": gallery.unknown_words(query),
                "results": [{**h, "url": f"/images/{h['image']}"} for h in hits],
                "took_ms": round(1000 * (time.perf_counter() - t), 2)}

    @app.post("/search/image", response_model=ImageResults, summary="a photo -> the captions that fit it",
              responses=errors({409: "the index has no captions, or cannot embed new photos",
                               413: "upload too big (bytes or pixels)", 415: "not an image",
                               422: "empty upload, no file, k out of range"}))
    def search_image(request: Request, file: UploadFile = File(..., description="a JPEG/PNG/... photo"),
                     k: int = Form(10, description=f"how many captions, 1 to {max_k}")):
        check_k(k)
        if gallery.caption_index is None:
            fail(409, "this index has no captions to rank; rebuild it with `fnemm index build --dataset ...`")
        if gallery.encoder is None:
            fail(409, "this index was built from a plain feature matrix: new photos cannot be embedded; "
                      "build it from a feature store of `fnemm extract`")
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            fail(413, f"{file.filename}: upload over {mib(max_upload_bytes)}; send a smaller photo")
        if not data:
            fail(422, f"{file.filename}: the upload is empty; send a JPEG/PNG photo")
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                fail(413, f"{file.filename}: {image.width}x{image.height} pixels; at most "
                          f"{MAX_PIXELS // 1_000_000} megapixels")
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            fail(415, f"{file.filename}: not an image this server can read; send a JPEG/PNG photo")
        if image.width < 1 or image.height < 1:
            fail(415, f"{file.filename}: the image is empty")
        t = time.perf_counter()
        hits = gallery.image(image, k)
        return {"results": [{**h, "url": f"/images/{h['image']}"} for h in hits],
                "took_ms": round(1000 * (time.perf_counter() - t), 2)}

    @lru_cache(maxsize=1024)
    def thumbnail(image_id: str, size: int) -> bytes | None:
        path = gallery.image_path(image_id)
        if path is None:
            return None
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    @app.get("/images/{image_id:path}", summary="a JPEG thumbnail of a gallery image",
             responses={200: {"content": {"image/jpeg": {}}},
                        **errors({404: "no such image, or its file is missing", 422: "size out of range"})})
    def image(image_id: str, size: int = Query(DEFAULT_THUMB, description="longest side in pixels")):
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            fail(422, f"size={size}: must be between {THUMB_SIZES[0]} and {THUMB_SIZES[1]}")
        if image_id not in gallery:
            fail(404, f"{image_id}: no such image in this gallery")
        try:
            data = thumbnail(image_id, size)
        except OSError as e:
            fail(404, f"{image_id}: its file cannot be read ({type(e).__name__})")
        if data is None:
            fail(404, f"{image_id}: in the index, but its file is not under {gallery.images_dir}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

    app.add_middleware(BodyLimit, limit=max_upload_bytes + 64 * 1024)     # + multipart headers
    app.state.gallery = gallery
    return app


def serve(index: str | Path, host: str = "127.0.0.1", port: int = 8000, checkpoint=None, features=None,
          device: str = "cpu", max_upload_bytes: int = MAX_UPLOAD_BYTES, quiet: bool = False) -> None:
    """Load ``index`` once, then serve it with uvicorn until interrupted."""
    _fastapi()
    try:
        import uvicorn
    except ImportError:
        raise FnemmError("the service needs uvicorn; pip install 'fnemm[serve]'") from None
    gallery = Gallery(index, checkpoint, features, device)
    app = create_app(gallery, max_upload_bytes)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"fnemm serve: warning: listening on {host}: whoever reaches port {port} can search and "
              f"upload, with no authentication; share it behind a proxy that checks who asks",
              file=sys.stderr, flush=True)
    if not quiet:
        print(f"fnemm serve: {len(gallery)} images, {len(gallery.captions)} captions from {index}; "
              f"open http://{host}:{port}/ (API docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet)
