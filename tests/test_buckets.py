"""Bucket lists and per-image assignments against hand-derived tables (derivations in comments)."""

import math

import pytest

from library.buckets import BucketAssigner, bucket_info, bucket_table_lines, crop_ltrb, make_bucket_resolutions

# max area 512*512 = 262144, sides 256..1024 step 64. For each width w the height is
# floor(262144 / w / 64) * 64, capped at 1024: 256->1024, 320->768 (819), 384->640 (682),
# 448->576 (585), 512->512, 576->448 (455), 640->384 (409), 704->320 (372), 768->320 (341),
# 832->256 (315), 896->256 (292), 960->256 (273), 1024->256; plus each transpose and (512, 512).
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_bucket_list_for_512_matches_hand_derived_table():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == BUCKETS_512


def test_sdxl_bucket_list_holds_the_familiar_sdxl_sizes_and_respects_limits():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    # 1048576 // 832 = 1260 -> 1216; // 896 = 1170 -> 1152; // 768 = 1365 -> 1344; // 640 = 1638 -> 1600
    for size in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1600)]:
        assert size in buckets
    assert (1536, 640) in buckets and (640, 1536) in buckets  # from width 1536: 1048576 // 1536 = 682 -> 640
    for width, height in buckets:
        assert width * height <= 1024 * 1024
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= min(width, height) and max(width, height) <= 2048
        assert (height, width) in buckets


def test_bucket_list_for_non_square_resolution_and_step_32():
    buckets = make_bucket_resolutions((768, 512), 256, 1024, 32)
    max_area = 768 * 512
    # independent derivation: the tallest multiple of 32 whose area fits, for each width
    expected = {(int(math.sqrt(max_area) // 32) * 32,) * 2}
    for width in range(256, 1025, 32):
        height = min(1024, max(h for h in range(32, 4096, 32) if width * h <= max_area))
        if height >= 256:
            expected |= {(width, height), (height, width)}
    assert buckets == sorted(expected)


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        # ar 0.667: nearest is (384, 640) ar 0.6 (error 0.067) not (448, 576) ar 0.778 (0.111);
        # image is wider than the bucket, so heights match: scale 640/1500 -> 427 x 640
        ((1000, 1500), (384, 640), (427, 640)),
        # an exact bucket size is kept
        ((512, 512), (512, 512), (512, 512)),
        # ar 4 matches (1024, 256) exactly: scale 1024/2000 = 0.512 -> 1024 x 256
        ((2000, 500), (1024, 256), (1024, 256)),
        # ar 1.5: (640, 384) ar 1.667 (0.167) beats (576, 448) ar 1.286 (0.214); upscale 640/300
        ((300, 200), (640, 384), (640, 427)),
    ],
)
def test_images_go_to_nearest_aspect_ratio_bucket(image, bucket, resized):
    assigner = BucketAssigner((512, 512), 64, no_upscale=False, predefined=BUCKETS_512)
    choice = assigner.select(*image)
    assert choice.reso == bucket
    assert choice.resized_size == resized
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - image[0] / image[1])


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        # fits in the area: no resize, bucket floored to 64: 500 -> 448, 300 -> 256
        ((500, 300), (448, 256), (500, 300)),
        # too large: sqrt(262144 * 4/3) = 591.2 -> 576 wide gives 384 high (ar 1.5), while 443.4
        # -> 384 high gives 512 wide (ar 1.333, exact), so 512 x 384 is chosen
        ((1024, 768), (512, 384), (512, 384)),
        # exactly the area, square: untouched
        ((512, 512), (512, 512), (512, 512)),
    ],
)
def test_no_upscale_buckets_follow_image_sizes(image, bucket, resized):
    assigner = BucketAssigner((512, 512), 64, no_upscale=True, predefined=None)
    choice = assigner.select(*image)
    assert choice.reso == bucket
    assert choice.resized_size == resized
    assert choice.reso[0] <= choice.resized_size[0] and choice.reso[1] <= choice.resized_size[1]


def test_fixed_resolution_scales_to_cover_then_crops():
    assigner = BucketAssigner((512, 512), None, no_upscale=False, predefined=[(512, 512)])
    assert assigner.select(1000, 500) == ((512, 512), (1024, 512), 1 - 2.0)
    assert assigner.select(200, 400).resized_size == (512, 1024)


def test_crop_box_follows_sd_scripts_formula():
    # bucket ar 0.6 < image ar 0.667: width fits (384), height 384 / 0.667 = 576 centred in 640
    assert crop_ltrb((384, 640), (1000, 1500)) == (0, 32.0, 384, 608.0)
    # bucket ar 1.667 > image ar 1.5: height fits (384), width 576 centred in 640
    assert crop_ltrb((640, 384), (300, 200)) == (32.0, 0, 608.0, 384)


def test_bucket_info_and_table_lines():
    info = bucket_info({(512, 384): 3, (384, 512): 5}, [0.1, -0.3])
    assert info == {
        "buckets": {0: {"resolution": (384, 512), "count": 5}, 1: {"resolution": (512, 384), "count": 3}},
        "mean_img_ar_error": pytest.approx(0.2),
    }
    lines = bucket_table_lines(info)
    assert lines[1:3] == ["bucket 0: resolution (384, 512), count: 5", "bucket 1: resolution (512, 384), count: 3"]
    assert lines[-1].startswith("mean ar error (without repeats): 0.2")
