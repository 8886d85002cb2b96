"""The tile backend of a pass: TensorFlow on a GPU, else compiled (numba) or numpy on the CPU."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lookalike.tasks.knn.compiled import CompiledTiles, compiled_kernels, numba_installed
from lookalike.tasks.knn.space import FeatureSpace, KnnInputError
from lookalike.tasks.knn.tiles import NumpyTiles, TensorFlowTiles, TileBackend

BACKENDS = ("numba", "numpy", "tensorflow")


@contextlib.contextmanager
def open_backend(name: str | None, space: FeatureSpace) -> Iterator[TileBackend]:
    """The tile backend: TensorFlow when asked or when a GPU is visible, else numba, else numpy.

    With numba the space's direct distances (the re-rank) are compiled too, for the pass.

    Under TensorFlow, TF32 matmuls are switched off while the engine runs: they would make
    the expansion too coarse for the error bound.
    """
    name = chosen_backend(name)
    if name == "numpy":
        yield NumpyTiles()
        return
    if name == "numba":
        if not numba_installed():
            raise KnnInputError("the numba kNN backend needs numba: pip install numba")
        tiles = CompiledTiles()
        space.kernels = tiles.kernels
        try:
            yield tiles
        finally:
            space.kernels = None
        return
    import tensorflow as tf

    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield TensorFlowTiles()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)


def chosen_backend(name: str | None) -> str:
    """The backend a pass runs on: `name`, or when None TensorFlow if a GPU is visible,
    else numba where installed, else numpy."""
    if name not in (None, *BACKENDS):
        raise KnnInputError(f"unknown kNN backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name is None:
        return "tensorflow" if gpu_visible() else "numba" if numba_installed() else "numpy"
    return name


def prepare_kernels(name: str | None) -> Any:
    """The compiled kernels for prepare_space when the pass runs on numba, else None
    (where numba is missing, open_backend then refuses "numba" with a clear message)."""
    return compiled_kernels() if chosen_backend(name) == "numba" and numba_installed() else None


def gpu_visible() -> bool:
    """True when TensorFlow sees a GPU; TensorFlow is only imported if a GPU may exist.

    A GPU without TensorFlow (an engine-only install) is no GPU to the engine.
    """
    if "tensorflow" not in sys.modules and not _gpu_device_files():
        return False
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def _gpu_device_files() -> bool:
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "dxg").exists() or (dev / "kfd").exists()
