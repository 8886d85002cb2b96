"""The feature model: its spec, weights identity, seeded random init, and a Prefect-free import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.tasks.decode import INPUT_SIZE, decode_image
from lookalike.tasks.models import (
    INCEPTION_V3,
    FeatureModel,
    WeightsError,
    load_feature_model,
    weights_identity,
)
from tests.odd_images import write_photos

BATCH = 4  # small batches keep the CPU model fast in tests
REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_importing_the_model_module_loads_neither_prefect_nor_tensorflow() -> None:
    result = run_python(
        "import sys, json, lookalike.tasks.models\n"
        "print(json.dumps(sorted(m for m in ('prefect', 'tensorflow', 'keras', 'keras_hub',"
        " 'lookalike.tasks.extract', 'lookalike.tasks.catalog') if m in sys.modules)))"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_inception_entry_matches_decoding_storage_and_the_catalog() -> None:
    from lookalike.tasks.catalog import DEFAULT_MODEL_NAME  # what the collection row stores

    assert INCEPTION_V3.name == DEFAULT_MODEL_NAME == "InceptionV3"
    assert INCEPTION_V3.input_size == INPUT_SIZE == 299
    assert INCEPTION_V3.feature_dim == 2048


def test_weights_identity_names_each_kind(tmp_path: Path) -> None:
    assert weights_identity("imagenet") == "imagenet"
    assert weights_identity("none") == "none (random init, seed 0, numpy he-uniform)"
    with pytest.raises(WeightsError, match="not found"):
        weights_identity(str(tmp_path / "missing.h5"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"\.h5, \.weights\.h5 or \.keras"):
        weights_identity(str(other))
    h5 = tmp_path / "mine.weights.h5"
    h5.write_bytes(b"first")
    first = weights_identity(str(h5))
    h5.write_bytes(b"second")
    assert first.startswith("file mine.weights.h5 (") and weights_identity(str(h5)) != first


def test_bad_weights_fail_before_tensorflow_loads(tmp_path: Path) -> None:
    result = run_python(
        "import sys\n"
        "from lookalike.tasks.models import WeightsError, load_feature_model\n"
        "try:\n"
        "    load_feature_model(sys.argv[1])\n"
        "except WeightsError as exc:\n"
        "    print(exc)\n"
        "print('tensorflow' in sys.modules)",
        str(tmp_path / "missing.h5"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "weights must be 'imagenet', 'none', a Keras weights file (.h5, .weights.h5, .keras) "
        f"or a KerasHub preset folder; not found: {tmp_path}/missing.h5",
        "False",
    ]


def test_random_init_model_is_seeded_and_batch_independent() -> None:
    model = load_feature_model("none", BATCH)
    assert isinstance(model, FeatureModel) and model.spec is INCEPTION_V3
    assert model.model_name == "InceptionV3" and model.weights_id == weights_identity("none")
    assert load_feature_model("none", BATCH) is model  # built once per process
    pixels = np.random.default_rng(1).integers(0, 256, (5, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    features = model.embed(pixels)
    assert features.shape == (5, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # The padded short batch gives the same vectors as a full one.
    np.testing.assert_allclose(model.embed(pixels[:3]), features[:3], rtol=1e-5, atol=1e-7)
    load_feature_model.cache_clear()
    again = load_feature_model("none", BATCH).embed(pixels)
    np.testing.assert_array_equal(again, features)


# Features of one image with weights "none", in a fresh Python process, and whether loading the
# model printed TensorFlow's no-GPU noise (on a machine without a GPU device).
EMBED_IN_A_NEW_PROCESS = """
import sys
import numpy as np
from lookalike.tasks.decode import decode_image
from lookalike.tasks.models import load_feature_model
pixels = decode_image(sys.argv[1]).pixels[None]
np.save(sys.argv[2], load_feature_model("none", 1).embed(pixels))
print("prefect" in sys.modules)
"""


@pytest.mark.slow
def test_random_init_gives_the_same_features_in_separate_processes(tmp_path: Path) -> None:
    (photo,) = write_photos(tmp_path, 1)
    outputs = [tmp_path / f"features-{i}.npy" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", EMBED_IN_A_NEW_PROCESS, str(photo), str(out)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert stdout.split() == ["False"]  # no Prefect on the way to the model
    first, second = (np.load(out) for out in outputs)
    assert first.shape == (1, 2048) and np.isfinite(first).all()
    assert 1.0 < float(np.linalg.norm(first)) < 1e4  # He-uniform keeps activations near unit scale
    np.testing.assert_array_equal(second, first)
    here = load_feature_model("none", BATCH).embed(decode_image(photo).pixels[None])
    np.testing.assert_allclose(here, first, rtol=1e-5, atol=1e-6)  # other batch size, same model


@pytest.mark.slow
def test_loading_the_model_writes_no_gpu_noise_without_a_gpu(tmp_path: Path) -> None:
    from lookalike.tasks.models import gpu_device_files

    if gpu_device_files():
        pytest.skip("this machine has a GPU device: TensorFlow's device messages are kept")
    result = run_python(
        "import sys\n"
        "from lookalike.tasks.models import load_feature_model\n"
        "print('before', file=sys.stderr, flush=True)\n"
        "load_feature_model('none', 1)\n"
        "print('after', file=sys.stderr, flush=True)"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "before" and lines[-1] == "after", result.stderr
    assert not [line for line in lines if "cuInit" in line or "cuda" in line.lower()]


def test_weights_from_a_local_h5_file(tmp_path: Path) -> None:
    model = load_feature_model("none", BATCH)
    weights_file = tmp_path / "random.weights.h5"
    model.model.save_weights(weights_file)
    pixels = np.random.default_rng(2).integers(0, 256, (2, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    from_file = load_feature_model(str(weights_file), BATCH).embed(pixels)
    assert from_file.shape == (2, 2048)
    np.testing.assert_allclose(from_file, model.embed(pixels), rtol=1e-5, atol=1e-7)
