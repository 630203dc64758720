"""The bodies the search service's API takes and answers (pydantic models: FastAPI checks
requests against them and draws /docs and /openapi.json from them)."""

from pydantic import BaseModel, Field

from fnemm.search.gallery import MAX_K, MAX_QUERY_CHARS

class TextQuery(BaseModel):
    query: str = Field(..., description=f"a sentence, 1 to {MAX_QUERY_CHARS} characters",
                       examples=["a dog runs on the beach"])
    k: int = Field(10, description=f"how many images, 1 to {MAX_K}")


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


class CaptionResults(BaseModel):
    results: list[CaptionHit]
    took_ms: float


class SimilarResults(BaseModel):
    results: list[ImageHit]
    took_ms: float


class Error(BaseModel):
    error: str = Field(..., description="one line: what was wrong and what to send instead")


def errors(why: dict[int, str]) -> dict:
    """OpenAPI ``responses`` for the 4xx a route answers, all ``{"error": "..."}``."""
    return {code: {"model": Error, "description": text} for code, text in why.items()}
