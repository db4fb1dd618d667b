"""Loading real-world files: every format, mode and failure of the photo folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from guie.retrieval.images import (
    DEFAULT_MAX_PIXELS, SkippedImage, _jpeg_draft_scale, fit_size, list_files, load_image,
)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", ["jpeg", "webp", "png", "non_ascii", "chelsea", "rocket",
                                  "palette", "gif", "small", "cmyk", "rgb16"])
def test_every_format_loads_as_rgb_uint8(photo_folder, name):
    _, files = photo_folder
    image = load_image(files[name])
    assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 3
    assert image.pixels.shape[2] == 3
    assert image.size == image.original_size
    tensor = image.to_tensor()
    assert tensor.shape == (1, 3, image.size[1], image.size[0]) and tensor.is_contiguous()


def test_colour_conversions_keep_the_photo(photo_folder, load_photo):
    _, files = photo_folder
    astronaut = np.asarray(load_photo("astronaut"))
    chelsea = np.asarray(load_photo("chelsea"))
    assert _mean_abs_diff(load_image(files["cmyk"]).pixels, astronaut) < 8
    assert _mean_abs_diff(load_image(files["rgb16"]).pixels, chelsea) < 1  # high byte kept
    gray = load_image(files["gray"]).pixels
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # 16-bit grayscale is scaled down, not clipped to white as PIL's own convert would do.
    gray16 = load_image(files["gray16"]).pixels
    assert _mean_abs_diff(gray16, gray) < 1


def test_transparency_is_composited_on_white(photo_folder, load_photo):
    _, files = photo_folder
    rgba = load_image(files["rgba"]).pixels
    width = rgba.shape[1]
    assert (rgba[:, : width // 2] == 255).all()
    assert _mean_abs_diff(rgba[:, width // 2 + 1:],
                          np.asarray(load_photo("chelsea"))[:, width // 2 + 1:]) < 1
    palette = load_image(files["palette"]).pixels  # palette index 0 is transparent
    assert palette.mean() > 0


def test_exif_orientation_is_applied(photo_folder, load_photo):
    _, files = photo_folder
    upright = np.asarray(load_photo("coffee"))
    image = load_image(files["exif6"])
    assert image.pixels.shape == upright.shape
    assert image.original_size == (upright.shape[1], upright.shape[0])
    assert _mean_abs_diff(image.pixels, upright) < 6


def test_animated_gif_gives_its_first_frame(photo_folder, load_photo):
    _, files = photo_folder
    first = load_image(files["gif"]).pixels
    rocket = np.asarray(load_photo("rocket"))
    coffee = np.asarray(load_photo("coffee").resize((rocket.shape[1], rocket.shape[0])))
    assert _mean_abs_diff(first, rocket) < _mean_abs_diff(first, coffee) / 3


def test_tiny_and_non_ascii_names(photo_folder):
    _, files = photo_folder
    assert load_image(files["one_pixel"]).pixels.tolist() == [[[200, 30, 30]]]
    assert load_image(files["non_ascii"]).size == (600, 400)


def test_huge_jpeg_is_decoded_downscaled_not_refused(photo_folder, load_photo, huge_side):
    _, files = photo_folder
    with pytest.raises(Image.DecompressionBombError):  # what PIL alone does with this file
        Image.open(files["huge"])
    limit_before = Image.MAX_IMAGE_PIXELS
    image = load_image(files["huge"])
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the global limit is restored
    assert image.original_size == (huge_side, huge_side)
    assert image.size[0] * image.size[1] <= DEFAULT_MAX_PIXELS
    small = load_image(files["huge"], max_side=300)
    assert small.size == (300, 300)
    expected = np.asarray(load_photo("astronaut").resize((300, 300), Image.Resampling.BICUBIC))
    assert _mean_abs_diff(small.pixels, expected) < 12


def test_decode_cap_bounds_memory(photo_folder, tmp_path):
    _, files = photo_folder
    # The largest draft scale still giving the target; the guarded decode shrinks further where
    # its cap demands it: a JPEG over the cap is decoded at 512 -> 1/4 = 128 x 128 here.
    assert _jpeg_draft_scale((512, 512), (512, 512)) == 1
    assert _jpeg_draft_scale((13500, 13500), (4096, 4096)) == 2
    assert _jpeg_draft_scale((13500, 13500), (300, 300)) == 8
    image = load_image(files["jpeg"], max_pixels=None, max_decode_pixels=20_000)
    assert image.size == (128, 128) and image.original_size == (512, 512)
    # Any other format over the cap can only be decoded whole: skipped, never decoded.
    with pytest.raises(SkippedImage, match="image of 600x400 pixels exceeds the 20000-pixel"):
        load_image(files["png"], max_decode_pixels=20_000)
    with pytest.raises(SkippedImage, match="exceeds the 67108864-pixel limit"):
        load_image(files["bomb"])


@pytest.mark.parametrize("name, reason", [("text", "not an image"),
                                          ("truncated", "corrupt"),
                                          ("bomb", "exceeds the .*-pixel limit")])
def test_bad_files_are_skipped_with_a_reason(photo_folder, name, reason):
    _, files = photo_folder
    with pytest.raises(SkippedImage, match=reason) as caught:
        load_image(files[name])
    assert caught.value.path == files[name]


def test_missing_file_is_skipped_not_raised(tmp_path):
    with pytest.raises(SkippedImage, match="unreadable"):
        load_image(tmp_path / "gone.jpg")


def test_max_side_and_fit_size(photo_folder):
    _, files = photo_folder
    assert load_image(files["png"], max_side=150).size == (150, 100)
    assert load_image(files["small"], max_side=1000).size == (64, 43)  # never upscales
    assert fit_size(4000, 3000, None, 1_200_000) == (1264, 948)
    assert fit_size(1, 1, 1, 1) == (1, 1)


def test_list_files_skips_hidden_and_excluded(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "y.jpg").write_bytes(b"y")
    (tmp_path / ".hidden.jpg").write_bytes(b"z")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.html").write_text("r")
    (tmp_path / "notes.txt").write_text("n")
    found = list_files(tmp_path, exclude=(tmp_path / "out",))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/x.jpg", "notes.txt"]
