"""/api/search: upload a photo, get the most similar images of the collection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from litestar import get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.openapi import ResponseSpec
from litestar.params import Body, Parameter

from lookalike.api.admission import Admission, admit_search
from lookalike.api.errors import UploadTooLargeError
from lookalike.api.openapi import REFUSALS, RefusableOperation
from lookalike.api.schemas import ErrorAnswer, Neighbour
from lookalike.api.search_index import SimilaritySearch
from lookalike.tasks.settings import Settings

MAX_SEARCH_K = 100
MAX_TEXT = 500
WORDLESS = ResponseSpec(
    ErrorAnswer, description="The collection's model has no text tower, or the text is blank."
)


@dataclass
class SearchUpload:
    """The multipart form: one image in the field ``file``."""

    file: UploadFile


@post(
    "/api/search",
    status_code=200,
    tags=["search"],
    guards=[admit_search],
    responses=REFUSALS,
    operation_class=RefusableOperation,
)
async def search_by_upload(
    data: Annotated[SearchUpload, Body(media_type=RequestEncodingType.MULTI_PART)],
    search: SimilaritySearch,
    settings: Settings,
    admission: Admission,
    k: Annotated[int, Parameter(ge=1, le=MAX_SEARCH_K)] = 20,
) -> list[Neighbour]:
    """The k stored images nearest to the uploaded one, closest first.

    A few searches run at once and a few wait; beyond that, and beyond a client's allowance,
    the answer is 503 or 429 with Retry-After (see the settings SEARCH_SLOTS, SEARCH_QUEUE and
    SEARCH_RATE).
    """
    with admission.search.held():
        content = await read_upload(data.file, settings.upload_limit_mb * 1024 * 1024)
        # Decoding, the forward pass and the matrix product run on the search lane's threads.
        return await admission.search.run(search.search, content, k)


@get(
    "/api/search",
    tags=["search"],
    guards=[admit_search],
    responses={400: WORDLESS, **REFUSALS},
    operation_class=RefusableOperation,
)
async def search_by_text(
    search: SimilaritySearch,
    admission: Admission,
    text: Annotated[
        str, Parameter(min_length=1, max_length=MAX_TEXT, description="Words to search by")
    ],
    k: Annotated[int, Parameter(ge=1, le=MAX_SEARCH_K)] = 20,
) -> list[Neighbour]:
    """The k stored images nearest to the words, closest first (text-capable models only).

    The text tower and tokenizer load on the first such search; the ranking is the same exact
    search as by upload. Runs on the search lane, with the same limits.
    """
    with admission.search.held():
        return await admission.search.run(search.search_text, text, k)


async def read_upload(upload: UploadFile, limit_bytes: int) -> bytes:
    """The uploaded bytes, refused with 413 beyond the limit."""
    try:
        content = await upload.read(limit_bytes + 1)
    finally:
        await upload.close()
    if len(content) > limit_bytes:
        raise UploadTooLargeError(f"the upload is larger than {limit_bytes // (1024 * 1024)} MB")
    return content
