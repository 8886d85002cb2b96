"""The demo image set: exact size, decodable files, licence note, determinism and idempotence."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_images.py"
IMAGE_SUFFIXES = {".jpg", ".png"}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_images", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


DEMO = load_script()


def run_script(out_dir: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the script's main in this process (the sources stay cached); (exit code, stdout)."""
    capsys.readouterr()
    code = DEMO.main([str(out_dir), *extra])
    return code, capsys.readouterr().out


def image_files(root: Path) -> dict[str, Path]:
    return {
        path.relative_to(root).as_posix(): path
        for path in root.rglob("*")
        if path.is_file() and path.suffix in IMAGE_SUFFIXES
    }


def test_default_set_has_60_decodable_images_in_subfolders(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path}: 60 images written, 0 already up to date"
    images = image_files(tmp_path)
    assert len(images) == 60
    assert len([name for name in images if name.startswith("originals/")]) == 11
    assert len([name for name in images if name.startswith("variants/")]) == 49
    assert {Path(name).suffix for name in images} == {".jpg", ".png"}
    sizes = set()
    for path in images.values():
        with Image.open(path) as picture:
            picture.load()
            assert picture.format in ("JPEG", "PNG")
            assert min(picture.size) >= 32
            sizes.add(picture.size)
    assert len(sizes) > 10  # crops and rescales really change the geometry


def test_credits_name_a_clean_licence_for_every_original(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_script(tmp_path, "--count", "11", capsys=capsys)[0] == 0
    credits = (tmp_path / "CREDITS.txt").read_text().splitlines()
    originals = sorted(path.stem for path in (tmp_path / "originals").iterdir())
    assert len(originals) == 11
    for name in originals:
        line = next(line for line in credits if line.strip().startswith(f"{name}:"))
        assert "CC0" in line or "public domain" in line


def test_rerun_rewrites_nothing_and_keeps_mtimes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_script(tmp_path, capsys=capsys)[0] == 0
    before = {name: path.stat().st_mtime_ns for name, path in image_files(tmp_path).items()}
    credits_mtime = (tmp_path / "CREDITS.txt").stat().st_mtime_ns
    code, out = run_script(tmp_path, capsys=capsys)
    assert code == 0
    assert out.strip() == f"{tmp_path}: 0 images written, 60 already up to date"
    after = {name: path.stat().st_mtime_ns for name, path in image_files(tmp_path).items()}
    assert after == before
    assert (tmp_path / "CREDITS.txt").stat().st_mtime_ns == credits_mtime


def test_files_are_identical_whatever_the_count_and_smaller_count_prunes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full, small = tmp_path / "full", tmp_path / "small"
    assert run_script(full, "--count", "99", capsys=capsys)[0] == 0
    assert run_script(small, "--count", "30", capsys=capsys)[0] == 0
    full_images, small_images = image_files(full), image_files(small)
    assert len(full_images) == 99
    assert len(small_images) == 30
    for name, path in small_images.items():
        assert path.read_bytes() == full_images[name].read_bytes(), name
    assert run_script(full, "--count", "30", capsys=capsys)[0] == 0
    assert sorted(image_files(full)) == sorted(small_images)


def test_count_out_of_range_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert DEMO.main([str(tmp_path), "--count", "100"]) == 1
    assert capsys.readouterr().err.strip() == "error: count must be between 1 and 99, got 100"
    assert image_files(tmp_path) == {}
