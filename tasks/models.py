"""The feature model, free of Prefect: what a network is, its weights, and images to vectors.

Extraction (tasks/extract.py) and the API's search by upload both load their model here.
Importing this module costs numpy only; TensorFlow and Keras are imported when a model is
first built. A network is described by a ModelSpec (input size, preprocessing, output
dimension, where its pretrained weights come from, how to build it); FeatureModel is one
spec built with some weights for a fixed batch size.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.sql.schema import FEATURE_DIM
from lookalike.tasks.decode import INPUT_SIZE
from lookalike.tasks.errors import LookalikeError

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
# Part of the identity of weights "none": features from an older random init (Keras's own
# initialisers, which differed between processes) must never share a cache key with these.
RANDOM_INIT_SCHEME = "numpy he-uniform"
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
    r"^To enable the following instructions: .*rebuild TensorFlow|"
    + _NO_GPU_NOISE.pattern
)


class WeightsError(LookalikeError, ValueError):
    """The --weights value cannot be used; one line for the user."""


@dataclass(frozen=True)
class ModelSpec:
    """One network as extraction and search see it: pixels of a size in, vectors out."""

    name: str  # stored with the collection and with every feature vector
    input_size: int  # decoded images are input_size x input_size RGB
    feature_dim: int  # length of one feature vector
    weights_source: str  # where weights "imagenet" come from
    weights_url: str  # what is fetched for weights "imagenet", named when fetching fails
    build: Callable[[str | None], Any]  # Keras model for "imagenet", a file, or None (random)
    preprocess: Callable[[Any], Any]  # uint8 pixel tensor -> the network's input tensor


def _build_inception_v3(weights: str | None) -> Any:
    """InceptionV3 without its top, average-pooled: 2048 features per image."""
    import keras

    return keras.applications.InceptionV3(
        include_top=False,
        pooling="avg",
        input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
        weights=weights,
    )


def _inception_preprocess(pixels: Any) -> Any:
    """Pixels scaled to [-1, 1], as keras.applications.inception_v3.preprocess_input."""
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) / 127.5 - 1.0


INCEPTION_V3 = ModelSpec(
    name="InceptionV3",
    input_size=INPUT_SIZE,
    feature_dim=FEATURE_DIM,
    weights_source="ImageNet weights of keras.applications, downloaded by Keras once",
    weights_url="https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    build=_build_inception_v3,
    preprocess=_inception_preprocess,
)


def weights_identity(weights: str) -> str:
    """A stable name for the weights, stored with the collection and in cache keys."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return f"none (random init, seed {RANDOM_INIT_SEED}, {RANDOM_INIT_SCHEME})"
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"weights must be 'imagenet', 'none' or an .h5 file; not found: {weights}"
        )
    if not path.name.endswith(".h5"):
        raise WeightsError(f"weights file must be a Keras .h5 file: {weights}")
    digest = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
    return f"file {path.name} ({digest})"


class FeatureModel:
    """A ModelSpec built with some weights for a fixed batch size: uint8 pixels in, float32 out."""

    def __init__(self, weights: str, batch_size: int, spec: ModelSpec = INCEPTION_V3) -> None:
        self.spec = spec
        self.weights_id = weights_identity(weights)
        self.model_name = spec.name
        self.batch_size = batch_size
        tf, keras = import_tensorflow()
        self.on_gpu = bool(tf.config.list_physical_devices("GPU"))
        _configure_devices(tf, keras, self.on_gpu)
        self.model = build_with_weights(spec, weights)
        if weights == "none":
            seed_weights(self.model, RANDOM_INIT_SEED)
        size = spec.input_size
        signature = tf.TensorSpec([batch_size, size, size, 3], tf.uint8)
        self._forward = tf.function(
            self._call, input_signature=[signature], jit_compile=self.on_gpu
        )

    def _call(self, pixels: Any) -> Any:
        import tensorflow as tf

        return tf.cast(self.model(self.spec.preprocess(pixels), training=False), tf.float32)

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


def build_with_weights(spec: ModelSpec, weights: str) -> Any:
    """The spec's Keras model with these weights; WeightsError when they cannot be fetched."""
    if weights == "none":
        return spec.build(None)
    try:
        return spec.build(weights)
    except Exception as exc:  # Keras wraps a failed download in a bare Exception
        if weights != "imagenet" or "fetch failure" not in str(exc):
            raise
        log.debug("fetching the pretrained weights failed", exc_info=True)
        raise WeightsError(unreachable_weights(spec, exc)) from None


def unreachable_weights(spec: ModelSpec, exc: BaseException) -> str:
    """One line: what could not be fetched, why, and the two ways out."""
    reason = str(exc).rsplit(" -- ", 1)[-1].strip() or type(exc).__name__
    return (
        f"could not fetch the ImageNet weights of {spec.name} from {spec.weights_url} "
        f"({reason}): give a local copy with --weights FILE.h5 (LOOKALIKE_WEIGHTS), or try "
        "lookalike without them with --weights none (seeded random init)"
    )


@functools.lru_cache(maxsize=2)
def load_feature_model(
    weights: str, batch_size: int = 64, spec: ModelSpec = INCEPTION_V3
) -> FeatureModel:
    """The feature model, built once per process for these weights and batch size."""
    weights_identity(weights)  # fail with one clear line before TensorFlow loads
    model = FeatureModel(weights, batch_size, spec)
    log.info(
        "feature model %s ready, weights %s, %s",
        model.model_name,
        model.weights_id,
        "GPU" if model.on_gpu else "CPU",
    )
    return model


def seed_weights(model: Any, seed: int) -> None:
    """Set every weight from numpy's seeded generator: the same model in any process or machine.

    Keras's own initialisers draw from TensorFlow's random state, which differs between
    processes (e.g. Dask workers); numpy's PCG64 stream does not. Variables are filled in
    model.weights order. Kernels are He-uniform (limit sqrt(6 / fan_in)), which keeps the
    activations of the 94 ReLU layers near unit scale (Glorot shrinks them about 1000-fold);
    batch normalisation is the identity (gamma 1, beta 0, mean 0, variance 1), biases are 0.
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(int(size) for size in variable.shape)
        variable.assign(_initial_value(variable.path.rsplit("/", 1)[-1], shape, rng))


def _initial_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The seeded value of one variable, from its name and shape."""
    if name in ("gamma", "moving_variance"):
        return np.ones(shape, dtype=np.float32)
    if name == "kernel":
        fan_in = int(np.prod(shape[:-1]))  # receptive field x input channels
        limit = np.sqrt(6.0 / fan_in)
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    return np.zeros(shape, dtype=np.float32)  # beta, moving_mean, bias


def _configure_devices(tf: Any, keras: Any, on_gpu: bool) -> None:
    """On a GPU: memory growth and float16 compute; on a CPU: leave the defaults."""
    if not on_gpu:
        return
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            log.debug("GPU already initialised; memory growth unchanged")
    keras.mixed_precision.set_global_policy("mixed_float16")


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
