"""Path and query parameters shared by several controllers, with their bounds."""

from __future__ import annotations

from typing import Annotated

from litestar.params import Parameter

# The INTEGER column's range: larger ids cannot exist (and would overflow SQLite's driver).
MAX_IMAGE_ID = 2**31 - 1

ImageId = Annotated[
    int, Parameter(ge=1, le=MAX_IMAGE_ID, description="Image id, as in image_names.id")
]
