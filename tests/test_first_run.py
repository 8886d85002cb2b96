"""A first run on a machine that cannot fetch the pretrained weights: one line, then a way on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.odd_images import write_photos
from tests.test_cli import assert_one_error_line, lookalike

# A proxy on a port nobody listens on: Keras's download fails as it does offline, also on
# a machine that could reach the weight store.
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


@pytest.mark.slow
def test_an_offline_first_run_says_so_in_one_line_and_the_next_needs_no_recompute(
    tmp_path: Path, prefect_api_env: dict[str, str]
) -> None:
    images = tmp_path / "images"
    write_photos(images, 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(OFFLINE, NO_PROXY="", KERAS_HOME=str(tmp_path / "keras"))
    env.update(LOOKALIKE_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect"))
    env.update(prefect_api_env)
    first = lookalike("process", str(images), env=env)
    assert_one_error_line(
        first, "could not fetch the ImageNet weights of InceptionV3 from https://"
    )
    assert first.stderr.strip().splitlines() == [first.stderr.strip()]  # nothing else at all
    assert "--weights FILE.h5" in first.stderr and "--weights none" in first.stderr
    assert "oneDNN" not in first.stderr + first.stdout  # TensorFlow's start-up notes stay out
    second = lookalike("process", str(images), "--weights", "none", "--json", env=env)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert (summary["found"], summary["extracted"], summary["failed"]) == (2, 2, 0)
    assert summary["weights"].startswith("none")
