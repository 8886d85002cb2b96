"""Map layout time and memory: UMAP from the stored neighbour graph vs UMAP searching itself.

Synthetic features (clusters in 2,048 dimensions, float32) and their exact neighbour lists
(k = 100, the engine of tasks/knn) stand for a collection. For each size, in a fresh process so
that peak memory is its own: the layout the map step makes (tasks/map_layout.fit_layout on
the first 15 stored neighbours; no feature is read) and, side by side where asked, plain
`umap.UMAP().fit_transform(features)`, which finds its neighbours itself (NNDescent). Both
single-threaded with a fixed seed, as the map step runs. The last line is one JSON object whose
ratio is ours over plain UMAP at the first size.

    .venv/bin/python benchmarks/map.py [--sizes 20000 100000] [--plain-up-to 20000]

The exact lists are computed once per size and kept in the temporary folder
(lookalike-map-bench-N.npz; 100,000 images: about a minute, 80 MB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DIM = 2048
K = 100
CLUSTERS = 200


def synthetic_features(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLUSTERS, DIM)).astype(np.float32)
    labels = rng.integers(0, CLUSTERS, count)
    return centres[labels] + rng.normal(0, 0.5, (count, DIM)).astype(np.float32)


def graph_file(count: int) -> Path:
    """The exact lists for `count` synthetic images, computed once and kept in /tmp."""
    path = Path(tempfile.gettempdir()) / f"lookalike-map-bench-{count}.npz"
    if not path.exists():
        from lookalike.tasks.knn.passes import knn_all

        ids = np.arange(1, count + 1, dtype=np.int64)
        lists = knn_all(synthetic_features(count), ids, K)
        np.savez(path, ids=ids, neighbour_ids=lists.neighbour_ids, distances=lists.distances)
    return path


def peak_mb() -> float:
    """This process's peak resident memory: VmHWM, which (unlike ru_maxrss) starts afresh at
    exec, not with the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def layout_once(count: int) -> dict[str, float]:
    """The map step's layout, in this process, from the stored lists."""
    from lookalike.tasks.map_layout import NeighbourGraph, fit_layout

    stored = np.load(graph_file(count))
    graph = NeighbourGraph.from_ids(stored["ids"], stored["neighbour_ids"], stored["distances"])
    small = synthetic_features(300, seed=1)[:, :8]  # numba compiles on a small graph first
    fit_layout(NeighbourGraph.from_ids(*small_lists(small)))
    before = peak_mb()
    started = time.perf_counter()
    fit_layout(graph)
    return {"layout_s": round(time.perf_counter() - started, 1),
            "peak_mb_before_layout": round(before), "peak_mb": round(peak_mb())}  # fmt: skip


def small_lists(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    squared = ((points[:, None] - points[None]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)
    order = np.argsort(squared, axis=1)[:, :20]
    return np.arange(len(points)), order, np.sqrt(np.take_along_axis(squared, order, 1))


def plain_once(count: int) -> dict[str, float]:
    """UMAP finding its own neighbours in the features, in this process."""
    import umap

    features = synthetic_features(count)
    umap.UMAP(random_state=0, n_jobs=1).fit_transform(features[:300])  # numba compiles
    started = time.perf_counter()
    umap.UMAP(random_state=0, n_jobs=1).fit_transform(features)
    return {
        "plain_umap_s": round(time.perf_counter() - started, 1),
        "plain_peak_mb": round(peak_mb()),
    }


def child(mode: str, count: int) -> dict[str, float]:
    """One measurement in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, f"--{mode}", str(count)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fill_map_database(url: str, count: int) -> None:
    """A database holding `count` images laid out on a synthetic map (clusters in 2-D)."""
    from datetime import datetime

    import sqlalchemy

    from lookalike.sql.schema import image_map, image_names, map_state, metadata, sources

    rng = np.random.default_rng(5)
    centres = rng.normal(0, 10, (CLUSTERS, 2))
    xy = centres[rng.integers(0, CLUSTERS, count)] + rng.normal(0, 0.6, (count, 2))
    engine = sqlalchemy.create_engine(url)
    metadata.create_all(engine)
    names = [{"id": i + 1, "source_id": 1, "file_name": f"folder_{i % 7}/image_{i:07d}.jpg",
              "content_hash": f"{i:032x}", "size": 1, "mtime_ns": 0, "status": "ok",
              "indexed": True} for i in range(count)]  # fmt: skip
    points = [{"image_id": i + 1, "x": float(x), "y": float(y), "content_hash": f"{i:032x}"}
              for i, (x, y) in enumerate(xy.tolist())]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sources.insert(), [{"id": 1, "name": "archive", "root": "/archive",
                     "created_at": datetime.now()}])  # fmt: skip
        conn.execute(image_names.insert(), names)
        conn.execute(image_map.insert(), points)
        conn.execute(map_state.insert(), [{"id": 1, "fingerprint": "bench", "basis": "bench",
                     "fitted_images": count, "placed_images": 0,
                     "computed_at": datetime.now()}])  # fmt: skip
    engine.dispose()


def measure_page(count: int) -> dict[str, float]:
    """/api/map's size and time, and the page's load time and frame rate, at `count` points."""
    from benchmarks.api import served
    from scripts.chromium_args import launch_chromium

    with tempfile.TemporaryDirectory(prefix="lookalike-map-page-") as scratch:
        url = f"sqlite:///{scratch}/map.sqlite"
        fill_map_database(url, count)
        env = {"LOOKALIKE_DATABASE_URL": url, "LOOKALIKE_DATA_DIR": scratch}
        with served("lookalike.api.app:create_app", env, factory=True) as (port, _):
            base = f"http://127.0.0.1:{port}"
            timings = []
            for _ in range(3):  # the first reads the table; then the packed points are kept
                started = time.perf_counter()
                with urllib.request.urlopen(f"{base}/api/map") as response:
                    size = len(response.read())
                timings.append((time.perf_counter() - started) * 1000)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                started = time.perf_counter()
                page.goto(f"{base}/map")
                page.wait_for_function("() => window.lookalikeMap.map.frames.length > 0",
                                       timeout=60_000)  # fmt: skip
                load_s = time.perf_counter() - started
                fps = page.evaluate(FRAME_RATE)
                still = page.evaluate(STILL_FRAME_RATE)
                browser.close()
    return {"points": count, "payload_mb": round(size / 1e6, 2),
            "api_first_ms": round(timings[0]), "api_cached_ms": round(min(timings[1:]), 1),
            "page_load_s": round(load_s, 2), "page_fps": round(fps, 1),
            "still_fps": round(still, 1)}  # fmt: skip


# Pan and zoom a little every frame for 3 s; frames drawn per second (the moving sample).
FRAME_RATE = """async () => {
    const m = window.lookalikeMap;
    const before = m.map.frames.length;
    const started = performance.now();
    let step = 0;
    while (performance.now() - started < 3000) {
        m.panBy(3, 1);
        m.zoomAt(640, 450, step++ % 40 < 20 ? 1.01 : 1 / 1.01);
        await new Promise(resolve => requestAnimationFrame(resolve));
    }
    return (m.map.frames.length - before) / ((performance.now() - started) / 1000);
}"""


# Every point drawn, back to back, for 2 s (what a still map costs per frame).
STILL_FRAME_RATE = """async () => {
    const m = window.lookalikeMap;
    await new Promise(resolve => setTimeout(resolve, 400));  // still again: all points
    let frames = 0;
    const started = performance.now();
    while (performance.now() - started < 2000) {
        m.map.frames.length = 0;
        window.dispatchEvent(new Event("resize"));  // one full redraw
        await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
        frames += m.map.frames.length;
    }
    return frames / ((performance.now() - started) / 1000);
}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--plain-up-to", type=int, default=20_000)
    parser.add_argument(
        "--page-points",
        type=int,
        default=250_000,
        help="points for /api/map and the page (0: none)",
    )
    parser.add_argument("--layout", type=int, help=argparse.SUPPRESS)  # children's sizes
    parser.add_argument("--plain", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layout or args.plain:
        one = layout_once(args.layout) if args.layout else plain_once(args.plain)
        print(json.dumps(one))
        return 0
    results = []
    for count in args.sizes:
        graph_file(count)  # the stored lists, made beforehand (not timed)
        figures: dict[str, float] = {"n": count, **child("layout", count)}
        if count <= args.plain_up_to:
            figures.update(child("plain", count))
        results.append(figures)
        plain = (f"; plain UMAP {figures['plain_umap_s']} s, peak {figures['plain_peak_mb']} MB"
                 if "plain_umap_s" in figures else "")  # fmt: skip
        print(f"{count:>7,} images: layout {figures['layout_s']} s, peak {figures['peak_mb']} MB "
              f"({figures['peak_mb_before_layout']} MB before it){plain}", flush=True)  # fmt: skip
    page = measure_page(args.page_points) if args.page_points else None
    if page:
        print(f"{page['points']:,} points: /api/map {page['payload_mb']} MB, first answer "
              f"{page['api_first_ms']} ms, then {page['api_cached_ms']} ms; the page drawn in "
              f"{page['page_load_s']} s, panning and zooming at {page['page_fps']} frames/s "
              f"(still: {page['still_fps']})")  # fmt: skip
    first = results[0]
    ratio = first["layout_s"] / first["plain_umap_s"] if "plain_umap_s" in first else None
    print(json.dumps({"benchmark": "map", "ratio": None if ratio is None else round(ratio, 3),
                      "sizes": results, "page": page}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
