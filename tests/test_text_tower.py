"""CLIP's text tower (tasks.models.load_text_encoder): words to vectors in the image space.

Every preset here is written by the test with KerasHub's own save_to_preset: a reduced CLIP
backbone (REDUCED_MODELS_VARIABLE, seeded as --weights none seeds it) and a tokenizer over a
vocabulary of a few dozen tokens and their merges, written here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.tasks.models import (
    REDUCED_MODELS_VARIABLE,
    TextTowerError,
    build_with_weights,
    load_feature_model,
    load_text_encoder,
    model_spec,
)

WORDS = ["red car", "dog", "a red dog"]
# Byte-pair merges that make whole words of the test's texts; CLIP marks a word's end "</w>".
MERGES = ["r e", "re d</w>", "c a", "ca r</w>", "d o", "do g</w>"]


@pytest.fixture(autouse=True)
def reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reduced CLIP: 24 features, 16 tokens a text, 512 token ids."""
    monkeypatch.setenv(REDUCED_MODELS_VARIABLE, "1")
    load_text_encoder.cache_clear()


def write_vocabulary(folder: Path) -> Path:
    """vocabulary.json and merges.txt as CLIP's tokenizer reads them; <|endoftext|> last."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [f"{c}</w>" for c in letters] + ["re", "red</w>", "ca", "car</w>"]
    tokens += ["do", "dog</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return folder


def write_clip_preset(folder: Path) -> Path:
    """The seeded reduced CLIP and its tokenizer, saved as one KerasHub preset folder."""
    import keras_hub

    vocabulary = write_vocabulary(folder.parent / "vocabulary")
    build_with_weights(model_spec("clip_vit_b32"), "none").save_to_preset(str(folder))
    keras_hub.tokenizers.CLIPTokenizer(
        vocabulary=str(vocabulary / "vocabulary.json"), merges=str(vocabulary / "merges.txt")
    ).save_to_preset(str(folder))
    return folder


@pytest.mark.slow
def test_a_preset_brings_the_text_tower_and_its_tokenizer(tmp_path: Path) -> None:
    preset = write_clip_preset(tmp_path / "preset")
    encoder = load_text_encoder("clip_vit_b32", str(preset))
    assert load_text_encoder("clip_vit_b32", str(preset)) is encoder  # built once
    vectors = encoder.embed([*WORDS, WORDS[0]])
    assert vectors.shape == (4, 24) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors[3], vectors[0])
    assert not np.allclose(vectors[0], vectors[1])
    assert encoder.embed([]).shape == (0, 24)
    assert not [layer for layer in encoder._tower._flatten_layers() if "vision" in layer.name]
    load_text_encoder.cache_clear()
    again = load_text_encoder("clip_vit_b32", str(preset)).embed(WORDS)
    np.testing.assert_array_equal(again, vectors[:3])


@pytest.mark.slow
def test_text_vectors_rank_stored_image_vectors_by_clip_similarity(tmp_path: Path) -> None:
    import keras_hub

    preset = write_clip_preset(tmp_path / "preset")
    spec = model_spec("clip_vit_b32")
    images = np.random.default_rng(4).integers(0, 256, (5, 32, 32, 3), np.uint8)
    stored = load_feature_model(str(preset), 5, spec).embed(images)  # as extraction stores them
    words = load_text_encoder("clip_vit_b32", str(preset)).embed(WORDS)
    clip = keras_hub.models.CLIPBackbone.from_preset(str(preset))
    tokenizer = keras_hub.tokenizers.CLIPTokenizer.from_preset(str(preset))
    packed = keras_hub.models.CLIPPreprocessor(tokenizer, sequence_length=16)(
        {"prompts": WORDS, "images": None}
    )
    logits = clip({"images": spec.preprocess(images), "token_ids": packed["token_ids"]})
    similarity = np.asarray(logits["vision_logits"]) / np.exp(float(clip.clip_head.logit_scale))
    np.testing.assert_allclose(stored @ words.T, similarity, atol=1e-5)
    # Euclidean distance of unit vectors ranks as this similarity, nearest first.
    distances = np.linalg.norm(stored[:, None, :] - words[None, :, :], axis=2)
    np.testing.assert_array_equal(np.argsort(distances, axis=0), np.argsort(-similarity, axis=0))
    load_feature_model.cache_clear()


@pytest.mark.slow
def test_weights_none_take_the_tokenizer_from_the_setting(tmp_path: Path) -> None:
    with pytest.raises(TextTowerError) as info:
        load_text_encoder("clip_vit_b32", "none")
    assert str(info.value) == (
        "weights 'none' bring no tokenizer: set LOOKALIKE_TOKENIZER to a CLIP preset folder, "
        "or to a folder holding vocabulary.json and merges.txt"
    )
    with pytest.raises(TextTowerError, match="no CLIP tokenizer in"):
        load_text_encoder("clip_vit_b32", "none", str(tmp_path))
    vocabulary = write_vocabulary(tmp_path / "words")
    seeded = load_text_encoder("clip_vit_b32", "none", str(vocabulary)).embed(WORDS)
    assert seeded.shape == (3, 24)
    # The seeded tower is the one a preset saved from the seeded model holds.
    preset = write_clip_preset(tmp_path / "preset")
    np.testing.assert_allclose(
        load_text_encoder("clip_vit_b32", str(preset)).embed(WORDS), seeded, atol=1e-6
    )
    from_preset_folder = load_text_encoder("clip_vit_b32", "none", str(preset)).embed(WORDS)
    np.testing.assert_allclose(from_preset_folder, seeded, atol=1e-6)


def test_a_model_without_a_text_tower_says_so() -> None:
    with pytest.raises(TextTowerError) as info:
        load_text_encoder("dinov2_small", "none")
    assert str(info.value) == "dinov2_small has no text tower; models with one: clip_vit_b32"


@pytest.mark.slow
def test_a_vocabulary_whose_end_token_is_not_last_is_refused(tmp_path: Path) -> None:
    folder = write_vocabulary(tmp_path / "words")
    tokens = json.loads((folder / "vocabulary.json").read_text())
    tokens["<|endoftext|>"], tokens["a"] = 0, tokens["<|endoftext|>"]
    (folder / "vocabulary.json").write_text(json.dumps(tokens))
    with pytest.raises(TextTowerError, match="<|endoftext|> must have the highest token id"):
        load_text_encoder("clip_vit_b32", "none", str(folder))
