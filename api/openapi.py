"""What the OpenAPI schema says about refusals: 429 and 503 answers with their Retry-After."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIHeader, OpenAPIResponse, OpenAPIType, Operation, Schema

from lookalike.api.schemas import ErrorAnswer

RETRY_AFTER = "Retry-After"

REFUSALS = {
    429: ResponseSpec(
        ErrorAnswer,
        description="This client sent too many such requests; Retry-After says when to retry.",
    ),
    503: ResponseSpec(
        ErrorAnswer,
        description="The server is busy with such requests (or something it needs is down); "
        "Retry-After says when to retry.",
    ),
}

# What the routes that need an identity may answer besides.
DENIALS = {
    401: ResponseSpec(ErrorAnswer, description="No valid token or session: sign in first."),
    403: ResponseSpec(
        ErrorAnswer, description="Not allowed: the role does not allow it, or a CSRF check failed."
    ),
}


@dataclass
class RefusableOperation(Operation):
    """An operation whose 429 and 503 answers carry a Retry-After header (seconds)."""

    def __post_init__(self) -> None:
        for code in ("429", "503"):
            answer = (self.responses or {}).get(code)
            if isinstance(answer, OpenAPIResponse):
                answer.headers = {
                    RETRY_AFTER: OpenAPIHeader(
                        schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
                        description="Seconds to wait before trying again.",
                    )
                }
