"""Tests for tasks.decode: every odd format, every failure reason, and fuzzed bytes."""

from __future__ import annotations

import contextlib
import io
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from lookalike.tasks.decode import (
    IMAGE_SUFFIXES,
    INPUT_SIZE,
    PREPROCESS_VERSION,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    decode_image_bytes,
)
from lookalike.tasks.image_files import sniff_image_type
from tests.odd_images import (
    BLUE,
    GREY_LEVEL,
    OPAQUE_COLOUR,
    PALETTE_COLOUR,
    RED,
    TINY_COLOUR,
    WHITE,
    bomb_png,
    write_odd_images,
    write_photos,
)

MIDDLE = INPUT_SIZE // 2
LEFT_QUARTER, RIGHT_QUARTER = INPUT_SIZE // 4, INPUT_SIZE * 3 // 4


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("odd")
    return folder, write_odd_images(folder)


def decode_odd(odd_folder: tuple[Path, dict[str, str]], name: str) -> DecodedImage:
    return decode_image(odd_folder[0] / name)


def reason_for(path: Path, *, max_pixels: int = 100_000_000) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(path, max_pixels=max_pixels)
    return str(caught.value)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def assert_colour_near(pixel: np.ndarray, colour: tuple[int, ...], tolerance: int) -> None:
    difference = np.abs(pixel.astype(int) - np.array(colour))
    assert difference.max() <= tolerance, f"{pixel.tolist()} is not within {tolerance} of {colour}"


def test_odd_images_decode_or_fail_as_labelled(odd_folder: tuple[Path, dict[str, str]]) -> None:
    folder, expected = odd_folder
    outcomes = {}
    for name in expected:
        try:
            decoded = decode_image(folder / name)
        except ImageDecodeError:
            outcomes[name] = "failed"
        else:
            assert decoded.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
            assert decoded.pixels.dtype == np.uint8
            outcomes[name] = "ok"
    assert outcomes == expected
    assert list(expected.values()).count("ok") == 16
    assert list(expected.values()).count("failed") == 5
    assert all((folder / name).stat().st_size < 10_000 for name in expected)


@pytest.mark.parametrize("name", ["png_named.jpg", "jpeg_named.png"])
def test_content_decides_the_format_not_the_suffix(
    odd_folder: tuple[Path, dict[str, str]], name: str
) -> None:
    decoded = decode_odd(odd_folder, name)
    assert (decoded.width, decoded.height) == (48, 32)
    assert_colour_near(decoded.pixels[MIDDLE, LEFT_QUARTER], RED, 2)
    assert_colour_near(decoded.pixels[MIDDLE, RIGHT_QUARTER], BLUE, 2)


def test_cmyk_jpeg_becomes_correct_rgb(odd_folder: tuple[Path, dict[str, str]]) -> None:
    pixels = decode_odd(odd_folder, "cmyk.jpg").pixels
    assert_colour_near(pixels[MIDDLE, LEFT_QUARTER], (0, 255, 255), 3)  # cyan
    assert_colour_near(pixels[MIDDLE, RIGHT_QUARTER], RED, 3)


def test_grayscale_jpeg_has_three_equal_channels(odd_folder: tuple[Path, dict[str, str]]) -> None:
    pixels = decode_odd(odd_folder, "gray.jpg").pixels
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.abs(pixels.astype(int) - GREY_LEVEL).max() <= 1


def test_sixteen_bit_png_is_scaled_not_clipped(odd_folder: tuple[Path, dict[str, str]]) -> None:
    pixels = decode_odd(odd_folder, "gray16.png").pixels
    # 4096 / 257 = 15.9 and 60000 / 257 = 233.5; clipping would give 255 on both sides.
    assert pixels[MIDDLE, LEFT_QUARTER].tolist() == [16, 16, 16]
    assert pixels[MIDDLE, RIGHT_QUARTER].tolist() == [233, 233, 233]


def test_rgba_is_composited_onto_white(odd_folder: tuple[Path, dict[str, str]]) -> None:
    pixels = decode_odd(odd_folder, "rgba.png").pixels
    thirds = [INPUT_SIZE // 6, INPUT_SIZE // 2, INPUT_SIZE * 5 // 6]
    assert pixels[MIDDLE, thirds[0]].tolist() == list(OPAQUE_COLOUR)
    assert pixels[MIDDLE, thirds[1]].tolist() == list(WHITE)  # transparent blue vanishes
    assert_colour_near(pixels[MIDDLE, thirds[2]], (127, 127, 127), 1)  # black at alpha 128


def test_grey_with_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    image = Image.new("LA", (40, 20), (50, 255))
    image.paste((0, 0), (20, 0, 40, 20))
    path = tmp_path / "grey_alpha.png"
    path.write_bytes(encode(image, "PNG"))
    pixels = decode_image(path).pixels
    assert pixels[MIDDLE, LEFT_QUARTER].tolist() == [50, 50, 50]
    assert pixels[MIDDLE, RIGHT_QUARTER].tolist() == list(WHITE)


def test_palette_transparency_is_composited_onto_white(
    odd_folder: tuple[Path, dict[str, str]],
) -> None:
    pixels = decode_odd(odd_folder, "palette_transparent.png").pixels
    assert pixels[MIDDLE, LEFT_QUARTER].tolist() == list(WHITE)
    assert pixels[MIDDLE, RIGHT_QUARTER].tolist() == list(PALETTE_COLOUR)


def test_animated_gif_uses_the_first_frame(odd_folder: tuple[Path, dict[str, str]]) -> None:
    pixels = decode_odd(odd_folder, "animated.gif").pixels
    assert np.all(pixels == np.array(RED, dtype=np.uint8))


def test_animated_webp_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (BLUE, RED)]
    path = tmp_path / "animated.webp"
    path.write_bytes(
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    )
    assert np.all(decode_image(path).pixels == np.array(BLUE, dtype=np.uint8))


def test_multipage_tiff_uses_the_first_page(odd_folder: tuple[Path, dict[str, str]]) -> None:
    pixels = decode_odd(odd_folder, "multipage.tiff").pixels
    assert np.all(pixels == np.array(RED, dtype=np.uint8))


def test_exif_orientation_is_applied(odd_folder: tuple[Path, dict[str, str]]) -> None:
    folder, _ = odd_folder
    with Image.open(folder / "exif_rotated.jpg") as stored:
        assert stored.size == (80, 40)
    decoded = decode_odd(odd_folder, "exif_rotated.jpg")
    assert (decoded.width, decoded.height) == (40, 80)  # swapped relative to stored pixels
    # Orientation 6 turns the stored left (red) half into the top half.
    assert_colour_near(decoded.pixels[LEFT_QUARTER, MIDDLE], RED, 3)
    assert_colour_near(decoded.pixels[RIGHT_QUARTER, MIDDLE], BLUE, 3)


@pytest.mark.parametrize("name", ["progressive.jpg", "image.webp", "image.bmp", "image.tiff"])
def test_other_formats_keep_their_colours(
    odd_folder: tuple[Path, dict[str, str]], name: str
) -> None:
    decoded = decode_odd(odd_folder, name)
    assert (decoded.width, decoded.height) == (48, 32)
    assert_colour_near(decoded.pixels[MIDDLE, LEFT_QUARTER], RED, 2)
    assert_colour_near(decoded.pixels[MIDDLE, RIGHT_QUARTER], BLUE, 2)


def test_one_pixel_image_fills_the_square(odd_folder: tuple[Path, dict[str, str]]) -> None:
    decoded = decode_odd(odd_folder, "tiny_1x1.png")
    assert (decoded.width, decoded.height) == (1, 1)
    assert np.all(decoded.pixels == np.array(TINY_COLOUR, dtype=np.uint8))


def test_extreme_aspect_ratio_is_squashed(odd_folder: tuple[Path, dict[str, str]]) -> None:
    decoded = decode_odd(odd_folder, "extreme_1x3000.png")
    assert (decoded.width, decoded.height) == (1, 3000)
    grey = decoded.pixels[:, :, 0].astype(int)
    assert np.all(grey == grey[:, :1])  # every row is one colour
    assert np.all(np.diff(grey[:, 0]) >= 0)  # the ramp still runs dark to light
    assert grey[0, 0] <= 2 and grey[-1, 0] >= 253


def test_size_option_sets_the_output_shape(odd_folder: tuple[Path, dict[str, str]]) -> None:
    decoded = decode_image(odd_folder[0] / "image.bmp", size=64)
    assert decoded.pixels.shape == (64, 64, 3)
    assert (decoded.width, decoded.height) == (48, 32)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.jpg", "empty file"),
        ("random.jpg", "not an image (unrecognised content)"),
        ("truncated.jpg", "truncated image data"),
        ("bomb.png", "image too large: 40000x40000 pixels exceeds the limit of 100000000"),
        ("fake.heic", "unsupported format: HEIC"),
    ],
)
def test_broken_files_fail_with_a_readable_reason(
    odd_folder: tuple[Path, dict[str, str]], name: str, reason: str
) -> None:
    assert reason_for(odd_folder[0] / name) == reason


def test_bomb_is_refused_from_the_header_alone(odd_folder: tuple[Path, dict[str, str]]) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    reason = reason_for(odd_folder[0] / "bomb.png")
    assert time.perf_counter() - started < 0.5
    assert "40000x40000" in reason
    # Decoding would need 4.8 GB; the process peak (KiB on Linux) must not move noticeably.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50_000


def test_max_pixels_is_our_limit_not_pillows(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    path.write_bytes(bomb_png(9500, 9500))  # 90.25 Mpx: above Pillow's 89.5 Mpx warning level
    max_image_pixels = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would raise here
        reason = reason_for(path, max_pixels=90_000_000)
    assert reason == "image too large: 9500x9500 pixels exceeds the limit of 90000000"
    assert max_image_pixels == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_max_pixels_refuses_and_allows_by_exact_count(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    path.write_bytes(encode(Image.new("RGB", (300, 200), RED), "PNG"))
    assert decode_image(path, max_pixels=60_000).width == 300
    assert reason_for(path, max_pixels=59_999) == (
        "image too large: 300x200 pixels exceeds the limit of 59999"
    )


def test_file_deleted_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    path.write_bytes(encode(Image.new("RGB", (8, 8), RED), "JPEG"))
    path.unlink()
    assert reason_for(path) == "file disappeared before extraction"


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert reason_for(folder) == "not a file (it is a directory)"


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"\x00\x00\x00\x18ftypavis" + bytes(16), None),  # None: decodable when Pillow has AVIF
        (b"\x00\x00\x00\x18ftypmif1" + bytes(16), "unsupported format: HEIF"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(16), "unsupported format: JPEG XL"),
        (b"\xff\x0a" + bytes(30), "unsupported format: JPEG XL"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image (unrecognised content)"),
    ],
)
def test_unsupported_formats_are_named(head: bytes, reason: str | None) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image_bytes(head)
    if reason is not None:
        assert str(caught.value) == reason
    else:
        assert str(caught.value).startswith(("unsupported format: AVIF", "corrupt image data"))


def test_decode_bytes_matches_decode_file(odd_folder: tuple[Path, dict[str, str]]) -> None:
    folder, expected = odd_folder
    compared = 0
    for name in (name for name, outcome in expected.items() if outcome == "ok"):
        from_file = decode_image(folder / name)
        from_bytes = decode_image_bytes((folder / name).read_bytes())
        assert np.array_equal(from_file.pixels, from_bytes.pixels), name
        assert (from_file.width, from_file.height) == (from_bytes.width, from_bytes.height)
        compared += 1
    assert compared == 16


def test_reduced_scale_is_close_to_the_full_decode(tmp_path: Path) -> None:
    (photo,) = write_photos(tmp_path, 1, size=(1400, 1000))
    full = decode_image(photo)
    reduced = decode_image(photo, reduced_scale=True)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (1400, 1000)
    a = full.pixels.astype(np.float64).ravel()
    b = reduced.pixels.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.99
    assert not np.array_equal(full.pixels, reduced.pixels)  # a different decode path ran


def test_reduced_scale_leaves_small_jpegs_unchanged(tmp_path: Path) -> None:
    (photo,) = write_photos(tmp_path, 1)  # 160x120: less than twice the target size
    assert np.array_equal(
        decode_image(photo).pixels, decode_image(photo, reduced_scale=True).pixels
    )


def test_write_photos_gives_distinct_jpegs(tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 12, seed=5)
    assert len(paths) == 12
    assert len({path.read_bytes() for path in paths}) == 12
    assert all(sniff_image_type(path.read_bytes()[:16]) == "jpeg" for path in paths)
    assert decode_image(paths[0]).width == 160


def test_suffixes_and_version_are_declared() -> None:
    decodable = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    assert decodable | {".heic", ".heif", ".avif", ".jxl"} == IMAGE_SUFFIXES
    assert all(suffix == suffix.lower() for suffix in IMAGE_SUFFIXES)
    assert PREPROCESS_VERSION


_FUZZ_SEEDS = {
    "jpeg": encode(Image.radial_gradient("L").convert("RGB").resize((40, 30)), "JPEG"),
    "png": encode(Image.radial_gradient("L").resize((40, 30)).convert("RGBA"), "PNG"),
}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid JPEG or PNG with a few bytes flipped, cut off or inserted."""
    data = bytearray(_FUZZ_SEEDS[draw(st.sampled_from(sorted(_FUZZ_SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if action == "flip" and where < len(data):
            data[where] ^= draw(st.integers(1, 255))
        elif action == "truncate":
            del data[where:]
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(
    max_examples=60,
    deadline=None,  # timed explicitly below, so a slow CI start does not flake
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated_images())
def test_mutated_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    started = time.perf_counter()
    with contextlib.suppress(ImageDecodeError):
        decoded = decode_image_bytes(data)
        assert decoded.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert time.perf_counter() - started < 5.0
