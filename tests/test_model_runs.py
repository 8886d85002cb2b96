"""`lookalike process --model NAME` end to end, for every registered model, and what the API
then serves: the dimension of the vectors follows the model through staging, the tables, the
neighbour lists, the fingerprint and search by upload.

Every model runs in its full configuration with --weights none (seeded random weights); one
run loads a preset folder the test writes, in the reduced test-only configuration, and checks
that the command says so.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from litestar.testing import TestClient

from lookalike.api.app import create_app
from lookalike.api.fingerprint import grid_side
from lookalike.tasks.models import (
    MODELS,
    REDUCED_MODELS_VARIABLE,
    cpu_has_bf16,
    load_feature_model,
    model_spec,
)
from tests.odd_images import write_photos
from tests.pipeline_catalog import app_settings
from tests.test_cli import assert_one_error_line, lookalike

PHOTOS = 4


def run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment with private data and Prefect folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        LOOKALIKE_DATA_DIR=str(tmp_path / "data"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **extra,
    )
    return env


def process(images: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    """lookalike process with a JSON summary."""
    return lookalike("process", str(images), "--weights", "none", "--json", *options, env=env)


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON summary on the last line of a successful run."""
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def stored(tmp_path: Path) -> tuple[set[tuple[str, int]], str]:
    """(model, vector bytes) of every stored vector, and the collection's model."""
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'data' / 'lookalike.sqlite'}")
    with engine.connect() as conn:
        vectors = set(
            conn.execute(sqlalchemy.text("SELECT model, length(features) FROM image_features"))
        )
        model = conn.execute(sqlalchemy.text("SELECT model FROM collection")).scalar_one()
    engine.dispose()
    return {(str(m), int(n)) for m, n in vectors}, str(model)


@dataclass(frozen=True)
class ModelRun:
    """One finished `lookalike process --model KEY` over PHOTOS photos under base."""

    base: Path
    photos: list[Path]
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def model_run(
    tmp_path_factory: pytest.TempPathFactory, prefect_api_env: dict[str, str]
) -> Callable[[str], ModelRun]:
    """The run of each model, made once: the API test reads the run the end-to-end test of
    the same model checked (a full-size model run costs 30-45 s here); nothing writes to it."""
    made: dict[str, ModelRun] = {}

    def run(key: str) -> ModelRun:
        if key not in made:
            base = tmp_path_factory.mktemp(key)
            photos = write_photos(base / "images", PHOTOS)
            env = run_env(base, **prefect_api_env)
            made[key] = ModelRun(
                base, photos, summary_of(process(base / "images", env, "--model", key))
            )
        return made[key]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("key", list(MODELS))
def test_every_model_runs_process_end_to_end(
    key: str, model_run: Callable[[str], ModelRun]
) -> None:
    spec = MODELS[key]
    done = model_run(key)
    summary = done.summary
    assert (summary["model"], summary["extracted"], summary["failed"]) == (spec.name, PHOTOS, 0)
    assert summary["neighbour_rows"] == PHOTOS * (PHOTOS - 1)
    assert stored(done.base) == ({(spec.name, spec.feature_dim * 4)}, spec.name)


@pytest.mark.slow
def test_the_api_serves_vectors_of_the_collections_model(
    tmp_path: Path, model_run: Callable[[str], ModelRun]
) -> None:
    spec = MODELS["dinov2_small"]  # 384 values: a 20x20 fingerprint
    done = model_run(spec.key)
    photos = done.photos
    url = f"sqlite:///{done.base / 'data' / 'lookalike.sqlite'}"
    with TestClient(create_app(app_settings(url, tmp_path, weights="none"))) as client:
        first = client.get("/api/images", params={"limit": 1}).json()["items"][0]
        features = client.get(f"/api/images/{first['id']}/features").json()
        assert features["model"] == spec.name and len(features["features"]) == 384
        svg = client.get(f"/api/images/{first['id']}/fingerprint.svg").text
        assert grid_side(384) == 20 and svg.count("h1v1h-1z") == 20 * 20
        photo = next(p for p in photos if p.name == Path(first["file_name"]).name)
        found = client.post("/api/search?k=2", files={"file": ("p.jpg", photo.read_bytes())})
        assert found.status_code == 200, found.text
        assert found.json()[0]["id"] == first["id"] and found.json()[0]["distance"] < 1e-3
    load_feature_model.cache_clear()


@pytest.mark.slow
def test_precision_is_part_of_the_collection(
    tmp_path: Path, prefect_api_env: dict[str, str]
) -> None:
    if not cpu_has_bf16():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX")
    write_photos(tmp_path / "images", PHOTOS)
    env = run_env(tmp_path, **prefect_api_env)
    half = summary_of(process(tmp_path / "images", env, "--precision", "bfloat16"))
    assert half["model"] == "InceptionV3 bfloat16" and half["extracted"] == PHOTOS
    assert stored(tmp_path) == ({("InceptionV3 bfloat16", 2048 * 4)}, "InceptionV3 bfloat16")
    refused = process(tmp_path / "images", env)  # float32 now: other features
    assert_one_error_line(refused, "come from InceptionV3 bfloat16 with weights")
    again = summary_of(process(tmp_path / "images", env, "--recompute"))
    assert (again["model"], again["extracted"]) == ("InceptionV3", PHOTOS)


@pytest.mark.slow
def test_a_preset_folder_runs_end_to_end_and_a_reduced_model_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api_env: dict[str, str]
) -> None:
    monkeypatch.setenv(REDUCED_MODELS_VARIABLE, "1")
    spec = model_spec("clip_vit_b32")
    preset = tmp_path / "clip-preset"
    load_feature_model("none", 1, spec).model.save_to_preset(str(preset))
    write_photos(tmp_path / "images", PHOTOS)
    env = run_env(tmp_path, **{REDUCED_MODELS_VARIABLE: "1"}, **prefect_api_env)
    result = lookalike(
        "process", str(tmp_path / "images"), "--model", "clip_vit_b32", "--weights",
        str(preset), "--json", env=env,
    )  # fmt: skip
    summary = summary_of(result)
    assert summary["model"] == "CLIP-ViT-B-32-reduced-for-tests"
    assert summary["weights"].startswith("preset clip-preset (")
    assert f"note: {REDUCED_MODELS_VARIABLE} is set: the model is " in result.stderr
    assert summary["extracted"] == PHOTOS
    assert stored(tmp_path) == ({(spec.name, 24 * 4)}, spec.name)
    load_feature_model.cache_clear()
