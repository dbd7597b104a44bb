"""Run by tests/test_data_parallel.py under msrun: train through the real trainer, then write this rank's
LoRA (rank 0 also writes the run's own files) so the test can compare the ranks."""

import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from library import train_args  # noqa: E402
from sdxl_train_network import SdxlNetworkTrainer  # noqa: E402

if __name__ == "__main__":
    args = train_args.parse_args(sys.argv[1:])
    trainer = SdxlNetworkTrainer()
    trainer.train(args)
    trainer.network.save_weights(os.path.join(args.output_dir, f"rank{trainer.world.rank}.safetensors"),
                                 np.float32, {})
