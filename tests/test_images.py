"""Image discovery, checking, loading (EXIF, alpha), resizing, cropping and SDXL conditioning."""

import random

import cv2
import numpy as np
import pytest
from PIL import Image

from library.images import (
    ImageReadError,
    color_augment,
    fit_to_bucket,
    list_image_files,
    load_image,
    probe_image,
    resize_image,
    sdxl_size_condition,
    to_model_input,
)

EXIF_ORIENTATION = 0x0112


def noise(width, height, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


def test_lists_images_of_any_extension_case_only(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.Jpeg", "d.webp", "e.BMP"]:
        save(tmp_path / name, noise(4, 4))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.caption").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    names = [p.rsplit("/", 1)[1] for p in list_image_files(str(tmp_path))]
    assert names == ["a.jpg", "b.PNG", "c.Jpeg", "d.webp", "e.BMP"]


@pytest.mark.parametrize("name, kwargs", [("a.png", {}), ("a.jpg", {"quality": 90}), ("a.webp", {}), ("a.bmp", {})])
def test_probe_reads_size_of_each_format(tmp_path, name, kwargs):
    assert probe_image(save(tmp_path / name, noise(40, 24), **kwargs)) == (40, 24)


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_probe_rejects_truncated_images(tmp_path, name):
    path = save(tmp_path / name, noise(64, 64))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ImageReadError):
        probe_image(path)


def test_probe_rejects_non_image_bytes(tmp_path):
    path = tmp_path / "fake.png"
    path.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match="cannot identify"):
        probe_image(str(path))


def save_rotated_jpeg(path, array, orientation):
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, quality=100)
    return str(path)


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    raw = np.zeros((16, 32, 3), np.uint8)
    raw[:, :16] = (255, 0, 0)  # left half red
    raw[:, 16:] = (0, 0, 255)  # right half blue
    path = save_rotated_jpeg(tmp_path / "rotated.jpg", raw, orientation=6)  # display = raw turned clockwise
    assert probe_image(path) == (16, 32)
    pixels = load_image(path)
    assert pixels.shape == (32, 16, 3)
    expected = np.rot90(np.array(Image.open(path).convert("RGB")), k=-1)
    assert np.array_equal(pixels, expected)
    assert pixels[2, 8, 0] > 200 and pixels[29, 8, 2] > 200  # red on top, blue below


def test_transparency_is_composited_on_white_or_kept(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[1, 0] = (0, 0, 0, 128)  # half transparent black
    path = save(tmp_path / "a.png", rgba)
    rgb = load_image(path)
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [10, 20, 30]
    assert abs(int(rgb[1, 0, 0]) - 127) <= 1  # 255 * (1 - 128/255)
    assert np.array_equal(load_image(path, keep_alpha=True), rgba)


def test_palette_image_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 0, 0])
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert load_image(str(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_default_resize_is_area_to_shrink_and_lanczos_to_enlarge():
    image = noise(40, 30)
    assert np.array_equal(resize_image(image, (20, 15)), cv2.resize(image, (20, 15), interpolation=cv2.INTER_AREA))
    enlarged = np.array(Image.fromarray(image).resize((80, 60), Image.Resampling.LANCZOS))
    assert np.array_equal(resize_image(image, (80, 60)), enlarged)
    bilinear = cv2.resize(image, (80, 60), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(resize_image(image, (80, 60), "bilinear"), bilinear)


def test_fit_to_bucket_centre_crops_without_resize_when_sizes_match():
    image = noise(6, 4)
    cropped, original_size, box = fit_to_bucket(image, (4, 4), (6, 4))
    assert np.array_equal(cropped, image[:, 1:5])
    assert original_size == (6, 4)
    assert box == pytest.approx((0, 0, 4, 4 / 1.5))  # fitted inside: 4 wide, 2.67 high


def test_fit_to_bucket_resizes_then_crops_and_random_crop_uses_the_rng():
    image = noise(30, 20)
    cropped, original_size, _ = fit_to_bucket(image, (16, 16), (24, 16))
    expected = cv2.resize(image, (24, 16), interpolation=cv2.INTER_AREA)[:, 4:20]
    assert np.array_equal(cropped, expected) and original_size == (30, 20)

    offset = random.Random(7).randint(0, 8)
    cropped, _, _ = fit_to_bucket(image, (16, 16), (24, 16), crop_rng=random.Random(7))
    expected = cv2.resize(image, (24, 16), interpolation=cv2.INTER_AREA)[:, offset : offset + 16]
    assert np.array_equal(cropped, expected)


def test_color_augment_follows_its_draws():
    image = noise(8, 8)
    for seed in range(30):
        draws = random.Random(seed)
        result = color_augment(image.copy(), random.Random(seed))
        if draws.random() > 0.33:
            assert np.array_equal(result, image)
        elif draws.random() <= 0.5:
            gamma = draws.uniform(0.95, 1.05)
            assert np.array_equal(result, np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8))
        else:
            assert result.shape == image.shape and result.dtype == np.uint8


def test_model_input_is_chw_in_minus_one_to_one():
    image = np.array([[[0, 255, 51]]], np.uint8)
    tensor = to_model_input(image)
    assert tensor.dtype == np.float32 and tensor.shape == (3, 1, 1)
    assert tensor[:, 0, 0] == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])


def test_sdxl_size_condition_and_flip():
    # bucket 64x64, image 3x5 (ar 0.6): fitted width 38.4, left 12.0, right 50.4
    box = (12.0, 0, 50.4, 64)
    assert sdxl_size_condition((3, 5), box, (64, 64), flipped=False) == ((5, 3), (0, 12), (64, 64))
    # flipped: left is measured from the mirrored side, 64 - 50.4 = 13.6 -> 13
    assert sdxl_size_condition((3, 5), box, (64, 64), flipped=True) == ((5, 3), (0, 13), (64, 64))
