"""Curators' judgements through the API: every verdict path, counts, hiding, audit, export."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.flows.cli import main
from lookalike.tasks.accounts import add_user, issue_token
from lookalike.tasks.database import connect_checked
from lookalike.tasks.duplicates import find_duplicates
from lookalike.tasks.settings import MAX_DUPLICATE_THRESHOLD
from tests.pipeline_catalog import Catalog, app_settings, build_catalog

HTTPS = "https://testserver.local"  # the session cookie is Secure


@dataclass
class Archive:
    """An indexed catalog, an app that can write, and tokens of two curators and an admin."""

    catalog: Catalog
    client: TestClient[Any]
    tokens: dict[str, str]

    def as_user(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def judge(
        self, name: str, image: int, other: int, verdict: str, note: str | None = None
    ) -> Any:
        body: dict[str, Any] = {"verdict": verdict, **({"note": note} if note else {})}
        path = f"/api/images/{image}/neighbours/{other}/judgement"
        return self.client.put(path, json=body, headers=self.as_user(name))

    def clear(self, name: str, image: int, other: int) -> Any:
        path = f"/api/images/{image}/neighbours/{other}/judgement"
        return self.client.delete(path, headers=self.as_user(name))

    def neighbours(self, image: int, name: str | None = None, **params: Any) -> list[Any]:
        headers = self.as_user(name) if name else {}
        answer = self.client.get(f"/api/images/{image}/neighbours", params=params, headers=headers)
        assert answer.status_code == 200, answer.text
        return list(answer.json())

    def indexed_image(self) -> tuple[int, list[int]]:
        """An image with neighbours, and their ids in rank order."""
        for image in sorted(self.catalog.ids.values()):
            found = self.neighbours(image)
            if len(found) >= 3:
                return image, [n["id"] for n in found]
        raise AssertionError("no indexed image with three neighbours")


@pytest.fixture
def archive(database_url: str, tmp_path: Path) -> Iterator[Archive]:
    catalog = build_catalog(database_url, tmp_path)
    engine = connect_checked(catalog.url)
    tokens = {}
    for name, role in (("ann", "curator"), ("bob", "curator"), ("root", "admin")):
        add_user(engine, name, role)
        tokens[name] = issue_token(engine, name)
    engine.dispose()
    settings = app_settings(
        catalog.url, tmp_path, writer_database_url=catalog.url, write_rate="off"
    )
    with TestClient(app=create_app(settings), base_url=HTTPS) as client:
        yield Archive(catalog, client, tokens)


def counts(found: list[Any], other: int) -> tuple[dict[str, int], str | None]:
    (neighbour,) = [n for n in found if n["id"] == other]
    return neighbour["verdicts"], neighbour["my_verdict"]


def test_set_change_and_clear_a_verdict_counts_each_users_one_mark(archive: Archive) -> None:
    image, (first, *_) = archive.indexed_image()
    answer = archive.judge("ann", image, first, "same_object", note="  same pot, other side ")
    assert answer.status_code == 200, answer.text
    (shown,) = [n for n in archive.neighbours(image, "ann") if n["id"] == first]
    assert shown["my_note"] == "same pot, other side"
    (anonymous,) = [n for n in archive.neighbours(image) if n["id"] == first]
    assert anonymous["my_note"] is None
    body = answer.json()
    assert (body["user"], body["verdict"], body["note"]) == (
        "ann",
        "same_object",
        "same pot, other side",
    )
    assert counts(archive.neighbours(image, "ann"), first) == (
        {"same_object": 1, "similar": 0, "not_similar": 0},
        "same_object",
    )
    # From the other side it is the same pair: ann's mark is replaced, not doubled.
    assert archive.judge("ann", first, image, "similar").status_code == 200
    assert archive.judge("bob", image, first, "not_similar").status_code == 200
    assert counts(archive.neighbours(image, "ann"), first) == (
        {"same_object": 0, "similar": 1, "not_similar": 1},
        "similar",
    )
    assert counts(archive.neighbours(image), first)[1] is None  # anonymous: no own verdict
    assert archive.clear("ann", image, first).status_code == 204
    assert archive.clear("ann", image, first).status_code == 204  # nothing left: still fine
    assert counts(archive.neighbours(image, "ann"), first) == (
        {"same_object": 0, "similar": 0, "not_similar": 1},
        None,
    )
    page = archive.client.get("/api/judgements").json()
    assert page["total"] == 1
    assert [(j["user"], j["verdict"]) for j in page["items"]] == [("bob", "not_similar")]


def test_the_audit_trail_keeps_every_change_and_only_admins_read_it(archive: Archive) -> None:
    image, (first, *_) = archive.indexed_image()
    archive.judge("ann", image, first, "similar")
    archive.judge("ann", image, first, "same_object", note="checked the inventory")
    archive.clear("ann", image, first)
    refused = archive.client.get("/api/judgements/history", headers=archive.as_user("ann"))
    assert refused.status_code == 403 and "only admins" in refused.json()["detail"]
    history = archive.client.get("/api/judgements/history", headers=archive.as_user("root"))
    assert history.status_code == 200
    changes = [(e["user"], e["old_verdict"], e["new_verdict"]) for e in history.json()["items"]]
    assert changes == [
        ("ann", "same_object", None),
        ("ann", "similar", "same_object"),
        ("ann", None, "similar"),
    ]
    assert history.json()["items"][1]["note"] == "checked the inventory"


def test_filters_page_judgements_by_user_and_verdict(archive: Archive) -> None:
    image, (first, second, third, *_) = archive.indexed_image()
    archive.judge("ann", image, first, "similar")
    archive.judge("ann", image, second, "not_similar")
    archive.judge("bob", image, third, "not_similar")
    get = archive.client.get
    assert get("/api/judgements", params={"user": "ann"}).json()["total"] == 2
    only = get("/api/judgements", params={"verdict": "not_similar", "limit": 1}).json()
    assert only["total"] == 2 and len(only["items"]) == 1
    assert get("/api/judgements", params={"verdict": "maybe"}).status_code == 400


def test_hiding_not_similar_pairs_fills_up_from_further_neighbours(archive: Archive) -> None:
    image, ranked = archive.indexed_image()
    k = len(ranked) - 1  # one stored neighbour more than asked for
    archive.judge("ann", image, ranked[0], "not_similar")
    shown = [n["id"] for n in archive.neighbours(image, "ann", k=k, hide="not_similar")]
    assert shown == ranked[1 : k + 1]
    # bob marked nothing: his view, and an anonymous one with one verdict against none, differ
    assert [n["id"] for n in archive.neighbours(image, "bob", k=k, hide="not_similar")] == ranked[
        :k
    ]
    assert [n["id"] for n in archive.neighbours(image, k=k, hide="not_similar")] == ranked[
        1 : k + 1
    ]
    archive.judge("bob", image, ranked[0], "similar")  # one against one: shown to readers again
    assert [n["id"] for n in archive.neighbours(image, k=k, hide="not_similar")] == ranked[:k]


def test_same_object_pairs_join_the_images_duplicate_group(archive: Archive) -> None:
    engine = connect_checked(archive.catalog.url)
    find_duplicates(engine, 0.01)  # a threshold so low that the photos form no groups
    engine.dispose()
    image, (first, second, *_) = archive.indexed_image()
    assert archive.client.get(f"/api/images/{image}/duplicates").json()["groups"] == []
    archive.judge("ann", image, second, "same_object")
    archive.judge("bob", first, image, "not_similar")  # other verdicts join nothing
    (group,) = archive.client.get(f"/api/images/{image}/duplicates").json()["groups"]
    members = [(m["id"], m["kind"], m["distance"]) for m in group["images"]]
    assert members == [(image, "exact", 0.0), (second, "judged", None)]
    assert MAX_DUPLICATE_THRESHOLD > 0.01


def test_export_writes_every_current_judgement_as_csv_and_json_lines(
    archive: Archive, tmp_path: Path
) -> None:
    image, (first, second, *_) = archive.indexed_image()
    archive.judge("ann", image, first, "same_object", note='a "quoted", note\nover two lines')
    archive.judge("bob", second, image, "not_similar")
    archive.judge("bob", image, first, "similar")
    archive.clear("bob", image, first)
    names = {i: name for name, i in archive.catalog.ids.items()}
    out = tmp_path / "judgements.csv"
    assert main(["judgements", "export", "--db", archive.catalog.url, "-o", str(out)]) == 0
    rows = sorted(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))), key=by_user)
    assert [(r["user"], r["verdict"]) for r in rows] == [
        ("ann", "same_object"),
        ("bob", "not_similar"),
    ]
    assert rows[0]["note"] == 'a "quoted", note\nover two lines'
    low, high = sorted((image, first))
    assert (rows[0]["image_file"], rows[0]["neighbour_file"]) == (names[low], names[high])
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["judgements", "export", "--format", "jsonl", "--db", archive.catalog.url]) == 0
    lines = sorted((json.loads(line) for line in buffer.getvalue().splitlines()), key=by_user)
    assert [line["verdict"] for line in lines] == ["same_object", "not_similar"]
    assert lines[0]["note"] == rows[0]["note"]


def by_user(row: dict[str, Any]) -> str:
    return str(row["user"])
