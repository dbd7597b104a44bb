"""The training log: sd-scripts' TensorBoard scalars, and the same scalars as JSON lines.

sd-scripts logs through accelerate, whose TensorBoard tracker writes its event files to
`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name>/`; the run folder here is the same, and
`scalars.jsonl` beside the event files holds every logged value as one JSON object per call.

- `check_logging_args(args)`: one-line UserError for --log_with tensorboard without --logging_dir.
- `TrainingLog.from_args(args)`: the log --logging_dir asks for (None without one).
- `log_step(global_step, values)`: step scalars (tensorboard step = global step).
- `log_epoch(epoch, global_step, values)`: epoch scalars (tensorboard step = epoch, as sd-scripts).
- `LossRecorder`: sd-scripts' moving average of the loss over the last epoch's batches.
"""

import json
import os
import time
from typing import Dict, List, Optional

from library.errors import UserError

DEFAULT_TRACKER_NAME = "network_train"

# never written to a log: secrets, and paths that may name private folders (sd-scripts leaves out the same)
_CONFIG_LEFT_OUT = (
    "wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
    "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir",
)


class LossRecorder:
    """The average of the latest loss at each batch position of an epoch, as sd-scripts' LossRecorder:
    during the first epoch the mean of all losses so far, afterwards a window one epoch long."""

    def __init__(self):
        self.losses: List[float] = []

    def add(self, batch_in_epoch: int, loss: float) -> None:
        if batch_in_epoch < len(self.losses):
            self.losses[batch_in_epoch] = loss
        else:
            self.losses.extend([loss] * (batch_in_epoch + 1 - len(self.losses)))

    @property
    def moving_average(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else 0.0


class TrainingLog:
    def __init__(self, run_dir: str, tracker_name: str = DEFAULT_TRACKER_NAME, config: Optional[dict] = None):
        from tensorboardX import SummaryWriter

        self.directory = os.path.join(run_dir, tracker_name)
        os.makedirs(self.directory, exist_ok=True)
        self.writer = SummaryWriter(self.directory)
        self.jsonl = open(os.path.join(self.directory, "scalars.jsonl"), "a", encoding="utf-8")
        if config is not None:
            self.writer.add_hparams(config, metric_dict={})
            self._write_json({"config": config})

    @classmethod
    def from_args(cls, args) -> Optional["TrainingLog"]:
        check_logging_args(args)
        if not args.logging_dir:
            return None
        run_name = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
        config = loggable_config(args) if args.log_config else None
        return cls(os.path.join(args.logging_dir, run_name), args.log_tracker_name or DEFAULT_TRACKER_NAME, config)

    def log_step(self, global_step: int, values: Dict[str, float]) -> None:
        self._write(global_step, values, {"step": global_step})

    def log_epoch(self, epoch: int, global_step: int, values: Dict[str, float]) -> None:
        self._write(epoch, values, {"step": global_step, "epoch": epoch})

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()

    def _write(self, tensorboard_step, values, position):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, tensorboard_step)
        self.writer.flush()
        self._write_json({**position, **values})

    def _write_json(self, record):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()


def check_logging_args(args) -> None:
    """As sd-scripts: --logging_dir alone turns TensorBoard on, and --log_with tensorboard needs the folder."""
    if args.log_with == "tensorboard" and not args.logging_dir:
        raise UserError("--log_with tensorboard needs --logging_dir (the folder for the event files)")


def loggable_config(args) -> dict:
    """--log_config: the plain-valued arguments (None, bool, str, int, float) without secrets and paths."""
    return {
        key: value
        for key, value in vars(args).items()
        if key not in _CONFIG_LEFT_OUT and (value is None or isinstance(value, (bool, str, int, float)))
    }


def step_scalars(current_loss: float, average_loss: float, lrs, lr_descriptions, prodigy_d=None) -> dict:
    """sd-scripts' step scalars: loss/current, loss/average, and lr/<group description> per parameter group
    (lr/textencoder, lr/unet, ...), with lr/d*lr/<description> for Prodigy."""
    values = {"loss/current": current_loss, "loss/average": average_loss}
    for description, lr in zip(lr_descriptions, lrs):
        values[f"lr/{description}"] = float(lr)
        if prodigy_d is not None:
            values[f"lr/d*lr/{description}"] = prodigy_d * float(lr)
    return values
