"""/data: the old routes, answering in the same shapes as before.

Their file names are relative to the image's source folder, without the source: two sources
can hold the same relative path, and then two ids have the same name here. GET
/api/images/{id} names the source.
"""

from __future__ import annotations

from litestar import Controller, Response, get

from lookalike.api.controllers.images import RENDER_LIMITED, fingerprint_svg_response
from lookalike.api.controllers.params import ImageId
from lookalike.api.repository import ImageRepository
from lookalike.api.schemas import LegacyNeighbour


class LegacyController(Controller):
    """Kept so that old clients keep working; new clients use /api."""

    path = "/data"
    tags = ["legacy"]

    @get("/image_count", sync_to_thread=True)
    def image_count(self, repository: ImageRepository) -> int:
        """How many images there are, as a bare JSON integer."""
        return repository.count_all_images()

    @get("/image_name/{image_id:int}", sync_to_thread=True)
    def image_name(self, repository: ImageRepository, image_id: ImageId) -> list[str]:
        """``["file name"]``: relative to the image's source folder, the source not named (two
        images in two sources can share it; use /api/images/{id} for the source)."""
        return [repository.get_image_file(image_id).file_name]

    @get("/image_name_and_neighbours/{image_id:int}", sync_to_thread=True)
    def image_name_and_neighbours(
        self, repository: ImageRepository, image_id: ImageId
    ) -> tuple[str, list[LegacyNeighbour]]:
        """``["file name", [{"id": n, "distance": d}, ...]]`` with every stored neighbour (the
        name relative to its source folder, as /data/image_name gives it)."""
        file_name = repository.get_image_file(image_id).file_name
        stored = repository.get_all_neighbours(image_id)
        return file_name, [LegacyNeighbour(id=n.id, distance=n.distance) for n in stored]

    @get("/image_fingerprint/{image_id:int}", sync_to_thread=True, **RENDER_LIMITED)
    def image_fingerprint(self, repository: ImageRepository, image_id: ImageId) -> Response[str]:
        """The SVG fingerprint."""
        return fingerprint_svg_response(repository, image_id)
