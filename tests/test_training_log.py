"""TensorBoard logging as sd-scripts: folder layout, tag names, step numbers, values equal to the JSONL log;
and validation during training leaves the trained LoRA exactly as it is without validation."""

import json
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from library.safetensors_io import open_safetensors
from library.training_log import LossRecorder
from sdxl_train_network import SdxlNetworkTrainer
from tools.make_demo_dataset import main as make_demo_dataset
from train_network import main as train_main


def read_event_file(path):
    """Scalar events {tag: [(step, value), ...]} from a TFRecord file (length, crc, Event proto, crc)."""
    scalars = {}
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert offset == len(data)
    return scalars


def train(root, model, output, *extra):
    train_main(SdxlNetworkTrainer, [
        "--pretrained_model_name_or_path", model, "--dataset_config", str(root / "dataset.toml"),
        "--output_dir", str(root / output), "--output_name", "lora", "--network_dim", "4",
        "--network_train_unet_only", "--cache_latents", "--learning_rate", "1e-3", "--seed", "3",
        "--max_train_steps", "6", "--lr_scheduler", "linear", *extra,
    ])


@pytest.fixture(scope="module")
def training_root(tmp_path_factory, tiny_sdxl_files):
    root = tmp_path_factory.mktemp("tblog")
    # 10 images, 2 held out for validation: 4 training batches of 2 per epoch, 1 validation batch
    make_demo_dataset(["--out", str(root / "images")])
    make_demo_dataset(["--out", str(root / "more")])
    for index, path in enumerate(sorted((root / "more").iterdir())[:4]):
        path.rename(root / "images" / f"extra{index}{path.suffix}")
    (root / "dataset.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
        f'validation_split = 0.2\n[[datasets.subsets]]\nimage_dir = "{root / "images"}"\nnum_repeats = 1\n'
    )
    train(root, tiny_sdxl_files["single"], "validated", "--log_with", "tensorboard",
          "--logging_dir", str(root / "logs"), "--log_prefix", "run-", "--log_tracker_name", "tracker",
          "--log_config", "--validate_every_n_steps", "3")
    return root


@pytest.fixture(scope="module")
def logged_run(training_root):
    return training_root / "logs"


def test_event_files_are_laid_out_as_accelerate_does(logged_run):
    (run,) = list(logged_run.iterdir())
    assert run.name.startswith("run-") and len(run.name) == len("run-") + 14 and run.name[4:].isdigit()
    tracker = run / "tracker"
    assert len(list(tracker.glob("events.out.tfevents.*"))) == 1
    assert (tracker / "scalars.jsonl").exists()


def test_scalars_have_sd_scripts_names_steps_and_the_jsonl_values(logged_run):
    tracker = next(logged_run.iterdir()) / "tracker"
    scalars = read_event_file(next(tracker.glob("events.out.tfevents.*")))
    records = [json.loads(line) for line in (tracker / "scalars.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/current" in r]
    epochs = [r for r in records if "loss/epoch_average" in r]

    validation_tags = {f"loss/validation/{kind}_{what}" for kind in ("step", "epoch")
                       for what in ("average", "divergence")}
    assert set(scalars) == {"loss/current", "loss/average", "lr/unet", "loss/epoch_average"} | validation_tags
    assert [step for step, _ in scalars["loss/current"]] == [1, 2, 3, 4, 5, 6]
    # epoch scalars are logged at the epoch number; the step limit ends epoch 2 early, and it is logged too
    assert [step for step, _ in scalars["loss/epoch_average"]] == [1, 2]
    assert [step for step, _ in scalars["loss/validation/step_average"]] == [3, 6]
    assert [step for step, _ in scalars["loss/validation/epoch_average"]] == [1, 2]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 4), (2, 6)]

    current = np.array([r["loss/current"] for r in steps])
    np.testing.assert_allclose([v for _, v in scalars["loss/current"]], current, rtol=1e-6)  # event files are fp32
    # sd-scripts' average: the latest loss at each of the epoch's 4 batch positions
    window = [current[:1], current[:2], current[:3], current[:4], current[[4, 1, 2, 3]], current[[4, 5, 2, 3]]]
    np.testing.assert_allclose([r["loss/average"] for r in steps], [w.mean() for w in window], rtol=1e-12)
    np.testing.assert_allclose([r["loss/epoch_average"] for r in epochs], [window[3].mean(), window[5].mean()])
    # linear decay from 1e-3 over 6 steps, as get_last_lr() reports after each step
    np.testing.assert_allclose([v for _, v in scalars["lr/unet"]], [1e-3 * (6 - k) / 6 for k in range(1, 7)],
                               rtol=1e-6)
    step_validation = [r for r in records if "loss/validation/step_average" in r]
    for record, average in zip(step_validation, [window[2].mean(), window[5].mean()]):
        assert record["loss/validation/step_divergence"] == pytest.approx(
            record["loss/validation/step_average"] - average, rel=1e-9)
    # the LoRA of step 6 is validated twice (after the step and at the end of epoch 2): same noise, same loss
    final_epoch = next(r for r in records if r.get("epoch") == 2 and "loss/validation/epoch_average" in r)
    assert final_epoch["loss/validation/epoch_average"] == pytest.approx(
        step_validation[1]["loss/validation/step_average"], rel=1e-6)
    config = next(r["config"] for r in records if "config" in r)
    assert config["max_train_steps"] == 6 and "pretrained_model_name_or_path" not in config


def test_validation_leaves_training_exactly_as_without_it(training_root, tiny_sdxl_files):
    # the same held-out split, validation never due: the LoRA must be bit-identical
    train(training_root, tiny_sdxl_files["single"], "unvalidated", "--validate_every_n_epochs", "100")
    with open_safetensors(training_root / "validated" / "lora.safetensors") as validated, \
            open_safetensors(training_root / "unvalidated" / "lora.safetensors") as unvalidated:
        assert validated.metadata["ss_num_validation_images"] == "2"
        for key in unvalidated.keys():
            np.testing.assert_array_equal(validated.read(key), unvalidated.read(key), err_msg=key)


def test_loss_recorder_keeps_one_loss_per_batch_position():
    recorder = LossRecorder()
    for position, loss in [(0, 1.0), (1, 3.0), (2, 5.0), (0, 7.0)]:
        recorder.add(position, loss)
    assert recorder.moving_average == (7.0 + 3.0 + 5.0) / 3


def test_log_with_tensorboard_without_logging_dir_is_one_line(tiny_sdxl_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(SdxlNetworkTrainer, ["--pretrained_model_name_or_path", tiny_sdxl_files["single"],
                                        "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path),
                                        "--log_with", "tensorboard"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log_with tensorboard needs --logging_dir" in err[0]


@pytest.mark.parametrize("value", ["wandb", "all"])
def test_wandb_is_refused_by_name(tiny_sdxl_files, tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        train_main(SdxlNetworkTrainer, ["--pretrained_model_name_or_path", tiny_sdxl_files["single"],
                                        "--output_dir", str(tmp_path), "--log_with", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--log_with {value} is not supported" in err[0] and "wandb" in err[0]
