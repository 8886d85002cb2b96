"""The kNN engine's running candidate lists."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.tasks.knn.tiles import CandidateLists


def test_best_of_some_slots_is_best_of_all_for_those_slots() -> None:
    rng = np.random.default_rng(6)
    whole, some = CandidateLists(50, 4), CandidateLists(50, 4)
    batches = []
    for batch in range(6):  # one entry per chosen slot and batch: slots 0-9 overflow
        slots = np.sort(rng.choice(50, 30, replace=False) if batch % 2 else np.arange(10))
        batches.append((slots, rng.random(len(slots)).astype(np.float32), batch * 50 + slots))
    for lists in (whole, some):
        for slots, values, sources in batches:
            lists.merge(slots, values, sources, np.empty(0, np.int64), np.empty(0, np.float32))
    wanted = np.array([0, 7, 31, 49])
    values, sources = some.best_of(wanted)
    all_values, all_sources = whole.best()
    np.testing.assert_array_equal(values, all_values[wanted])
    np.testing.assert_array_equal(sources, all_sources[wanted])
    np.testing.assert_array_equal(some.limits[wanted], whole.limits[wanted])
    assert np.isfinite(some.limits[0]) and (sources[0] >= 0).all()  # slot 0 was cut back


@pytest.mark.parametrize(("cores", "rows"), [(2, 4096), (8, 4096), (16, 2048), (64, 1024)])
def test_cpu_tiles_shrink_so_every_worker_s_tile_fits_the_budget(
    monkeypatch: pytest.MonkeyPatch, cores: int, rows: int
) -> None:
    from lookalike.tasks.knn import tiles as tiles_module
    from lookalike.tasks.knn.compiled import CompiledTiles
    from lookalike.tasks.knn.space import prepare_space

    monkeypatch.setattr(tiles_module, "cpu_cores", lambda: cores)
    monkeypatch.setattr(tiles_module, "available_memory", lambda: 64 << 30)
    space = prepare_space(np.zeros((20_000, 4), np.float32), np.arange(20_000), "euclidean", None)
    shape = tiles_module.tile_shape(space, None, CompiledTiles())
    assert shape.rows == shape.cols == rows
    assert cores * rows * rows * 4 <= tiles_module._CPU_TILES_BYTES
