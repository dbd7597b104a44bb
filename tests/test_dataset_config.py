"""Dataset config files and command-line fallback: precedence, validation, refusals, defaults."""

import argparse
import logging
import textwrap

import pytest

from library.dataset_args import add_dataset_arguments, parse_resolution, refuse_unsupported_arguments
from library.dataset_config import DREAMBOOTH, FINETUNE, load_dataset_configs
from library.errors import UserError


def parse_args(*argv):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def write_config(tmp_path, text, name="dataset.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def load(tmp_path, text, *argv, name="dataset.toml", sdxl=True):
    return load_dataset_configs(parse_args("--dataset_config", write_config(tmp_path, text, name), *argv), sdxl=sdxl)


# sd-scripts' own example (docs/config_README-en.md), unchanged apart from the paths
README_EXAMPLE = """
    [general]
    shuffle_caption = true
    caption_extension = '.txt'
    keep_tokens = 1

    # This is a DreamBooth-style dataset
    [[datasets]]
    resolution = 512
    batch_size = 4
    keep_tokens = 2

      [[datasets.subsets]]
      image_dir = 'C:\\hoge'
      class_tokens = 'hoge girl'
      # This subset uses keep_tokens = 2 (the value of the parent datasets)

      [[datasets.subsets]]
      image_dir = 'C:\\fuga'
      class_tokens = 'fuga boy'
      keep_tokens = 3

      [[datasets.subsets]]
      is_reg = true
      image_dir = 'C:\\reg'
      class_tokens = 'human'
      keep_tokens = 1

    # This is a fine-tuning dataset
    [[datasets]]
    resolution = [768, 768]
    batch_size = 2

      [[datasets.subsets]]
      image_dir = 'C:\\piyo'
      metadata_file = 'C:\\piyo\\piyo_md.json'
      # This subset uses keep_tokens = 1 (the value of [general])
"""


def test_sd_scripts_readme_example_loads_with_its_precedence(tmp_path):
    dreambooth, finetune = load(tmp_path, README_EXAMPLE, "--keep_tokens", "9", "--caption_prefix", "cli")
    assert (dreambooth.kind, finetune.kind) == (DREAMBOOTH, FINETUNE)
    assert (dreambooth.resolution, dreambooth.batch_size) == ((512, 512), 4)
    assert (finetune.resolution, finetune.batch_size) == ((768, 768), 2)
    assert [s.captions.keep_tokens for s in dreambooth.subsets] == [2, 3, 1]  # dataset, subset, subset
    assert finetune.subsets[0].captions.keep_tokens == 1  # [general] beats the command line
    assert [s.is_reg for s in dreambooth.subsets] == [False, False, True]
    assert [s.class_tokens for s in dreambooth.subsets] == ["hoge girl", "fuga boy", "human"]
    assert dreambooth.subsets[0].caption_extension == ".txt"
    assert dreambooth.subsets[0].captions.shuffle_caption is True
    assert finetune.subsets[0].captions.caption_prefix == "cli"  # only set on the command line
    assert finetune.subsets[0].metadata_file == "C:\\piyo\\piyo_md.json"


def test_command_line_values_fill_in_with_renamed_options(tmp_path):
    config = """
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "a"
    """
    (dataset,) = load(tmp_path, config, "--resolution", "768,1024", "--train_batch_size", "3", "--dataset_repeats", "5")
    assert dataset.resolution == (768, 1024)
    assert dataset.batch_size == 3
    assert dataset.subsets[0].num_repeats == 5
    assert dataset.subsets[0].caption_extension == ".caption"  # sd-scripts' default


def test_validation_split_and_seed_come_from_the_command_line_unless_the_file_sets_them(tmp_path):
    config = """
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "a"
        [[datasets]]
        validation_split = 0.5
          [[datasets.subsets]]
          image_dir = "b"
    """
    from_cli, from_file = load(tmp_path, config, "--resolution", "512", "--validation_split", "0.25", "--validation_seed", "3")
    assert (from_cli.validation_split, from_cli.validation_seed) == (0.25, 3)
    assert (from_file.validation_split, from_file.validation_seed) == (0.5, 3)


def test_deprecated_caption_extention_and_missing_dot(tmp_path):
    config = """
        [general]
        resolution = 512
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "a"
          [[datasets.subsets]]
          image_dir = "b"
          caption_extension = "txt"
    """
    (dataset,) = load(tmp_path, config, "--caption_extention", ".tags")
    assert [s.caption_extension for s in dataset.subsets] == [".tags", ".txt"]


def test_json_config_loads_like_toml(tmp_path):
    text = '{"general": {"resolution": [512, 768]}, "datasets": [{"subsets": [{"image_dir": "a", "num_repeats": 2}]}]}'
    (dataset,) = load(tmp_path, text, name="dataset.json")
    assert dataset.resolution == (512, 768) and dataset.subsets[0].num_repeats == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nflip_agu = true\n',
         r'"flip_agu" is not allowed in \[\[datasets.subsets\]\] #1 of \[\[datasets\]\] #1 in dataset.toml \(unknown'),
        ('[general]\nimage_dir = "a"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n',
         r'"image_dir" is not allowed in \[general\] in dataset.toml \(it belongs in \[\[datasets.subsets\]\]\)'),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nbatch_size = 2\n',
         r'"batch_size" is not allowed .* \(it is a dataset option'),
        ('[general]\nprior_loss_weight = 1.0\n', r"--prior_loss_weight"),
        ('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = "10"\n',
         r'"num_repeats" in .* must be an integer, got \'10\''),
        ('[general]\nflip_aug = 1\n', r'"flip_aug" in \[general\] in dataset.toml must be a boolean'),
        ('[general]\nresolution = [512]\n', r'"resolution" .* must be an integer or \[width, height\]'),
        ('[general]\nface_crop_aug_range = [1.0, 2.0]\n', r'"face_crop_aug_range" .* is not supported'),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nconditioning_data_dir = "c"\n', r"ControlNet"),
        ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n', r'"image_dir" is required'),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nmetadata_file = "m.json"\n',
         r"mixes DreamBooth subsets .* separate \[\[datasets\]\]"),
        ('[[datasets]]\nresolution = 512\n', r"has no \[\[datasets.subsets\]\]"),
        ('[general]\nresolution = 512\n', r"at least one \[\[datasets\]\]"),
        ('[[dataset]]\n[[dataset.subsets]]\nimage_dir = "a"\n', r'unknown top-level key "dataset"'),
        ('[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\ncaption_extension = ".txt"\n',
         r"only applies to DreamBooth"),
    ],
)
def test_invalid_configs_name_key_table_and_file(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, config, "--resolution", "512")


def test_malformed_toml_reports_line_and_column(tmp_path):
    with pytest.raises(UserError, match=r"dataset.toml: invalid TOML: .*line 3, column 10"):
        load(tmp_path, '[general]\nresolution = 512\n[datasets\n')


def test_toml_that_only_sd_scripts_parser_accepts_still_loads(tmp_path):
    # the `toml` package sd-scripts uses accepts non-ASCII bare keys; the file gets past parsing
    with pytest.raises(UserError, match='"é" is not allowed in \\[general\\]'):
        load(tmp_path, "[general]\né = 1\n")


def test_malformed_json_reports_line_and_column(tmp_path):
    with pytest.raises(UserError, match=r"invalid JSON at line 2, column 1"):
        load(tmp_path, '{"general": {}\n"datasets": []}', name="dataset.json")


def test_missing_config_file_and_wrong_extension(tmp_path):
    with pytest.raises(UserError, match="dataset config file not found"):
        load_dataset_configs(parse_args("--dataset_config", str(tmp_path / "nope.toml")))
    with pytest.raises(UserError, match=r"must be a .toml or .json file"):
        load(tmp_path, "x", name="dataset.yaml")


SIMPLE = """
    [[datasets]]
    {dataset}
      [[datasets.subsets]]
      image_dir = "a"
      {subset}
"""


@pytest.mark.parametrize(
    "dataset, subset, argv, message",
    [
        ("", "num_repeats = 0", [], r"num_repeats must be at least 1 in \[\[datasets.subsets\]\] #1"),
        ("", "num_repeats = -3", [], r"num_repeats must be at least 1 .* got -3"),
        ("resolution = 500", "", ["--enable_bucket"], r"resolution \(500, 500\) .* multiple of bucket_reso_steps \(64\)"),
        ("resolution = [512, 520]", "", [], r"multiple of the model's step \(32\)"),
        ("bucket_reso_steps = 48", "", ["--enable_bucket"], r"bucket_reso_steps must be a multiple of 32"),
        ("min_bucket_reso = 640", "", ["--enable_bucket"], r"min_bucket_reso \(640\) must not exceed"),
        ("max_bucket_reso = 256", "", ["--enable_bucket"], r"max_bucket_reso \(256\) must not be below"),
        ("batch_size = 0", "", [], r"batch_size must be at least 1"),
        ("", "caption_dropout_rate = 1.5", [], r"caption_dropout_rate must be between 0 and 1"),
        ("", "keep_tokens = -1", [], r"keep_tokens must not be negative"),
        ("", 'resize_interpolation = "fancy"', [], r"resize_interpolation must be one of lanczos"),
        ("validation_split = 1.0", "", [], r"validation_split must be at least 0 and below 1"),
        ("network_multiplier = 0.5", "", [], r"network_multiplier other than 1.0 is not supported"),
    ],
)
def test_bad_values_are_refused(tmp_path, dataset, subset, argv, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, SIMPLE.format(dataset=dataset, subset=subset), "--resolution", "512", *argv)


def test_step_rule_depends_on_model(tmp_path):
    config = SIMPLE.format(dataset="bucket_reso_steps = 32", subset="")
    assert load(tmp_path, config, "--resolution", "512", "--enable_bucket")[0].bucket_reso_steps == 32
    with pytest.raises(UserError, match="multiple of 64"):
        load(tmp_path, config, "--resolution", "512", "--enable_bucket", sdxl=False)


def test_bucket_limits_are_rounded_to_steps_with_a_warning(tmp_path, caplog):
    config = SIMPLE.format(dataset="min_bucket_reso = 300\nmax_bucket_reso = 1000", subset="")
    with caplog.at_level(logging.WARNING):
        (dataset,) = load(tmp_path, config, "--resolution", "512", "--enable_bucket")
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (256, 1024)
    assert "300 -> 256" in caplog.text and "1000 -> 1024" in caplog.text


def test_without_buckets_limits_are_recorded_as_none(tmp_path):
    (dataset,) = load(tmp_path, SIMPLE.format(dataset="", subset=""), "--resolution", "512")
    assert (dataset.enable_bucket, dataset.min_bucket_reso, dataset.bucket_reso_steps) == (False, None, None)


def test_resolution_is_required(tmp_path):
    with pytest.raises(UserError, match="resolution is required"):
        load(tmp_path, SIMPLE.format(dataset="", subset=""))


def test_duplicate_subset_in_a_dataset_is_ignored_with_warning(tmp_path, caplog):
    config = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nimage_dir = "a"\n'
    with caplog.at_level(logging.WARNING):
        (dataset,) = load(tmp_path, config, "--resolution", "512")
    assert len(dataset.subsets) == 1 and "duplicated subset" in caplog.text


def test_command_line_paths_are_ignored_with_a_warning_when_a_config_is_given(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load(tmp_path, SIMPLE.format(dataset="", subset=""), "--resolution", "512", "--train_data_dir", "x")
    assert "ignoring --train_data_dir" in caplog.text


def test_repeat_folders_become_subsets(tmp_path, caplog):
    for name in ["10_sks dog", "2_", "0_disabled", "no_repeats", "3_x_y"]:
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "5_file.png").write_bytes(b"")
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    args = parse_args("--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"), "--resolution", "512")
    with caplog.at_level(logging.WARNING):
        (dataset,) = load_dataset_configs(args)
    summary = [(s.image_dir.rsplit("/", 1)[1], s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert summary == [("10_sks dog", 10, "sks dog", False), ("2_", 2, "", False), ("3_x_y", 3, "x_y", False), ("1_dog", 1, "dog", True)]
    assert "no_repeats" in caplog.text and "0_disabled" in caplog.text


def test_command_line_fallback_errors(tmp_path):
    with pytest.raises(UserError, match="no training data"):
        load_dataset_configs(parse_args("--resolution", "512"))
    with pytest.raises(UserError, match="--train_data_dir folder not found"):
        load_dataset_configs(parse_args("--train_data_dir", str(tmp_path / "missing"), "--resolution", "512"))
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"no `<repeats>_<class tokens>` folder .* parent"):
        load_dataset_configs(parse_args("--train_data_dir", str(tmp_path / "images"), "--resolution", "512"))
    (tmp_path / "images" / "1_a").mkdir()
    with pytest.raises(UserError, match="--reg_data_dir folder not found"):
        load_dataset_configs(
            parse_args("--train_data_dir", str(tmp_path / "images"), "--reg_data_dir", "nope", "--resolution", "512")
        )


def test_in_json_makes_a_fine_tuning_dataset(tmp_path):
    args = parse_args("--in_json", "meta.json", "--train_data_dir", "imgs", "--resolution", "1024", "--dataset_repeats", "4")
    (dataset,) = load_dataset_configs(args)
    assert dataset.kind == FINETUNE
    assert (dataset.subsets[0].metadata_file, dataset.subsets[0].image_dir, dataset.subsets[0].num_repeats) == ("meta.json", "imgs", 4)


def test_argument_defaults_match_sd_scripts():
    args = vars(parse_args())
    expected = {
        "train_data_dir": None, "reg_data_dir": None, "in_json": None, "dataset_config": None, "dataset_repeats": 1,
        "train_batch_size": 1, "resolution": None, "enable_bucket": False, "min_bucket_reso": 256,
        "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False, "caption_extension": ".caption",
        "caption_extention": None, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
        "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None,
        "caption_suffix": None, "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
        "caption_tag_dropout_rate": 0.0, "color_aug": False, "flip_aug": False, "random_crop": False,
        "face_crop_aug_range": None, "token_warmup_min": 1, "token_warmup_step": 0, "cache_latents": False,
        "cache_latents_to_disk": False, "vae_batch_size": 1, "skip_cache_check": False, "max_data_loader_n_workers": 8,
        "persistent_data_loader_workers": False, "prior_loss_weight": 1.0, "resize_interpolation": None,
        "alpha_mask": False, "validation_split": 0.0, "validation_seed": None, "max_token_length": None,
        "cache_info": False, "debug_dataset": False, "dataset_class": None, "skip_bad_images": False,
    }
    assert args == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--face_crop_aug_range", "2.0,4.0"], "--face_crop_aug_range is not supported"),
        (["--debug_dataset"], "--debug_dataset is not supported"),
        (["--dataset_class", "my.Dataset"], "--dataset_class is not supported"),
    ],
)
def test_unsupported_arguments_are_refused_by_name(argv, message):
    with pytest.raises(UserError, match=message):
        refuse_unsupported_arguments(parse_args(*argv))


def test_parse_resolution():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("768,1024") == (768, 1024)
    assert parse_resolution((640, 480)) == (640, 480)
    for bad in ["abc", "1,2,3", "0", "-5,5"]:
        with pytest.raises(UserError, match="--resolution"):
            parse_resolution(bad)
