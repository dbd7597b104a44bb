"""Building datasets from folders and configs, epoch order, batches, bad input, metadata."""

import argparse
import json
import logging
import os
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from library.dataset_args import add_dataset_arguments
from library.errors import UserError
from library.train_dataset import build_dataset_group
from image_files import make_image


def parse_args(*argv, seed=1234):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    args.seed = seed
    return args


def write_config(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def mixed_dataset(tmp_path):
    """A DreamBooth dataset with regularization images plus a fine-tuning dataset, in one TOML."""
    train, reg, ft = tmp_path / "train", tmp_path / "reg", tmp_path / "ft"
    make_image(train / "a.png", 300, 200, seed=1)
    make_image(train / "b.jpg", 200, 300, seed=2)
    make_image(train / "c.webp", 256, 256, seed=3)
    (train / "a.caption").write_text("sks dog, grass", encoding="utf-8")
    for i in range(5):
        make_image(reg / f"r{i}.png", 64, 64, seed=10 + i)
    make_image(ft / "f1.png", 512, 256, seed=20)
    make_image(ft / "f2.png", 256, 256, seed=21)
    # merge_captions_to_metadata writes bare stems as keys
    metadata = {"f1": {"caption": "a frog", "tags": "green, animal"}, "f2": {"tags": "blue"}}
    (ft / "ft_md.json").write_text(json.dumps(metadata), encoding="utf-8")
    config = write_config(
        tmp_path,
        f"""
        [general]
        resolution = 256

        [[datasets]]
        batch_size = 2
        enable_bucket = true
        min_bucket_reso = 128
        max_bucket_reso = 512

          [[datasets.subsets]]
          image_dir = '{train}'
          class_tokens = 'sks dog'
          num_repeats = 2

          [[datasets.subsets]]
          image_dir = '{reg}'
          class_tokens = 'person'
          is_reg = true

        [[datasets]]
        batch_size = 2

          [[datasets.subsets]]
          image_dir = '{ft}'
          metadata_file = '{ft / "ft_md.json"}'
          custom_attributes = {{ style = "frog" }}
        """,
    )
    return parse_args("--dataset_config", config, "--prior_loss_weight", "0.5")


def test_mixed_config_counts_buckets_and_table(mixed_dataset, caplog):
    with caplog.at_level(logging.INFO):
        group = build_dataset_group(mixed_dataset)
    # 3 images x 2 repeats; 5 reg images (balanced to 6 draws); fine-tuning images do not count as reg
    assert (group.num_train_images, group.num_reg_images) == (6 + 2, 5)
    dreambooth, finetune = group.datasets
    # 256x256 buckets: a 300x200 (ar 1.5) -> 320x192 (1.667), b 200x300 -> 192x320 (0.6), c and reg -> 256x256
    assert [(b.reso, len(b.slots)) for b in dreambooth.buckets] == [((192, 320), 2), ((256, 256), 2 + 6), ((320, 192), 2)]
    assert [(b.reso, len(b.slots)) for b in finetune.buckets] == [((256, 256), 2)]
    # reg balancing: 5 registered with 1 repeat (5 draws), then one more repeat for the first
    assert [item.num_repeats for item in dreambooth.items if item.is_reg] == [2, 1, 1, 1, 1]
    assert group.num_batches_per_epoch == (1 + 4 + 1) + 1
    table = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("bucket ", "mean ar error"))]
    assert table == [
        "bucket 0: resolution (192, 320), count: 2",
        "bucket 1: resolution (256, 256), count: 8",
        "bucket 2: resolution (320, 192), count: 2",
        f"mean ar error (without repeats): {(320 / 192 - 1.5 + 2 / 3 - 0.6) / 8}",
    ]


def test_batches_never_mix_buckets_and_carry_weights(mixed_dataset):
    group = build_dataset_group(mixed_dataset)
    seen = 0
    for batch in group.iter_epoch(1, num_workers=2):
        height, width = batch.target_sizes_hw[0]
        assert batch.images.shape == (len(batch.captions), 3, height, width)
        assert (batch.target_sizes_hw == [height, width]).all()
        assert batch.images.dtype == np.float32 and -1 <= batch.images.min() and batch.images.max() <= 1
        is_reg = np.array(["/reg/" in path for path in batch.image_paths])
        assert (batch.loss_weights == np.where(is_reg, 0.5, 1.0)).all()
        for path, caption, attributes in zip(batch.image_paths, batch.captions, batch.custom_attributes):
            expected = {"a.png": "sks dog, grass", "f1.png": "a frog,green, animal", "f2.png": "blue"}.get(os.path.basename(path))
            assert caption == expected or (caption in ("sks dog", "person") and expected is None)
            assert attributes == ({"style": "frog"} if "/ft/" in path else {})
        seen += len(batch.captions)
    assert seen == 2 * 3 + 6 + 2


def test_metadata_has_sd_scripts_shapes(mixed_dataset):
    metadata = build_dataset_group(mixed_dataset).metadata()
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"], metadata["ss_num_batches_per_epoch"]) == (8, 5, 7)
    datasets = json.loads(metadata["ss_datasets"])
    assert list(datasets[0]) == [
        "is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images", "resolution", "enable_bucket",
        "min_bucket_reso", "max_bucket_reso", "tag_frequency", "bucket_info", "resize_interpolation", "subsets",
    ]
    assert list(datasets[0]["subsets"][0]) == [
        "img_count", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens",
        "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
        "resize_interpolation", "image_dir", "class_tokens", "is_reg",
    ]
    assert datasets[0]["resolution"] == [256, 256] and datasets[1]["min_bucket_reso"] is None
    assert datasets[0]["bucket_info"]["buckets"]["1"] == {"resolution": [256, 256], "count": 8}
    assert datasets[1]["subsets"][0]["metadata_file"] == "ft_md.json"
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "train": {"n_repeats": 2, "img_count": 3},
        "ft_md.json": {"n_repeats": 1, "img_count": 2},
    }
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "train": {"sks dog": 3, "grass": 1},
        "reg": {"person": 5},
        "ft_md.json": {"green": 1, "animal": 1, "blue": 1},
    }


def test_command_line_dataset_metadata(tmp_path):
    make_image(tmp_path / "img" / "5_cat" / "a.png", 64, 64)
    make_image(tmp_path / "regs" / "1_animal" / "r.png", 64, 64)
    args = parse_args("--train_data_dir", tmp_path / "img", "--reg_data_dir", tmp_path / "regs", "--resolution", "64", "--flip_aug")
    metadata = build_dataset_group(args).metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {"5_cat": {"n_repeats": 5, "img_count": 1}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_animal": {"n_repeats": 1, "img_count": 1}}
    assert metadata["ss_bucket_info"] == "null" and metadata["ss_resolution"] == (64, 64)
    assert metadata["ss_flip_aug"] is True and "ss_datasets" not in metadata


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(mixed_dataset):
    first, second = build_dataset_group(mixed_dataset), build_dataset_group(mixed_dataset)
    assert first.batches_for_epoch(3) == second.batches_for_epoch(3)
    assert first.batches_for_epoch(1) != first.batches_for_epoch(2)
    other_seed = build_dataset_group(parse_args(*["--dataset_config", mixed_dataset.dataset_config], seed=99))
    assert other_seed.batches_for_epoch(1) != first.batches_for_epoch(1)
    for epoch in (1, 2):
        slots = [(ref.dataset_index, slot) for ref in first.batches_for_epoch(epoch) for slot in ref.slots]
        everything = [(d.index, s) for d in first.datasets for s in range(len(d.slot_items))]
        assert sorted(slots) == sorted(everything)


def test_epochs_count_from_one(mixed_dataset):
    group = build_dataset_group(mixed_dataset)
    with pytest.raises(ValueError, match="count from 1"):
        group.batches_for_epoch(0)
    with pytest.raises(ValueError, match="count from 1"):
        group.load_batch(group.batches_for_epoch(1)[0], 0)


def test_batches_are_reproducible_and_resumable(mixed_dataset):
    mixed_dataset.flip_aug = True
    mixed_dataset.shuffle_caption = True
    group = build_dataset_group(mixed_dataset)
    refs = group.batches_for_epoch(2)
    again = build_dataset_group(mixed_dataset)
    resumed = list(again.iter_epoch(2, start_batch=3, num_workers=2))
    assert len(resumed) == len(refs) - 3
    for ref, batch in zip(refs[3:], resumed):
        expected = group.load_batch(ref, 2)
        assert batch.captions == expected.captions and batch.image_paths == expected.image_paths
        assert np.array_equal(batch.images, expected.images) and np.array_equal(batch.flipped, expected.flipped)
        assert np.array_equal(batch.crop_top_lefts, expected.crop_top_lefts)
    inline = [b.image_paths for b in group.iter_epoch(2, num_workers=0)]
    assert inline == [group.load_batch(ref, 2).image_paths for ref in refs]


def test_flip_mirrors_pixels_and_crop_left(tmp_path):
    make_image(tmp_path / "img" / "1_x" / "a.png", 30, 50)
    group = build_dataset_group(parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", "--flip_aug"))
    rows = {}
    for epoch in range(1, 20):
        (ref,) = group.batches_for_epoch(epoch)
        batch = group.load_batch(ref, epoch)
        rows[bool(batch.flipped[0])] = batch
    plain, flipped = rows[False], rows[True]
    assert np.array_equal(flipped.images[0], plain.images[0][:, :, ::-1])
    # 30x50 in 64x64: fitted inside at width 38.4, left 12.0, right 50.4 -> flipped left 64 - 50.4
    assert plain.crop_top_lefts.tolist() == [[0, 12]] and flipped.crop_top_lefts.tolist() == [[0, 13]]
    assert plain.original_sizes_hw.tolist() == [[50, 30]] and plain.target_sizes_hw.tolist() == [[64, 64]]


def test_caption_randomness_is_per_epoch_and_token_warmup_follows_steps(tmp_path):
    folder = tmp_path / "img" / "1_x"
    make_image(folder / "a.png", 64, 64)
    (folder / "a.caption").write_text("a, b, c, d, e", encoding="utf-8")
    args = parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", "--token_warmup_step", "4")
    group = build_dataset_group(args)
    group.set_max_train_steps(8)
    # one batch per epoch, so epoch e starts at step e - 1: tags = floor(step * 4 / 4) + 1
    captions = [group.load_batch(group.batches_for_epoch(e)[0], e).captions[0] for e in (1, 2, 3, 5)]
    assert captions == ["a", "a, b", "a, b, c", "a, b, c, d, e"]


def test_alpha_mask_comes_from_the_alpha_channel(tmp_path):
    path = make_image(tmp_path / "img" / "1_x" / "a.png", 64, 64, mode="RGBA")
    alpha = np.array(Image.open(path))[:, :, 3].astype(np.float32) / 255
    group = build_dataset_group(parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", "--alpha_mask"))
    batch = group.load_batch(group.batches_for_epoch(1)[0], 1)
    assert batch.alpha_masks.shape == (1, 64, 64)
    assert np.allclose(batch.alpha_masks[0], alpha)


def test_exif_rotation_decides_the_bucket(tmp_path):
    image = Image.fromarray(np.zeros((100, 200, 3), np.uint8))  # stored landscape
    exif = image.getexif()
    exif[0x0112] = 6  # displayed portrait
    (tmp_path / "img" / "1_x").mkdir(parents=True)
    image.save(tmp_path / "img" / "1_x" / "a.jpg", exif=exif)
    args = parse_args("--train_data_dir", tmp_path / "img", "--resolution", "256", "--enable_bucket", "--min_bucket_reso", "128")
    (dataset,) = build_dataset_group(args).datasets
    assert dataset.items[0].image_size == (100, 200) and dataset.buckets[0].reso == (192, 320)


def test_nothing_is_written_into_image_folders(mixed_dataset, tmp_path):
    def snapshot():
        return sorted((root, name, os.path.getmtime(os.path.join(root, name))) for root, _, names in os.walk(tmp_path) for name in names)

    before = snapshot()
    group = build_dataset_group(mixed_dataset)
    for _ in group.iter_epoch(1, num_workers=2):
        pass
    assert snapshot() == before


def test_cache_info_writes_sd_scripts_file_and_reuses_captions(tmp_path):
    folder = tmp_path / "img" / "2_x"
    path = make_image(folder / "a.png", 64, 32)
    (folder / "a.caption").write_text("from file", encoding="utf-8")
    args = parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", "--cache_info")
    build_dataset_group(args)
    cache = json.loads((folder / "metadata_cache.json").read_text(encoding="utf-8"))
    assert cache == {path: {"caption": "from file", "resolution": [64, 32]}}
    (folder / "a.caption").write_text("changed", encoding="utf-8")
    assert build_dataset_group(args).datasets[0].items[0].caption == "from file"


# ---- bad input: each a one-line UserError before training, or a warning ----


def dreambooth_args(tmp_path, *extra):
    return parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", *extra)


def test_missing_image_dir_in_config(tmp_path):
    config = write_config(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'nope'}'\n")
    with pytest.raises(UserError, match=r"image_dir not found: .*nope \(\[\[datasets.subsets\]\] #1"):
        build_dataset_group(parse_args("--dataset_config", config, "--resolution", "64"))


def test_folder_without_images_ignoring_other_files(tmp_path):
    folder = tmp_path / "img" / "1_x"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("x")
    (folder / "data.json").write_text("{}")
    with pytest.raises(UserError, match=r"no images \(.png .jpg .jpeg .webp .bmp\) in .*1_x"):
        build_dataset_group(dreambooth_args(tmp_path))
    make_image(folder / "a.png", 64, 64)
    assert build_dataset_group(dreambooth_args(tmp_path)).num_train_images == 1


@pytest.mark.parametrize("name", ["bad.png", "bad.jpg"])
def test_corrupt_or_truncated_image_stops_before_training(tmp_path, name):
    folder = tmp_path / "img" / "1_x"
    make_image(folder / "good.png", 64, 64)
    bad = make_image(folder / name, 64, 64)
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])
    with pytest.raises(UserError, match=rf"cannot read image .*{name}: .*--skip_bad_images") as error:
        build_dataset_group(dreambooth_args(tmp_path))
    assert "\n" not in str(error.value)


def test_skip_bad_images_lists_and_skips_them(tmp_path, caplog):
    folder = tmp_path / "img" / "1_x"
    make_image(folder / "good.png", 64, 64)
    (folder / "junk.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        group = build_dataset_group(dreambooth_args(tmp_path, "--skip_bad_images"))
    assert group.num_train_images == 1
    assert "skipping 1 unreadable images" in caplog.text and "junk.png" in caplog.text


def test_caption_without_image_is_a_warning(tmp_path, caplog):
    folder = tmp_path / "img" / "1_x"
    make_image(folder / "a.png", 64, 64)
    (folder / "orphan.caption").write_text("lonely")
    with caplog.at_level(logging.WARNING):
        build_dataset_group(dreambooth_args(tmp_path))
    assert "1 caption files in" in caplog.text and "orphan.caption" in caplog.text


def test_missing_captions_use_class_tokens_with_a_count(tmp_path, caplog):
    folder = tmp_path / "img" / "3_sks cat"
    make_image(folder / "a.png", 64, 64)
    make_image(folder / "b.png", 64, 64)
    (folder / "b.caption").write_text("own caption")
    with caplog.at_level(logging.WARNING):
        group = build_dataset_group(dreambooth_args(tmp_path))
    assert [item.caption for item in group.datasets[0].items] == ["sks cat", "own caption"]
    assert "for 1 of 2 images" in caplog.text and "'sks cat'" in caplog.text


def test_zero_byte_caption_is_an_error(tmp_path):
    folder = tmp_path / "img" / "1_x"
    make_image(folder / "a.png", 64, 64)
    (folder / "a.caption").write_bytes(b"")
    with pytest.raises(UserError, match=r"caption file is empty: .*a.caption"):
        build_dataset_group(dreambooth_args(tmp_path))


def test_metadata_problems(tmp_path):
    make_image(tmp_path / "ft" / "x.png", 64, 64)
    metadata = tmp_path / "ft" / "md.json"
    args = parse_args("--in_json", metadata, "--train_data_dir", tmp_path / "ft", "--resolution", "64")
    with pytest.raises(UserError, match="metadata_file not found"):
        build_dataset_group(args)
    metadata.write_text('{"x": {"caption": "c"}, "gone.png": {"caption": "d"}}')
    with pytest.raises(UserError, match=r"cannot read image .*gone.png: file not found"):
        build_dataset_group(args)
    metadata.write_text('{"x": {"caption": "c"},}')
    with pytest.raises(UserError, match=r"md.json: invalid JSON at line 1"):
        build_dataset_group(args)


def test_jsonl_metadata(tmp_path):
    make_image(tmp_path / "ft" / "x.png", 64, 64)
    metadata = tmp_path / "ft" / "md.jsonl"
    metadata.write_text('{"image_path": "x.png", "caption": "hello", "tags": "t1"}\n')
    group = build_dataset_group(parse_args("--in_json", metadata, "--train_data_dir", tmp_path / "ft", "--resolution", "64"))
    assert group.datasets[0].items[0].caption == "hello,t1"


def test_tiny_image_with_bucket_no_upscale(tmp_path):
    make_image(tmp_path / "img" / "1_x" / "a.png", 40, 100)
    args = dreambooth_args(tmp_path, "--enable_bucket", "--bucket_no_upscale", "--min_bucket_reso", "64")
    with pytest.raises(UserError, match=r"a.png \(40x100\) is smaller than bucket_reso_steps \(64\)"):
        build_dataset_group(args)


def test_only_regularization_images(tmp_path):
    make_image(tmp_path / "reg" / "img.png", 64, 64)
    config = write_config(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'reg'}'\nis_reg = true\n")
    with pytest.raises(UserError, match="only regularization images"):
        build_dataset_group(parse_args("--dataset_config", config, "--resolution", "64"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cache_latents", "--color_aug"], "color_aug and random_crop cannot be used with --cache_latents"),
        (["--cache_latents_to_disk", "--random_crop"], "cannot be used with --cache_latents"),
        (["--vae_batch_size", "0"], "--vae_batch_size must be at least 1"),
    ],
)
def test_cache_incompatibilities(tmp_path, extra, message):
    make_image(tmp_path / "img" / "1_x" / "a.png", 64, 64)
    with pytest.raises(UserError, match=message):
        build_dataset_group(dreambooth_args(tmp_path, *extra))


def test_text_encoder_cache_needs_unet_only_and_fixed_captions(tmp_path):
    make_image(tmp_path / "img" / "1_x" / "a.png", 64, 64)
    args = dreambooth_args(tmp_path, "--shuffle_caption")
    args.cache_text_encoder_outputs = True
    with pytest.raises(UserError, match="requires --network_train_unet_only"):
        build_dataset_group(args)
    args.network_train_unet_only = True
    with pytest.raises(UserError, match="shuffle_caption.* cannot be used with --cache_text_encoder_outputs"):
        build_dataset_group(args)
    args.shuffle_caption = False
    assert build_dataset_group(args).num_train_images == 1


def test_loading_runs_ahead_in_background_threads(mixed_dataset):
    group = build_dataset_group(mixed_dataset)
    load = group.load_batch
    second_started, threads = threading.Event(), []

    def recording_load(ref, epoch):
        threads.append(threading.current_thread())
        if ref.position == 1:
            second_started.set()
        return load(ref, epoch)

    group.load_batch = recording_load
    batches = group.iter_epoch(1, num_workers=2)
    next(batches)
    assert second_started.wait(timeout=10)  # the next batch loads while this one is being used
    assert threading.main_thread() not in threads
    batches.close()


def test_persistent_workers_are_reused_across_epochs(mixed_dataset):
    mixed_dataset.persistent_data_loader_workers = True
    group = build_dataset_group(mixed_dataset)
    load, threads_by_epoch = group.load_batch, {1: set(), 2: set()}

    def recording_load(ref, epoch):
        threads_by_epoch[epoch].add(threading.current_thread())
        return load(ref, epoch)

    group.load_batch = recording_load
    for epoch in (1, 2):
        for _ in group.iter_epoch(epoch, num_workers=2):
            pass
    assert threads_by_epoch[2] <= threads_by_epoch[1]
    group.close()
    assert not any(thread.is_alive() for thread in threads_by_epoch[1])


def test_shards_split_each_step_between_ranks_and_top_up_the_last(mixed_dataset):
    whole = build_dataset_group(mixed_dataset)
    order = whole.batches_for_epoch(2)
    assert len(order) % 2 == 1, "the fixture should leave an odd batch count, to exercise the top-up"
    shards = []
    for rank in (0, 1):
        group = build_dataset_group(mixed_dataset)
        group.shard(rank, 2)
        assert group.num_batches_per_epoch == (len(order) + 1) // 2 == group.metadata()["ss_num_batches_per_epoch"]
        shards.append(group.batches_for_epoch(2))
    for step, (mine, other) in enumerate(zip(*shards)):
        assert mine.position == other.position == step
        assert mine.peer_latent_sizes == other.peer_latent_sizes and len(mine.peer_latent_sizes) == 2
        expected = [order[(2 * step + rank) % len(order)] for rank in (0, 1)]
        assert [(ref.dataset_index, ref.bucket_index, ref.slots) for ref in (mine, other)] == [
            (ref.dataset_index, ref.bucket_index, ref.slots) for ref in expected]
        for ref, size in zip(expected, mine.peer_latent_sizes):
            width, height = whole.datasets[ref.dataset_index].buckets[ref.bucket_index].reso
            assert size == (len(ref.slots), height // 8, width // 8)
    assert (shards[1][-1].dataset_index, shards[1][-1].slots) == (order[0].dataset_index, order[0].slots)
    group = build_dataset_group(mixed_dataset)
    group.shard(1, 2)
    assert group.load_batch(shards[1][0], 2).peer_latent_sizes == shards[1][0].peer_latent_sizes
