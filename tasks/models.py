"""The feature models, free of Prefect: the networks, their weights and precision, and images
(or, for CLIP, words) to vectors.

Extraction (tasks/extract.py) and the API's search by upload both load their model here.
Importing this module costs numpy only; TensorFlow and Keras are imported when a model is
first built, KerasHub only when a KerasHub model is. A network is described by a ModelSpec
(input size, preprocessing, output dimension, pooling, where its pretrained weights come from,
how to build it), registered in MODELS under its --model key; FeatureModel is one spec built
with some weights, computing in one precision, for a fixed batch size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.tasks.errors import LookalikeError, first_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "inception_v3"
PRECISIONS = ("float32", "bfloat16", "float16")
# Keras dtype policies: the variables stay float32, the layers compute in the narrower type.
_DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# /proc/cpuinfo flags of CPUs whose oneDNN kernels compute bfloat16 natively; elsewhere
# TensorFlow emulates it, slower than float32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Set by tests only (to anything but "" or "0"): KerasHub models are built in their reduced
# configuration (ModelSpec.reduced), stored under a name that says so, and the CLI says so.
REDUCED_MODELS_VARIABLE = "LOOKALIKE_TEST_REDUCED_MODELS"
WEIGHT_FILE_SUFFIXES = (".h5", ".keras")  # .weights.h5 ends in .h5
RANDOM_INIT_SEED = 0
# Part of the identity of weights "none": features from an older random init (Keras's own
# initialisers, which differed between processes) must never share a cache key with these.
RANDOM_INIT_SCHEME = "numpy he-uniform"
# Embedding tables of the transformers (tokens, positions, class token) start as KerasHub's
# own initialisers draw them: normal with this standard deviation.
EMBEDDING_INIT_STDDEV = 0.02
# What TensorFlow writes to stderr when it looks for a GPU on a machine that has none: an
# error line (cuInit fails) and notes that no driver was found. Dropped only on such a
# machine; anything else TensorFlow writes meanwhile is passed on.
_NO_GPU_NOISE = re.compile(
    r"failed call to cuInit|Could not find cuda drivers|"
    r"All log messages before absl::InitializeLog\(\) is called"
)
# TensorFlow's start-up notes (absl INFO lines such as "oneDNN custom operations are on", and
# the CPU-feature note): written before TF_CPP_MIN_LOG_LEVEL takes effect, so they are
# dropped here when that variable asks for quiet (the CLI sets it unless --verbose).
_STARTUP_NOISE = re.compile(
    r"^I\d{4} [\d:.]+\s+\d+ \S+:\d+\] |"
    r"^To enable the following instructions: .*rebuild TensorFlow|" + _NO_GPU_NOISE.pattern
)


class WeightsError(LookalikeError, ValueError):
    """The --weights value cannot be used; one line for the user."""


class UnknownModelError(LookalikeError, ValueError):
    """A --model key or a stored model name this version does not know."""


class PrecisionError(LookalikeError, ValueError):
    """The --precision value cannot run on this machine; one line for the user."""


def _whole_network(network: Any, inputs: Any) -> Any:
    """The network's own output: keras.applications models end in their pooling."""
    return network(inputs, training=False)


@dataclass(frozen=True)
class ModelSpec:
    """One network as extraction and search see it: pixels of a size in, vectors out."""

    key: str  # the --model value (LOOKALIKE_MODEL)
    name: str  # stored with the collection and every vector (see feature_model_name)
    input_size: int  # decoded images are input_size x input_size RGB
    feature_dim: int  # length of one feature vector
    pooling: str  # what one vector is, in words
    weights_source: str  # where weights "imagenet" come from, in words
    weights_url: str  # what is fetched for weights "imagenet" (empty: nothing to fetch)
    # The network: weights "imagenet", a weights file or a preset folder; None: fresh layers.
    build: Callable[[str | None], Any]
    preprocess: Callable[[Any], Any]  # uint8 pixel tensor -> the network's input tensor
    head: Callable[[Any, Any], Any] = _whole_network  # (network, input) -> a vector per image
    normalised: bool = False  # vectors are L2-normalised: euclidean distance ranks as cosine
    text_tower: bool = False  # True: load_text_encoder embeds words into the same space
    keras_hub: bool = False  # a KerasHub backbone: preset folders fit it
    preset: str = ""  # the KerasHub preset of weights "imagenet"
    after_seed: Callable[[Any], None] | None = None  # derives state from seeded variables
    # The same architecture, much smaller, for tests on small machines (never a user's
    # choice: REDUCED_MODELS_VARIABLE selects it, and its name says what it is).
    reduced: ModelSpec | None = None
    test_only: bool = False  # True for the reduced twins: the CLI says so
    good_for: str = ""


# --- keras.applications: InceptionV3 and ResNet50 ------------------------------------------


def _build_keras_application(constructor: str, size: int, weights: str | None) -> Any:
    """A keras.applications network without its top, average-pooled; a weights file is read
    with Model.load_weights (legacy .h5, .weights.h5 and .keras alike)."""
    import keras

    from_file = weights not in (None, "imagenet")
    network = getattr(keras.applications, constructor)(
        include_top=False,
        pooling="avg",
        input_shape=(size, size, 3),
        weights=None if from_file else weights,
    )
    if from_file:
        network.load_weights(weights)
    return network


def _inception_preprocess(pixels: Any) -> Any:
    """Pixels scaled to [-1, 1], as keras.applications.inception_v3.preprocess_input."""
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) / 127.5 - 1.0


# keras.applications.resnet50.preprocess_input ("caffe"): BGR order, ImageNet mean removed.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def _resnet_preprocess(pixels: Any) -> Any:
    """Pixels as keras.applications.resnet50.preprocess_input gives them: BGR, mean removed."""
    import tensorflow as tf

    return tf.reverse(tf.cast(pixels, tf.float32), axis=[-1]) - tf.constant(_CAFFE_BGR_MEAN)


def _zero_residual_branches(network: Any) -> None:
    """Seeded ResNet50 blocks start as the identity: the last batch normalisation of each
    residual branch scales by 0 (the zero-gamma initialisation of Goyal et al., 2017).
    Otherwise 16 blocks of He-uniform kernels add up to activations near 1e6, past float16's
    range (65504) on a GPU."""
    for layer in network.layers:
        if layer.name.endswith("_3_bn"):
            layer.gamma.assign(np.zeros(tuple(layer.gamma.shape), dtype=np.float32))


def _standardise(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], Any]:
    """Pixels to [0, 1], then per channel (x - mean) / std, as the model was trained."""

    def preprocess(pixels: Any) -> Any:
        import tensorflow as tf

        return (tf.cast(pixels, tf.float32) / 255.0 - tf.constant(mean)) / tf.constant(std)

    return preprocess


INCEPTION_V3 = ModelSpec(
    key="inception_v3",
    name="InceptionV3",
    input_size=299,
    feature_dim=2048,
    pooling="average of the last convolution block (include_top=False, pooling='avg')",
    weights_source="ImageNet weights of keras.applications, downloaded by Keras once",
    weights_url="https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    build=functools.partial(_build_keras_application, "InceptionV3", 299),
    preprocess=_inception_preprocess,
    good_for="the features of every database before --model: near duplicates, crops, edits",
)

RESNET50 = ModelSpec(
    key="resnet50",
    name="ResNet50",
    input_size=224,
    feature_dim=2048,
    pooling="average of the last convolution block (include_top=False, pooling='avg')",
    weights_source="ImageNet weights of keras.applications, downloaded by Keras once",
    weights_url="https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    build=functools.partial(_build_keras_application, "ResNet50", 224),
    preprocess=_resnet_preprocess,
    after_seed=_zero_residual_branches,
    good_for="a second ImageNet CNN at 224 pixels: the same kind of similarity, other errors",
)


# --- KerasHub: DINOv2 and CLIP -------------------------------------------------------------

# DINOv2 ViT-S/14 as KerasHub's preset dinov2_small holds it (facebook/dinov2-small), run at
# 224 pixels: 16 x 16 patches, position embeddings interpolated from the 518-pixel table.
DINOV2_SMALL: dict[str, Any] = {
    "patch_size": 14,
    "num_layers": 12,
    "hidden_dim": 384,
    "num_heads": 6,
    "intermediate_dim": 1536,
    "layer_scale_init_value": 1.0,
    "image_shape": (224, 224, 3),
    "position_embedding_shape": (518, 518, 3),
}
DINOV2_REDUCED = {
    **DINOV2_SMALL,
    "num_layers": 2,
    "hidden_dim": 32,
    "num_heads": 2,
    "intermediate_dim": 64,
    "image_shape": (56, 56, 3),
    "position_embedding_shape": (70, 70, 3),
}
# OpenAI's CLIP ViT-B/32 as KerasHub's preset clip_vit_base_patch32 holds it.
CLIP_VIT_B32: dict[str, Any] = {
    "vision": {
        "patch_size": 32,
        "hidden_dim": 768,
        "num_layers": 12,
        "num_heads": 12,
        "intermediate_dim": 3072,
        "intermediate_activation": "quick_gelu",
        "image_shape": (224, 224, 3),
    },
    "text": {
        "vocabulary_size": 49408,
        "embedding_dim": 512,
        "hidden_dim": 512,
        "num_layers": 12,
        "num_heads": 8,
        "intermediate_dim": 2048,
        "intermediate_activation": "quick_gelu",
        "max_sequence_length": 77,
    },
    "projection_dim": 512,
}
CLIP_REDUCED = {
    "vision": {**CLIP_VIT_B32["vision"], "patch_size": 8, "hidden_dim": 32, "num_layers": 2,
               "num_heads": 2, "intermediate_dim": 64, "image_shape": (32, 32, 3)},
    "text": {**CLIP_VIT_B32["text"], "vocabulary_size": 512, "embedding_dim": 32,
             "hidden_dim": 32, "num_layers": 2, "num_heads": 2, "intermediate_dim": 64,
             "max_sequence_length": 16},
    "projection_dim": 24,
}  # fmt: skip
# The ImageNet statistics DINOv2 was trained with, and OpenAI CLIP's own.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _preset_source(preset: str, weights: str) -> str:
    """What KerasHub's from_preset loads: the named preset for "imagenet", else the folder."""
    return preset if weights == "imagenet" else weights


def _build_dinov2(config: dict[str, Any], preset: str, weights: str | None) -> Any:
    """KerasHub's DINOv2 backbone; a preset is loaded at this configuration's image size
    (KerasHub interpolates the position embeddings it was trained with)."""
    backbone = import_keras_hub().models.DINOV2Backbone
    if weights is None or Path(weights).is_file():
        return _load_file(backbone(**config), weights)
    return backbone.from_preset(_preset_source(preset, weights), image_shape=config["image_shape"])


def _build_clip(config: dict[str, Any], preset: str, weights: str | None) -> Any:
    """KerasHub's CLIP backbone, both towers (the text tower serves load_text_encoder)."""
    keras_hub = import_keras_hub()

    if weights is None or Path(weights).is_file():
        network = keras_hub.models.CLIPBackbone(
            vision_encoder=keras_hub.models.CLIPVisionEncoder(**config["vision"]),
            text_encoder=keras_hub.models.CLIPTextEncoder(**config["text"]),
            projection_dim=config["projection_dim"],
        )
        return _load_file(network, weights)
    return keras_hub.models.CLIPBackbone.from_preset(_preset_source(preset, weights))


def _load_file(network: Any, weights: str | None) -> Any:
    """The network with the weights of a file (.weights.h5 or .keras) read in; None: as is."""
    if weights is not None:
        network.load_weights(weights)
    return network


def _class_token(network: Any, inputs: Any) -> Any:
    """DINOv2's class token after the final layer norm.

    The class token, not the mean of the patch tokens: DINOv2's image-level (DINO) objective
    trains the class token as the whole image's descriptor, and the paper's retrieval and
    k-NN results use it; the patch tokens carry the local (iBOT) objective.
    """
    return network({"images": inputs}, training=False)[:, 0, :]


def _clip_image_embedding(network: Any, inputs: Any) -> Any:
    """CLIP's image embedding: the class token of the vision tower (CLIP's own pooling, the
    one its contrastive training aligned with the text), projected into the joint space."""
    return network.get_vision_embeddings(inputs)


def _derive_dinov2_positions(network: Any) -> None:
    """DINOv2 adds position embeddings interpolated from its stored table to the image size;
    KerasHub derives them when it loads weights, so seeded ones are derived the same way
    (a seeded model saved as a preset then loads as the same model)."""
    embeddings = network.embeddings
    embeddings.interpolated_position_embeddings.assign(
        embeddings._interpolate_position_embeddings(
            embeddings.position_embeddings,
            patch_size=embeddings.patch_size,
            source_shape=embeddings.position_embedding_shape,
            target_shape=embeddings.image_shape,
            antialias=embeddings.antialias_in_interpolation,
        )
    )


_DINOV2_POOLING = "class token after the final layer norm, L2-normalised"
_CLIP_POOLING = "class token of the image tower, projected into the joint space, L2-normalised"
_REDUCED_NOTE = "reduced test-only configuration: no pretrained weights"

DINOV2_SMALL_SPEC = ModelSpec(
    key="dinov2_small",
    name="DINOv2-small",
    input_size=224,
    feature_dim=384,
    pooling=_DINOV2_POOLING,
    weights_source="KerasHub preset dinov2_small (Meta's DINOv2 ViT-S/14), downloaded once",
    weights_url="kaggle://keras/dinov2/keras/dinov2_small/1",
    build=functools.partial(_build_dinov2, DINOV2_SMALL, "dinov2_small"),
    preprocess=_standardise(_IMAGENET_MEAN, _IMAGENET_STD),
    head=_class_token,
    normalised=True,
    keras_hub=True,
    preset="dinov2_small",
    after_seed=_derive_dinov2_positions,
    good_for="the same object or scene across photos (self-supervised), 384 floats a vector",
)
DINOV2_SMALL_SPEC = replace(
    DINOV2_SMALL_SPEC,
    reduced=replace(
        DINOV2_SMALL_SPEC,
        name="DINOv2-small-reduced-for-tests",
        test_only=True,
        input_size=56,
        feature_dim=32,
        weights_source=_REDUCED_NOTE,
        weights_url="",
        build=functools.partial(_build_dinov2, DINOV2_REDUCED, ""),
        preset="",
    ),
)

CLIP_VIT_B32_SPEC = ModelSpec(
    key="clip_vit_b32",
    name="CLIP-ViT-B-32",
    input_size=224,
    feature_dim=512,
    pooling=_CLIP_POOLING,
    weights_source="KerasHub preset clip_vit_base_patch32 (OpenAI CLIP ViT-B/32), downloaded once",
    weights_url="kaggle://keras/clip/keras/clip_vit_base_patch32/3",
    build=functools.partial(_build_clip, CLIP_VIT_B32, "clip_vit_base_patch32"),
    preprocess=_standardise(_CLIP_MEAN, _CLIP_STD),
    head=_clip_image_embedding,
    normalised=True,
    text_tower=True,
    keras_hub=True,
    preset="clip_vit_base_patch32",
    good_for="what a photo shows (semantic), and searching the images by words",
)
CLIP_VIT_B32_SPEC = replace(
    CLIP_VIT_B32_SPEC,
    reduced=replace(
        CLIP_VIT_B32_SPEC,
        name="CLIP-ViT-B-32-reduced-for-tests",
        test_only=True,
        input_size=32,
        feature_dim=24,
        weights_source=_REDUCED_NOTE,
        weights_url="",
        build=functools.partial(_build_clip, CLIP_REDUCED, ""),
        preset="",
    ),
)

MODELS: dict[str, ModelSpec] = {
    spec.key: spec for spec in (INCEPTION_V3, RESNET50, DINOV2_SMALL_SPEC, CLIP_VIT_B32_SPEC)
}


def model_spec(key: str) -> ModelSpec:
    """The registered model of a --model key; its reduced twin when tests ask for it."""
    spec = MODELS.get(key)
    if spec is None:
        raise UnknownModelError(f"unknown model {key!r}: choose one of {', '.join(MODELS)}")
    if spec.reduced is not None and reduced_models_wanted():
        return spec.reduced
    return spec


def reduced_models_wanted() -> bool:
    """Whether tests asked for the reduced configurations (REDUCED_MODELS_VARIABLE)."""
    return os.environ.get(REDUCED_MODELS_VARIABLE, "").strip() not in ("", "0")


def feature_model_name(spec: ModelSpec, precision: str) -> str:
    """What the collection, every stored vector and the cache keys record as the model: the
    spec's name, and the precision unless it is float32, so that the databases and staged
    batches made before the precision could be chosen keep their names and keys."""
    return spec.name if precision == "float32" else f"{spec.name} {precision}"


def parse_model_name(stored: str) -> tuple[ModelSpec, str]:
    """The spec and precision feature_model_name made a stored name from."""
    name, _, precision = stored.partition(" ")
    precision = precision or "float32"
    every = [spec for key in MODELS for spec in (MODELS[key], MODELS[key].reduced) if spec]
    for spec in every:
        if spec.name == name and precision in PRECISIONS:
            return spec, precision
    known = ", ".join(spec.name for spec in every)
    raise UnknownModelError(f"unknown model {stored!r}: this version knows {known}")


def feature_identity(model_key: str, weights: str, precision: str = "") -> tuple[str, str]:
    """(stored model name, weights id) of a run with these settings, decided without
    TensorFlow (the precision from the machine's device files); one line (UnknownModelError,
    PrecisionError, WeightsError) when they cannot be used here."""
    spec = model_spec(model_key)
    resolved = resolve_precision(precision)
    check_precision(resolved, on_gpu=gpu_device_files())
    return feature_model_name(spec, resolved), weights_identity(weights, spec)


def feature_dim_of(stored: str) -> int:
    """The length of the vectors a stored model name stands for."""
    return parse_model_name(stored)[0].feature_dim


# --- precision ------------------------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """The precision a run computes in; empty: float16 on a machine with a GPU device (as
    before the precision could be chosen), float32 elsewhere. Decided without TensorFlow."""
    if not precision:
        return "float16" if gpu_device_files() else "float32"
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def check_precision(precision: str, on_gpu: bool) -> None:
    """Refuse, in one line, a precision this machine would compute slower than float32.

    On a CPU, float16 is refused: TensorFlow has no fast float16 kernels there (InceptionV3
    ran at 7.7 images/s against 19 in float32 on a Xeon with AVX512-FP16), and float16 keeps
    no more of float32's ranking than bfloat16. bfloat16 needs AVX512-BF16 or AMX.
    """
    if on_gpu or precision == "float32":
        return
    if precision == "float16":
        raise PrecisionError(
            "float16 runs only on a GPU: on a CPU TensorFlow computes it slower than float32 "
            "(about 2.5 times); use --precision float32, or bfloat16 on a CPU with AVX512-BF16 "
            "or AMX"
        )
    if not cpu_has_bf16():
        raise PrecisionError(
            "bfloat16 needs a CPU with AVX512-BF16 or AMX (avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo), or a GPU; this machine has neither: use --precision float32"
        )


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (a flag of BF16_CPU_FLAGS in cpuinfo)."""
    try:
        flags = set(cpuinfo.read_text(errors="replace").split())
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def set_precision(network: Any, precision: str) -> None:
    """Every layer computes in this precision (Keras mixed policies: variables stay float32).

    Set after building, not as Keras's global policy before: KerasHub presets store float32
    policies for their towers, which a global policy does not reach. The features equal those
    of a network built under the global policy.
    """
    if precision == "float32":
        return
    for layer in network._flatten_layers(include_self=True):
        layer.dtype_policy = _DTYPE_POLICIES[precision]


# --- weights --------------------------------------------------------------------------------


def weights_identity(weights: str, spec: ModelSpec = INCEPTION_V3) -> str:
    """A stable name for the weights, stored with the collection and in cache keys."""
    if weights == "none":
        return f"none (random init, seed {RANDOM_INIT_SEED}, {RANDOM_INIT_SCHEME})"
    if weights == "imagenet":
        if not spec.weights_url:
            raise WeightsError(f"{spec.name} has no pretrained weights: use --weights none")
        return f"preset {spec.weights_url}" if spec.preset else "imagenet"
    path = Path(weights)
    if path.is_dir():
        return f"preset {path.name} ({_preset_digest(path, spec)})"
    if not path.is_file():
        raise WeightsError(
            "weights must be 'imagenet', 'none', a Keras weights file (.h5, .weights.h5, "
            f".keras) or a KerasHub preset folder; not found: {weights}"
        )
    if not path.name.endswith(WEIGHT_FILE_SUFFIXES):
        raise WeightsError(
            f"weights file must be a Keras .h5, .weights.h5 or .keras file: {weights}"
        )
    return f"file {path.name} ({_file_digest(path)})"


def _file_digest(path: Path) -> str:
    """The file's BLAKE2b-64 digest, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=8)).hexdigest()


def _preset_digest(folder: Path, spec: ModelSpec) -> str:
    """A digest of a KerasHub preset folder: every file's path and digest, in path order."""
    if not spec.keras_hub:
        hub = ", ".join(key for key, other in MODELS.items() if other.keras_hub)
        raise WeightsError(
            f"a preset folder serves the KerasHub models ({hub}); {spec.key} takes a weights "
            f"file: {folder}"
        )
    if not (folder / "config.json").is_file():
        raise WeightsError(f"not a KerasHub preset folder (no config.json): {folder}")
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_file_digest(path)}\0".encode())
    return digest.hexdigest()


def build_with_weights(spec: ModelSpec, weights: str) -> Any:
    """The spec's network with these weights, in float32; WeightsError (one line) when they
    cannot be had: not downloadable, or a file or folder that does not fit the spec."""
    if weights == "none":
        network = spec.build(None)
        seed_weights(network, RANDOM_INIT_SEED)
        if spec.after_seed is not None:
            spec.after_seed(network)
        return network
    try:
        network = spec.build(weights)
    except Exception as exc:
        if weights == "imagenet" and _is_download_failure(exc):
            log.debug("fetching the pretrained weights failed", exc_info=True)
            raise WeightsError(unreachable_weights(spec, exc)) from None
        if weights == "imagenet":
            raise
        raise WeightsError(f"cannot load {weights} into {spec.key}: {first_line(exc)}") from None
    check_fits(spec, network, weights)
    return network


def check_fits(spec: ModelSpec, network: Any, weights: str) -> None:
    """WeightsError unless the network turns input_size pixels into feature_dim values (a
    preset folder brings its own architecture, which may be another size of the model)."""
    size = spec.input_size
    probe = spec.preprocess(np.zeros((1, size, size, 3), np.uint8))
    try:
        width = spec.head(network, probe).shape[-1]
    except Exception as exc:
        raise WeightsError(
            f"{weights} does not fit {spec.key} ({size}x{size} pixels in): {first_line(exc)}"
        ) from None
    if int(width) != spec.feature_dim:
        raise WeightsError(
            f"{weights} gives {int(width)} features per image; {spec.key} has {spec.feature_dim}"
        )


def _is_download_failure(exc: BaseException) -> bool:
    """A failed download: Keras wraps its own in a bare Exception saying "fetch failure";
    KerasHub's (kagglehub over requests) ends in an OSError such as ConnectionError."""
    return "fetch failure" in str(exc) or isinstance(exc, OSError)


def unreachable_weights(spec: ModelSpec, exc: BaseException) -> str:
    """One line: what could not be fetched, why, and the two ways out."""
    reason = _failure_reason(exc)
    if spec.keras_hub:
        return (
            f"could not fetch the pretrained weights of {spec.name} (KerasHub preset "
            f"{spec.preset}) from {spec.weights_url} ({reason}): give a local copy with "
            "--weights FOLDER, a KerasHub preset folder (LOOKALIKE_WEIGHTS), or try lookalike "
            "without them with --weights none (seeded random init)"
        )
    return (
        f"could not fetch the ImageNet weights of {spec.name} from {spec.weights_url} "
        f"({reason}): give a local copy with --weights FILE.h5 (LOOKALIKE_WEIGHTS), or try "
        "lookalike without them with --weights none (seeded random init)"
    )


def _failure_reason(exc: BaseException) -> str:
    """Why a download failed, briefly: Keras's reason after its " -- ", else the innermost
    cause (requests' message nests urllib3's, which nests the socket's)."""
    text = str(exc)
    if " -- " in text:
        return text.rsplit(" -- ", 1)[-1].strip()
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return first_line(exc)


# --- images to vectors ----------------------------------------------------------------------


class FeatureModel:
    """A ModelSpec built with some weights, in one precision, for a fixed batch size: uint8
    pixels in, float32 vectors out."""

    def __init__(
        self,
        weights: str,
        batch_size: int,
        spec: ModelSpec = INCEPTION_V3,
        precision: str = "float32",
    ) -> None:
        self.spec = spec
        self.precision = precision
        self.weights_id = weights_identity(weights, spec)
        self.model_name = feature_model_name(spec, precision)
        self.batch_size = batch_size
        tf, _ = import_tensorflow()
        self.on_gpu = bool(tf.config.list_physical_devices("GPU"))
        check_precision(precision, self.on_gpu)
        _configure_gpu(tf, self.on_gpu)
        self.model = build_with_weights(spec, weights)
        set_precision(self.model, precision)
        size = spec.input_size
        signature = tf.TensorSpec([batch_size, size, size, 3], tf.uint8)
        self._forward = tf.function(
            self._call, input_signature=[signature], jit_compile=self.on_gpu
        )

    def _call(self, pixels: Any) -> Any:
        import tensorflow as tf

        vectors = tf.cast(self.spec.head(self.model, self.spec.preprocess(pixels)), tf.float32)
        return tf.math.l2_normalize(vectors, axis=-1) if self.spec.normalised else vectors

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Features of any number of images; short batches are padded so nothing retraces."""
        count, size = len(pixels), self.spec.input_size
        out = np.empty((count, self.spec.feature_dim), dtype=np.float32)
        for start in range(0, count, self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, size, size, 3), dtype=np.uint8)
            padded[: len(chunk)] = chunk
            out[start : start + len(chunk)] = self._forward(padded).numpy()[: len(chunk)]
        return out


@functools.lru_cache(maxsize=2)
def load_feature_model(
    weights: str,
    batch_size: int = 64,
    spec: ModelSpec = INCEPTION_V3,
    precision: str = "float32",
) -> FeatureModel:
    """The feature model, built once per process for these weights, batch size and precision."""
    weights_identity(weights, spec)  # fail with one clear line before TensorFlow loads
    model = FeatureModel(weights, batch_size, spec, precision)
    log.info(
        "feature model %s ready, weights %s, %s",
        model.model_name,
        model.weights_id,
        "GPU" if model.on_gpu else "CPU",
    )
    return model


# --- words to vectors: CLIP's text tower ----------------------------------------------------


class TextTowerError(LookalikeError, ValueError):
    """Words cannot be embedded: a model without a text tower, or no tokenizer; one line."""


class TextEncoder:
    """Words to vectors in the image feature space of a text-capable model: float32 and
    L2-normalised like its stored image vectors, so that an exact search of a text vector
    among them ranks by CLIP similarity. Computes in float32 whatever the images' precision
    (a query is a few words; precision changes only rounding)."""

    def __init__(self, spec: ModelSpec, weights: str, tokenizer: str = "") -> None:
        self.spec = spec
        self.weights_id = weights_identity(weights, spec)
        tf, keras = import_tensorflow()
        hub = import_keras_hub()
        words = _clip_tokenizer(hub, spec, weights, tokenizer)
        network = build_with_weights(spec, weights)
        _check_vocabulary(words, network.text_encoder.vocabulary_size)
        self.sequence_length = int(network.text_encoder.max_sequence_length)
        self._preprocessor = hub.models.CLIPPreprocessor(
            words, sequence_length=self.sequence_length
        )
        # A model of the text tower alone: the image tower is no longer referenced once
        # `network` goes, and its memory is freed.
        token_ids = keras.Input((self.sequence_length,), dtype="int32")
        self._tower = keras.Model(token_ids, network.get_text_embeddings(token_ids))
        signature = tf.TensorSpec([None, self.sequence_length], tf.int32)
        self._forward = tf.function(self._call, input_signature=[signature])

    def _call(self, token_ids: Any) -> Any:
        import tensorflow as tf

        vectors = tf.cast(self._tower(token_ids, training=False), tf.float32)
        return tf.math.l2_normalize(vectors, axis=-1)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), feature_dim) float32 vectors, one per text (lower-cased, and cut to
        the tower's sequence length as CLIP's preprocessor does)."""
        if not texts:
            return np.empty((0, self.spec.feature_dim), dtype=np.float32)
        import tensorflow as tf

        packed = self._preprocessor({"prompts": list(texts), "images": None})
        return self._forward(tf.cast(packed["token_ids"], tf.int32)).numpy()


@functools.lru_cache(maxsize=2)
def load_text_encoder(model_key: str, weights: str, tokenizer: str = "") -> TextEncoder:
    """The text tower of a text-capable model (ModelSpec.text_tower) with these weights, built
    once per process on first use; the image feature model is not built.

    The tokenizer comes with the weights where they bring one: "imagenet" downloads the
    model's KerasHub preset, and a preset folder holding tokenizer.json (as KerasHub's
    save_to_preset writes it) serves its own. Weights that bring none, "none" (the seeded
    random initialisation) and weights files, take `tokenizer` (LOOKALIKE_TOKENIZER): a CLIP
    preset folder, or a folder holding vocabulary.json and merges.txt. Without it they raise
    TextTowerError rather than make up a vocabulary: random weights give random similarities,
    but the words must still be tokenised as CLIP's are.
    """
    spec = model_spec(model_key)
    if not spec.text_tower:
        with_text = ", ".join(key for key, other in MODELS.items() if other.text_tower)
        raise TextTowerError(f"{model_key} has no text tower; models with one: {with_text}")
    weights_identity(weights, spec)  # fail with one clear line before TensorFlow loads
    return TextEncoder(spec, weights, tokenizer)


def _clip_tokenizer(hub: Any, spec: ModelSpec, weights: str, tokenizer: str) -> Any:
    """CLIP's tokenizer from where load_text_encoder says it comes from."""
    tokenizers = hub.tokenizers.CLIPTokenizer
    if weights == "imagenet":
        try:
            return tokenizers.from_preset(spec.preset)
        except Exception as exc:
            if not _is_download_failure(exc):
                raise
            raise WeightsError(unreachable_weights(spec, exc)) from None
    folder = Path(weights)
    if not (folder / "tokenizer.json").is_file():
        if not tokenizer:
            raise TextTowerError(
                f"weights {weights!r} bring no tokenizer: set LOOKALIKE_TOKENIZER to a CLIP "
                "preset folder, or to a folder holding vocabulary.json and merges.txt"
            )
        folder = Path(tokenizer)
    if (folder / "tokenizer.json").is_file():
        return tokenizers.from_preset(str(folder))
    vocabulary, merges = folder / "vocabulary.json", folder / "merges.txt"
    if not (vocabulary.is_file() and merges.is_file()):
        raise TextTowerError(
            f"no CLIP tokenizer in {folder}: a preset folder (tokenizer.json) or "
            "vocabulary.json and merges.txt"
        )
    return tokenizers(vocabulary=str(vocabulary), merges=str(merges))


def _check_vocabulary(tokenizer: Any, tower_vocabulary: int) -> None:
    """TextTowerError unless the tower can embed every token id, and the end token has the
    highest id: CLIP reads a text's vector at the position of its highest token id."""
    size = int(tokenizer.vocabulary_size())
    if size > tower_vocabulary:
        raise TextTowerError(
            f"the tokenizer has {size} tokens, the text tower embeds {tower_vocabulary}"
        )
    if int(tokenizer.end_token_id) != size - 1:
        raise TextTowerError("the tokenizer's <|endoftext|> must have the highest token id")


def import_keras_hub() -> Any:
    """KerasHub, imported after TensorFlow (import_tensorflow quiets TensorFlow's start)."""
    import_tensorflow()
    import keras_hub

    return keras_hub


def seed_weights(model: Any, seed: int) -> None:
    """Set every weight from numpy's seeded generator: the same model in any process or machine.

    Keras's own initialisers draw from TensorFlow's random state, which differs between
    processes (e.g. Dask workers); numpy's PCG64 stream does not. Variables are filled in
    model.weights order. Kernels are He-uniform (limit sqrt(6 / fan_in)), which keeps the
    activations of InceptionV3's 94 ReLU layers near unit scale (Glorot shrinks them about
    1000-fold); normalisations are the identity (gamma 1, beta 0, mean 0, variance 1, DINOv2's
    layer scale 1), embedding tables normal, biases 0. Integer variables (CLIP's position ids)
    are structure, not weights, and keep their values.
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "float" not in str(variable.dtype):
            continue
        shape = tuple(int(size) for size in variable.shape)
        variable.assign(_initial_value(variable.path, shape, rng))


# Transformer variables by name: tables of token, position and class embeddings.
_EMBEDDING_TABLES = frozenset(
    {"embeddings", "position_embeddings", "interpolated_position_embeddings", "cls_token",
     "class_embedding"}
)  # fmt: skip
# Multi-head attention's query, key and value kernels are (input, heads, head size): their
# fan-in is the first axis alone, not all but the last as for the other kernels.
_ATTENTION_INPUTS = frozenset({"query", "key", "value"})


def _initial_value(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The seeded value of one variable, from its path and shape."""
    parent, _, name = path.rpartition("/")
    if name in ("gamma", "moving_variance", "lambda1"):
        return np.ones(shape, dtype=np.float32)
    if name == "kernel":
        attention = parent.rsplit("/", 1)[-1] in _ATTENTION_INPUTS and len(shape) == 3
        fan_in = shape[0] if attention else int(np.prod(shape[:-1]))  # field x input channels
        limit = np.sqrt(6.0 / fan_in)
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    if name in _EMBEDDING_TABLES:
        return (rng.standard_normal(shape) * EMBEDDING_INIT_STDDEV).astype(np.float32)
    return np.zeros(shape, dtype=np.float32)  # beta, moving_mean, bias, mask token


def _configure_gpu(tf: Any, on_gpu: bool) -> None:
    """On a GPU, memory grows as needed instead of being taken whole at start."""
    if not on_gpu:
        return
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            log.debug("GPU already initialised; memory growth unchanged")


def limit_cpu_threads(threads: int) -> bool:
    """Run TensorFlow's CPU ops and BLAS on at most `threads` threads in this process.

    A web server gives a search the cores but one, so that its cheap routes keep a core.
    TensorFlow takes this only before its runtime starts: False, with a log line, after.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")  # the query's matrix products
    tf, _ = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.info("TensorFlow already started: its thread counts stay as they are")
        return False
    return True


def import_tensorflow() -> tuple[Any, Any]:
    """TensorFlow and Keras, imported with their devices found.

    On a machine without a GPU device, what TensorFlow writes to stderr while it looks for
    one (a cuInit error and driver notes) is left out: it is expected there, and in a web
    server's log it reads as a failure.
    """
    first = "tensorflow" not in sys.modules
    noise = _STARTUP_NOISE if startup_notes_unwanted() else _NO_GPU_NOISE
    quiet = first and (noise is _STARTUP_NOISE or not gpu_device_files())
    with _stderr_without(noise) if quiet else contextlib.nullcontext():
        import keras
        import tensorflow as tf

        tf.config.list_physical_devices()  # the first call initialises every device
    if first and noise is _STARTUP_NOISE:
        keras.config.disable_interactive_logging()  # "Downloading data from ..." to the log
    return tf, keras


def startup_notes_unwanted() -> bool:
    """Whether TF_CPP_MIN_LOG_LEVEL asks TensorFlow for fewer than its INFO lines."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() not in ("", "0")


def gpu_device_files() -> bool:
    """True when the machine has a GPU device node (NVIDIA, WSL or ROCm)."""
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists() or (dev / "kfd").exists()


@contextlib.contextmanager
def _stderr_without(noise: re.Pattern[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 meanwhile; pass on the lines not matching.

    TensorFlow writes from C++, below Python's sys.stderr, so only the descriptor can be
    redirected. A temporary file, not a pipe: writers never block on it. Lines of other
    threads written meanwhile come out afterwards, in order.
    """
    _flush_stderr()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().splitlines(keepends=True)
                if not noise.search(line.decode(errors="replace"))
            ]
            _write_all(2, b"".join(kept))


def _flush_stderr() -> None:
    """Flush Python's stderr, which has none when there is no console."""
    if sys.stderr is not None:
        sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may write only part)."""
    while data:
        data = data[os.write(fd, data) :]
