"""The model registry (tasks/models.py): the networks, their weights, presets and precision.

KerasHub presets are folders these tests write themselves with KerasHub's own save_to_preset,
from the reduced test-only configurations (REDUCED_MODELS_VARIABLE): the full ones would
write 90 MB (DINOv2-small) and 600 MB (CLIP ViT-B/32) per test.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.tasks.catalog import PendingImage
from lookalike.tasks.decode import PREPROCESS_VERSION
from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.extract import batch_key
from lookalike.tasks.models import (
    CLIP_VIT_B32_SPEC,
    DINOV2_REDUCED,
    DINOV2_SMALL_SPEC,
    INCEPTION_V3,
    MODELS,
    REDUCED_MODELS_VARIABLE,
    RESNET50,
    PrecisionError,
    WeightsError,
    check_precision,
    cpu_has_bf16,
    feature_dim_of,
    feature_model_name,
    load_feature_model,
    model_spec,
    parse_model_name,
    resolve_precision,
    weights_identity,
)
from lookalike.tasks.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]
NONE_ID = weights_identity("none")


@pytest.fixture
def reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    """KerasHub models in their reduced test-only configuration."""
    monkeypatch.setenv(REDUCED_MODELS_VARIABLE, "1")


def pixels(spec_size: int, count: int = 3, seed: int = 1) -> np.ndarray:
    """Random uint8 images of the spec's input size."""
    return np.random.default_rng(seed).integers(0, 256, (count, spec_size, spec_size, 3), np.uint8)


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_names_each_model_its_input_and_dimension() -> None:
    described = {
        key: (spec.name, spec.input_size, spec.feature_dim, spec.normalised, spec.text_tower)
        for key, spec in MODELS.items()
    }
    assert described == {
        "inception_v3": ("InceptionV3", 299, 2048, False, False),
        "resnet50": ("ResNet50", 224, 2048, False, False),
        "dinov2_small": ("DINOv2-small", 224, 384, True, False),
        "clip_vit_b32": ("CLIP-ViT-B-32", 224, 512, True, True),
    }
    for spec in MODELS.values():
        assert spec.key in MODELS and spec.pooling and spec.weights_source and spec.good_for


def test_an_unknown_model_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(LookalikeError) as info:
        model_spec("vgg16")
    assert str(info.value) == (
        "unknown model 'vgg16': choose one of inception_v3, resnet50, dinov2_small, clip_vit_b32"
    )
    with pytest.raises(SettingsError, match="model must be one of inception_v3, resnet50"):
        Settings(model="vgg16")
    with pytest.raises(SettingsError, match="precision must be one of float32, bfloat16"):
        Settings(precision="int8")


def test_keras_hub_entries_name_the_presets_keras_hub_has() -> None:
    import keras_hub

    for spec, backbone in (
        (DINOV2_SMALL_SPEC, keras_hub.models.DINOV2Backbone),
        (CLIP_VIT_B32_SPEC, keras_hub.models.CLIPBackbone),
    ):
        assert backbone.presets[spec.preset]["kaggle_handle"] == spec.weights_url


def test_the_reduced_configurations_are_asked_for_and_say_what_they_are(reduced: None) -> None:
    for key in ("dinov2_small", "clip_vit_b32"):
        spec = model_spec(key)
        assert spec.test_only and spec.name.endswith("-reduced-for-tests")
        assert parse_model_name(spec.name) == (spec, "float32")
        with pytest.raises(WeightsError, match="has no pretrained weights"):
            weights_identity("imagenet", spec)
    assert model_spec("inception_v3") is INCEPTION_V3  # no reduced twin: the real one


def test_stored_names_keep_the_default_and_name_other_precisions() -> None:
    assert feature_model_name(INCEPTION_V3, "float32") == "InceptionV3"
    assert feature_model_name(CLIP_VIT_B32_SPEC, "bfloat16") == "CLIP-ViT-B-32 bfloat16"
    for spec in MODELS.values():
        for precision in ("float32", "bfloat16", "float16"):
            assert parse_model_name(feature_model_name(spec, precision)) == (spec, precision)
    assert feature_dim_of("DINOv2-small float16") == 384
    with pytest.raises(LookalikeError, match="unknown model 'VGG16'"):
        parse_model_name("VGG16")
    with pytest.raises(LookalikeError, match="unknown model 'InceptionV3 int8'"):
        parse_model_name("InceptionV3 int8")


def test_the_default_cache_key_is_the_one_of_earlier_versions() -> None:
    images = [PendingImage(1, "a.jpg", "a" * 32), PendingImage(2, "b.jpg", "b" * 32)]
    earlier = hashlib.blake2b(digest_size=20)  # tasks.extract.batch_key before --model
    for part in ("InceptionV3", NONE_ID, PREPROCESS_VERSION, "299"):
        earlier.update(part.encode() + b"\0")
    for image in images:
        earlier.update(image.content_hash.encode() + b"\0")
    assert batch_key(images, NONE_ID) == earlier.hexdigest()
    others = {
        batch_key(images, NONE_ID, model=feature_model_name(spec, precision))
        for spec in MODELS.values()
        for precision in ("float32", "bfloat16", "float16")
    }
    assert earlier.hexdigest() in others and len(others) == 12


# --- weights -----------------------------------------------------------------------------------


def test_weights_identity_of_presets_and_keras_files(tmp_path: Path) -> None:
    assert weights_identity("imagenet", RESNET50) == "imagenet"
    assert weights_identity("imagenet", DINOV2_SMALL_SPEC) == (
        "preset kaggle://keras/dinov2/keras/dinov2_small/1"
    )
    preset = tmp_path / "my-preset"
    (preset / "assets").mkdir(parents=True)
    (preset / "config.json").write_text("{}")
    (preset / "assets" / "vocabulary.json").write_text("{}")
    first = weights_identity(str(preset), CLIP_VIT_B32_SPEC)
    assert first.startswith("preset my-preset (") and first == weights_identity(
        str(preset), CLIP_VIT_B32_SPEC
    )
    (preset / "assets" / "vocabulary.json").write_text('{"a": 0}')
    assert weights_identity(str(preset), CLIP_VIT_B32_SPEC) != first
    with pytest.raises(WeightsError, match="serves the KerasHub models .* takes a weights file"):
        weights_identity(str(preset), INCEPTION_V3)
    (preset / "config.json").unlink()
    with pytest.raises(WeightsError, match="not a KerasHub preset folder"):
        weights_identity(str(preset), DINOV2_SMALL_SPEC)
    saved = tmp_path / "model.keras"
    saved.write_bytes(b"zip")
    assert weights_identity(str(saved)).startswith("file model.keras (")


# --- precision ---------------------------------------------------------------------------------


def test_precision_defaults_to_the_devices_and_refuses_slow_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lookalike.tasks import models

    monkeypatch.setattr(models, "gpu_device_files", lambda: False)
    assert resolve_precision("") == "float32"
    monkeypatch.setattr(models, "gpu_device_files", lambda: True)
    assert resolve_precision("") == "float16" and resolve_precision("bfloat16") == "bfloat16"
    check_precision("float16", on_gpu=True)
    with pytest.raises(PrecisionError, match="float16 runs only on a GPU"):
        check_precision("float16", on_gpu=False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    with pytest.raises(PrecisionError, match="bfloat16 needs a CPU with AVX512-BF16 or AMX"):
        check_precision("bfloat16", on_gpu=False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    check_precision("bfloat16", on_gpu=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\nflags\t\t: fpu avx2\n")
    assert not cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_has_bf16(cpuinfo) and not cpu_has_bf16(tmp_path / "missing")


def test_a_precision_this_machine_cannot_run_is_refused_before_tensorflow() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from lookalike.tasks.models import PrecisionError, feature_identity\n"
            "try:\n"
            "    print(feature_identity('inception_v3', 'none', 'float16'))\n"
            "except PrecisionError as exc:\n"
            "    print(exc)\n"
            "print('tensorflow' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    from lookalike.tasks.models import gpu_device_files

    lines = result.stdout.splitlines()
    assert lines[-1] == "False", result.stderr
    if gpu_device_files():
        assert lines[0] == str(("InceptionV3 float16", NONE_ID))
    else:
        assert lines[0].startswith("float16 runs only on a GPU")


# --- seeded random weights, every model ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("key", list(MODELS))
def test_every_model_embeds_with_seeded_random_weights(key: str) -> None:
    spec = MODELS[key]  # the full configuration
    model = load_feature_model("none", 2, spec)
    images = pixels(spec.input_size)
    features = model.embed(images)
    assert features.shape == (3, spec.feature_dim) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])  # the images differ, and so do their vectors
    if spec.normalised:
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    load_feature_model.cache_clear()
    np.testing.assert_array_equal(load_feature_model("none", 2, spec).embed(images), features)
    load_feature_model.cache_clear()


@pytest.mark.slow
def test_bfloat16_features_stay_near_float32_and_are_stored_as_such() -> None:
    if not cpu_has_bf16():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX")
    images = pixels(INCEPTION_V3.input_size, 4)
    single = load_feature_model("none", 2, INCEPTION_V3).embed(images)
    half = load_feature_model("none", 2, INCEPTION_V3, "bfloat16")
    assert half.model_name == "InceptionV3 bfloat16"
    reduced = half.embed(images)
    cosine = np.sum(single * reduced, axis=1) / (
        np.linalg.norm(single, axis=1) * np.linalg.norm(reduced, axis=1)
    )
    assert not np.array_equal(reduced, single) and (cosine > 0.99).all()
    load_feature_model.cache_clear()


# --- weights files and preset folders -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("key", ["dinov2_small", "clip_vit_b32"])
def test_a_preset_folder_loads_the_model_it_holds(
    key: str, tmp_path: Path, reduced: None
) -> None:
    spec = model_spec(key)
    seeded = load_feature_model("none", 2, spec)
    folder = tmp_path / "preset"
    seeded.model.save_to_preset(str(folder))  # KerasHub's own preset saving
    loaded = load_feature_model(str(folder), 2, spec)
    assert loaded.weights_id == weights_identity(str(folder), spec)
    assert loaded.weights_id.startswith("preset preset (")
    images = pixels(spec.input_size)
    np.testing.assert_allclose(loaded.embed(images), seeded.embed(images), rtol=1e-5, atol=1e-6)
    weights_file = tmp_path / "seeded.weights.h5"  # a weights file fits the same network
    seeded.model.save_weights(weights_file)
    from_file = load_feature_model(str(weights_file), 2, spec).embed(images)
    np.testing.assert_allclose(from_file, seeded.embed(images), rtol=1e-5, atol=1e-6)
    load_feature_model.cache_clear()


@pytest.mark.slow
def test_a_preset_that_does_not_fit_the_model_is_one_line(tmp_path: Path, reduced: None) -> None:
    import keras_hub

    wider = keras_hub.models.DINOV2Backbone(**{**DINOV2_REDUCED, "hidden_dim": 48})
    wider.save_to_preset(str(tmp_path / "wider"))
    with pytest.raises(WeightsError) as info:
        load_feature_model(str(tmp_path / "wider"), 1, model_spec("dinov2_small"))
    assert str(info.value) == (
        f"{tmp_path / 'wider'} gives 48 features per image; dinov2_small has 32"
    )
    load_feature_model("none", 1, model_spec("clip_vit_b32")).model.save_to_preset(
        str(tmp_path / "clip")
    )
    with pytest.raises(WeightsError, match=f"cannot load {tmp_path / 'clip'} into dinov2_small"):
        load_feature_model(str(tmp_path / "clip"), 1, model_spec("dinov2_small"))
    load_feature_model.cache_clear()


@pytest.mark.slow
def test_a_keras_file_loads_into_its_network(tmp_path: Path) -> None:
    seeded = load_feature_model("none", 2, INCEPTION_V3)
    saved = tmp_path / "inception.keras"
    seeded.model.save(saved)
    images = pixels(INCEPTION_V3.input_size, 2)
    loaded = load_feature_model(str(saved), 2, INCEPTION_V3)
    assert loaded.weights_id.startswith("file inception.keras (")
    np.testing.assert_allclose(loaded.embed(images), seeded.embed(images), rtol=1e-5, atol=1e-6)
    load_feature_model.cache_clear()


@pytest.mark.slow
def test_a_preset_that_cannot_be_downloaded_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy nobody listens on: the download fails as offline, also where Kaggle is reachable.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    with pytest.raises(WeightsError) as info:
        load_feature_model("imagenet", 1, DINOV2_SMALL_SPEC)
    message = str(info.value)
    assert message.startswith(
        "could not fetch the pretrained weights of DINOv2-small (KerasHub preset dinov2_small) "
        "from kaggle://keras/dinov2/keras/dinov2_small/1 ("
    )
    assert "--weights FOLDER" in message and "--weights none" in message
    assert len(message.splitlines()) == 1
