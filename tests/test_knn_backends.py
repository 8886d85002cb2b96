"""Choosing the kNN engine's tile backend."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lookalike.tasks.knn import backends
from lookalike.tasks.knn.passes import knn_all


def test_a_gpu_without_tensorflow_leaves_the_engine_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "_gpu_device_files", lambda: True)  # a GPU is there
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # but TensorFlow cannot be imported
    assert backends.gpu_visible() is False
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    lists = knn_all(x, np.arange(60), 5)  # the default backend: numba or numpy, no error
    assert lists.neighbour_ids.shape == (60, 5)
