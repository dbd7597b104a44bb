"""Latent and text-encoder caches: sd-scripts file names and arrays, reuse, rebuild, round trips."""

import argparse
import os

import numpy as np
import pytest
from PIL import Image

from library.dataset_args import add_dataset_arguments
from library.errors import UserError
from library.latent_cache import (
    cache_latents,
    cache_text_encoder_outputs,
    latents_npz_path,
    load_latents_npz,
    text_encoder_outputs_npz_path,
)
from library.train_dataset import build_dataset_group
from image_files import make_image


def parse_args(*argv):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    args.seed = 7
    return args


class FakeVae:
    """Stands in for the VAE: 8x8 block means of the three channels plus their average."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append(images.shape)
        return pool8(images)


def pool8(images):
    b, _, h, w = images.shape
    blocks = images.reshape(b, 3, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
    return np.concatenate([blocks, blocks.mean(axis=1, keepdims=True)], axis=1).astype(np.float32)


def expected_latents(path, flipped=False):
    """Independent of the pipeline: the 64x64 PNG straight from Pillow, scaled to [-1, 1]."""
    pixels = np.array(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1
    if flipped:
        pixels = pixels[:, ::-1]
    return pool8(pixels.transpose(2, 0, 1)[None])[0]


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "img" / "1_x"
    make_image(images / "a.png", 64, 64, seed=1)
    make_image(images / "b.png", 96, 64, seed=2)
    return images


def group_for(tmp_path, *extra):
    return build_dataset_group(parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", *extra))


def test_cache_file_names_follow_sd_scripts():
    assert latents_npz_path("/d/img.png", (1024, 768)) == "/d/img_1024x0768_sdxl.npz"
    assert latents_npz_path("/d/x.y.JPG", (64, 12345)) == "/d/x.y_0064x12345_sdxl.npz"
    assert text_encoder_outputs_npz_path("/d/img.webp") == "/d/img_te_outputs.npz"


def test_disk_cache_writes_sd_scripts_arrays_and_batches_read_them(tmp_path, folder):
    group = group_for(tmp_path, "--flip_aug")
    vae = FakeVae()
    cache_latents(group, vae, vae_batch_size=2, to_disk=True)
    assert sorted(os.listdir(folder)) == ["a.png", "a_0064x0064_sdxl.npz", "b.png", "b_0096x0064_sdxl.npz"]

    with np.load(folder / "a_0064x0064_sdxl.npz") as data:
        assert sorted(data.files) == ["crop_ltrb", "latents", "latents_flipped", "original_size"]
        assert data["latents"].shape == (4, 8, 8) and data["latents"].dtype == np.float32
        assert np.allclose(data["latents"], expected_latents(folder / "a.png"), atol=1e-6)
        assert np.allclose(data["latents_flipped"], expected_latents(folder / "a.png", flipped=True), atol=1e-6)
        assert data["original_size"].tolist() == [64, 64] and data["original_size"].dtype == np.int64
    with np.load(folder / "b_0096x0064_sdxl.npz") as data:
        # 96x64 into 64x64: fitted inside at 64 x 42.67, so top = (64 - 42.67) // 2 = 10.0
        assert data["original_size"].tolist() == [96, 64]
        assert data["crop_ltrb"].tolist() == pytest.approx([0, 10.0, 64, 10.0 + 64 / 1.5])

    flips = set()
    for epoch in range(1, 6):
        for batch in group.iter_epoch(epoch, num_workers=1):
            assert batch.images is None and batch.latents.shape == (1, 4, 8, 8)
            if batch.image_paths[0].endswith("a.png"):
                flipped = bool(batch.flipped[0])
                flips.add(flipped)
                assert np.allclose(batch.latents[0], expected_latents(folder / "a.png", flipped), atol=1e-6)
            else:
                assert batch.crop_top_lefts.tolist() == [[10, 0]] and batch.original_sizes_hw.tolist() == [[64, 96]]
    assert flips == {False, True}


def test_valid_cache_is_reused_and_sd_scripts_file_is_accepted(tmp_path, folder):
    group = group_for(tmp_path)
    theirs = np.full((4, 8, 8), 0.25, np.float32)
    np.savez(folder / "a_0064x0064_sdxl.npz", latents=theirs, original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0.0, 64, 64.0]))
    vae = FakeVae()
    cache_latents(group, vae, to_disk=True)
    assert vae.calls == [(1, 3, 64, 64)]  # only b
    batch = next(b for b in group.iter_epoch(1, num_workers=0) if b.image_paths[0].endswith("a.png"))
    assert np.array_equal(batch.latents[0], theirs)

    mtimes = {name: os.path.getmtime(folder / name) for name in os.listdir(folder)}
    again = FakeVae()
    cache_latents(group_for(tmp_path), again, to_disk=True)
    assert again.calls == [] and mtimes == {name: os.path.getmtime(folder / name) for name in os.listdir(folder)}


@pytest.mark.parametrize(
    "arrays",
    [
        {"latents": np.zeros((4, 16, 16), np.float32)},  # another bucket
        {"latents": np.zeros((4, 8, 8), np.float32)},  # flip_aug needs latents_flipped
    ],
)
def test_mismatching_cache_is_rebuilt_unless_checks_are_skipped(tmp_path, folder, arrays):
    path = folder / "a_0064x0064_sdxl.npz"
    np.savez(path, original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]), **arrays)

    skipped = FakeVae()
    cache_latents(group_for(tmp_path, "--flip_aug"), skipped, to_disk=True, skip_cache_check=True)
    assert len(skipped.calls) == 2  # b only, twice (plain and flipped): a's file is trusted
    with np.load(path) as data:
        assert data["latents"].shape == arrays["latents"].shape

    cache_latents(group_for(tmp_path, "--flip_aug"), FakeVae(), to_disk=True)
    loaded = load_latents_npz(str(path))
    assert loaded.latents.shape == (4, 8, 8) and loaded.latents_flipped is not None
    assert np.allclose(loaded.latents, expected_latents(folder / "a.png"), atol=1e-6)


def test_memory_cache_writes_nothing_and_batches_by_bucket(tmp_path, folder):
    for i in range(3):
        make_image(folder / f"c{i}.png", 64, 64, seed=10 + i)
    make_image(folder / "wide.png", 128, 32, seed=20)
    before = sorted(os.listdir(folder))
    group = group_for(tmp_path, "--enable_bucket", "--min_bucket_reso", "32", "--bucket_reso_steps", "32")
    vae = FakeVae()
    cache_latents(group, vae, vae_batch_size=3)
    assert sorted(os.listdir(folder)) == before
    # a, b (ar 1.5 is nearest to 1) and c0-c2 share 64x64: batches of 3 and 2; wide.png is alone in 128x32
    assert sorted(vae.calls) == [(1, 3, 32, 128), (2, 3, 64, 64), (3, 3, 64, 64)]
    for batch in group.iter_epoch(1, num_workers=0):
        assert batch.images is None
        if batch.image_paths[0].endswith("a.png"):
            assert np.allclose(batch.latents[0], expected_latents(folder / "a.png"), atol=1e-6)


def test_alpha_mask_is_cached_with_latents(tmp_path):
    path = make_image(tmp_path / "img" / "1_x" / "a.png", 64, 64, mode="RGBA")
    group = group_for(tmp_path, "--alpha_mask")
    cache_latents(group, FakeVae(), to_disk=True)
    alpha = np.array(Image.open(path))[:, :, 3] / 255
    with np.load(tmp_path / "img" / "1_x" / "a_0064x0064_sdxl.npz") as data:
        assert np.allclose(data["alpha_mask"], alpha)
    batch = group.load_batch(group.batches_for_epoch(1)[0], 1)
    assert np.allclose(batch.alpha_masks[0], alpha)


def test_nan_latents_are_reported_with_the_image(tmp_path, folder):
    with pytest.raises(UserError, match=r"NaN in the latents of .*\.png"):
        cache_latents(group_for(tmp_path), lambda images: np.full((len(images), 4, 8, 8), np.nan, np.float32))


def test_progress_bar_is_shown(tmp_path, folder, capsys):
    cache_latents(group_for(tmp_path), FakeVae())
    assert "caching latents" in capsys.readouterr().err


# ---- text encoder outputs ----


class FakeTextEncoder:
    def __init__(self, tokens=3):
        self.tokens = tokens
        self.captions = []

    def __call__(self, captions):
        self.captions += captions
        codes = np.array([[sum(map(ord, c)) % 97] for c in captions], np.float32)
        return (
            np.ones((len(captions), self.tokens, 4), np.float32) * codes[:, :, None],
            np.ones((len(captions), self.tokens, 6), np.float32) * codes[:, :, None] * 2,
            np.ones((len(captions), 6), np.float32) * codes * 3,
        )


def te_group(tmp_path, *extra):
    args = parse_args("--train_data_dir", tmp_path / "img", "--resolution", "64", "--caption_prefix", "pre", *extra)
    args.cache_text_encoder_outputs, args.network_train_unet_only = True, True
    return build_dataset_group(args)


def test_text_encoder_cache_on_disk_round_trip(tmp_path, folder):
    (folder / "a.caption").write_text("red ball", encoding="utf-8")
    group = te_group(tmp_path)
    encoder = FakeTextEncoder()
    cache_text_encoder_outputs(group, encoder, to_disk=True)
    assert sorted(encoder.captions) == ["pre red ball", "pre x"]
    with np.load(folder / "a_te_outputs.npz") as data:
        assert sorted(data.files) == ["caption", "hidden_state1", "hidden_state2", "pool2"]
        assert data["hidden_state1"].shape == (3, 4) and data["pool2"].shape == (6,)
        assert str(data["caption"]) == "pre red ball"
        code = sum(map(ord, "pre red ball")) % 97
        assert (data["pool2"] == 3 * code).all()
    batch = next(b for b in group.iter_epoch(1, num_workers=0) if b.image_paths[0].endswith("a.png"))
    assert [o.shape for o in batch.text_encoder_outputs] == [(1, 3, 4), (1, 3, 6), (1, 6)]
    assert batch.captions == ["pre red ball"]
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_text_encoder_cache_rebuilds_on_changed_caption_or_shape(tmp_path, folder):
    cache_text_encoder_outputs(te_group(tmp_path), FakeTextEncoder(), to_disk=True)
    (folder / "a.caption").write_text("new words", encoding="utf-8")
    encoder = FakeTextEncoder()
    cache_text_encoder_outputs(te_group(tmp_path), encoder, to_disk=True)
    assert encoder.captions == ["pre new words", "pre new words"]  # one shape probe, one rebuild

    longer = FakeTextEncoder(tokens=5)
    cache_text_encoder_outputs(te_group(tmp_path), longer, to_disk=True)
    assert sorted(set(longer.captions)) == ["pre new words", "pre x"]
    with np.load(folder / "b_te_outputs.npz") as data:
        assert data["hidden_state1"].shape == (5, 4)


def test_sd_scripts_text_encoder_file_without_caption_is_reused(tmp_path, folder):
    np.savez(folder / "a_te_outputs.npz", hidden_state1=np.zeros((3, 4)), hidden_state2=np.zeros((3, 6)), pool2=np.zeros(6))
    encoder = FakeTextEncoder()
    cache_text_encoder_outputs(te_group(tmp_path), encoder, to_disk=True)
    assert encoder.captions == ["pre x", "pre x"]  # shape probe, then b; a's file is kept


def test_text_encoder_cache_in_memory(tmp_path, folder):
    before = sorted(os.listdir(folder))
    group = te_group(tmp_path)
    cache_text_encoder_outputs(group, FakeTextEncoder())
    assert sorted(os.listdir(folder)) == before
    batch = group.load_batch(group.batches_for_epoch(1)[0], 1)
    assert batch.text_encoder_outputs[2].shape == (1, 6)
