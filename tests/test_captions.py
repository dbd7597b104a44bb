"""Caption processing with seeded randomness, caption files and tag counting."""

import random

import pytest

from library.captions import (
    CaptionOptions,
    caption_from_metadata,
    count_tags,
    process_caption,
    read_caption_file,
)
from library.errors import UserError


def run(caption, seed=0, epoch=1, step=0, max_train_steps=0, **options):
    return process_caption(caption, CaptionOptions(**options), random.Random(seed), epoch, step, max_train_steps)


def test_prefix_and_suffix_are_joined_with_spaces():
    assert run("a, b", caption_prefix="pre,", caption_suffix=", post") == "pre, a, b , post"


def test_multiline_caption_uses_first_line_after_suffix_is_added():
    # as in sd-scripts the suffix is appended before the first line is taken, so it is lost
    assert run("a, b\nsecond line", caption_suffix="post") == "a, b"


def test_shuffle_keeps_first_tokens_and_draws_exactly_one_shuffle():
    caption = "sks, dog, grass, sky, tree"
    for seed in range(5):
        expected_flex = ["dog", "grass", "sky", "tree"]
        random.Random(seed).shuffle(expected_flex)
        assert run(caption, seed=seed, shuffle_caption=True, keep_tokens=1) == ", ".join(["sks"] + expected_flex)


def test_shuffle_normalises_spacing_and_keeps_empty_tags():
    assert run("a,b ,  c", shuffle_caption=False, token_warmup_step=100) == "a"  # warmup at step 0: min 1 tag
    result = run("a,,b", shuffle_caption=True)
    assert sorted(result.split(", ")) == ["", "a", "b"]


def test_keep_tokens_separator_fixes_head_and_tail():
    caption = "1girl, miku ||| stage, mic, smile ||| best quality, rating: general"
    results = {run(caption, seed=s, shuffle_caption=True, keep_tokens_separator="|||") for s in range(20)}
    for result in results:
        assert result.startswith("1girl, miku, ")
        assert result.endswith(", best quality, rating: general")
        middle = result[len("1girl, miku, ") : -len(", best quality, rating: general")]
        assert sorted(middle.split(", ")) == ["mic", "smile", "stage"]
    assert len(results) > 1


def test_secondary_separator_keeps_group_together_and_is_replaced_after_shuffle():
    caption = "a, sky;;;cloud;;;day, b"
    for seed in range(10):
        result = run(caption, seed=seed, shuffle_caption=True, secondary_separator=";;;")
        assert sorted(result.split(", ")) == ["a", "b", "sky,cloud,day"]


def test_caption_dropout_rate_uses_first_draw():
    for seed in range(20):
        dropped = random.Random(seed).random() < 0.5
        assert (run("a, b", seed=seed, caption_dropout_rate=0.5) == "") == dropped


def test_caption_dropout_every_n_epochs_drops_on_multiples():
    assert [run("a", epoch=e, caption_dropout_every_n_epochs=2) for e in (1, 2, 3, 4)] == ["a", "", "a", ""]


def test_tag_dropout_keeps_fixed_tokens():
    assert run("a, b, c", keep_tokens=1, caption_tag_dropout_rate=1.0) == "a"
    for seed in range(10):
        draws = random.Random(seed)
        expected = [t for t in ["b", "c", "d"] if draws.random() >= 0.5]
        assert run("a, b, c, d", seed=seed, keep_tokens=1, caption_tag_dropout_rate=0.5) == ", ".join(["a"] + expected)


def test_wildcards_choose_per_seed_and_unescape_double_braces():
    results = {run("{red|blue} ball, {{retro}}", seed=s, enable_wildcard=True) for s in range(20)}
    assert results == {"red ball, {retro}", "blue ball, {retro}"}


def test_multiline_captions_pick_a_random_line_only_with_wildcards():
    caption = "first\nsecond\nthird"
    assert run(caption) == "first"
    assert {run(caption, seed=s, enable_wildcard=True) for s in range(30)} == {"first", "second", "third"}


def test_token_warmup_reveals_tags_linearly():
    caption = "a, b, c, d, e"
    # tags = floor(step * (5 - 1) / 4) + 1
    assert [run(caption, step=s, token_warmup_step=4) for s in (0, 1, 2, 4)] == ["a", "a, b", "a, b, c", caption]
    # a fraction of max_train_steps: 0.5 * 8 = 4 steps
    assert run(caption, step=2, token_warmup_step=0.5, max_train_steps=8) == "a, b, c"


def test_read_caption_file(tmp_path):
    image = tmp_path / "img.png"
    (tmp_path / "img.txt").write_text("  first line  \n\nsecond\n", encoding="utf-8")
    assert read_caption_file(str(image), ".txt", enable_wildcard=False) == "first line"
    assert read_caption_file(str(image), ".txt", enable_wildcard=True) == "first line\nsecond"
    assert read_caption_file(str(image), ".caption", enable_wildcard=False) is None


def test_face_crop_named_image_falls_back_to_base_caption(tmp_path):
    (tmp_path / "face.caption").write_text("base caption", encoding="utf-8")
    assert read_caption_file(str(tmp_path / "face_10_20_30_40.png"), ".caption", False) == "base caption"


def test_empty_and_non_utf8_caption_files_are_user_errors(tmp_path):
    (tmp_path / "a.caption").write_bytes(b"")
    with pytest.raises(UserError, match="caption file is empty: .*a.caption"):
        read_caption_file(str(tmp_path / "a.png"), ".caption", False)
    (tmp_path / "b.caption").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="not UTF-8.*b.caption"):
        read_caption_file(str(tmp_path / "b.png"), ".caption", False)


def test_metadata_caption_and_tags_merge():
    options = CaptionOptions()
    assert caption_from_metadata("a frog", "green, animal", options) == "a frog,green, animal"
    assert caption_from_metadata(None, "green", options) == "green"
    assert caption_from_metadata("a frog", None, options) == "a frog"
    wildcard = CaptionOptions(enable_wildcard=True)
    assert caption_from_metadata("a frog\n\nline two", "green\nanimal", wildcard) == "a frog,green,animal\nline two,green,animal"


def test_count_tags_lowercases_and_accumulates():
    counts = count_tags(["A, b", "a,  ,c"])
    assert counts == {"a": 2, "b": 1, "c": 1}
    assert count_tags(["c"], counts) == {"a": 2, "b": 1, "c": 2}
