"""Check full-size SDXL LoRA files against sd-scripts' own: every tensor name, shape and dtype.

Builds SDXL base's UNet (zero weights) and both text encoders from configs/sdxl_base (about 14 GB of
RAM), saves the default rank-8 / alpha-4 network in fp16 unet-only and with both text encoders, and
compares each file with the key lists of files torch sd-scripts wrote (tests/reference/*.tsv).

    python benchmarks/full_size_lora_keys.py
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.layers import weight_init  # noqa: E402
from library.model_configs import sdxl_base_configs  # noqa: E402
from library.safetensors_io import open_safetensors  # noqa: E402
from library.sdxl_unet import SDXLUNet  # noqa: E402
from library.text_encoders import build_text_encoder  # noqa: E402
from networks.lora import create_network  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference")


def reference_keys(file_name):
    with open(os.path.join(REFERENCE, file_name), encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle.readlines()[1:]]
    return {key: (tuple(json.loads(shape)), dtype) for key, shape, dtype in rows}


def saved_keys(path):
    with open_safetensors(path) as reader:
        return {key: (reader.shape(key), reader.dtype(key)) for key in reader.keys()}


def compare(label, saved, reference):
    missing = sorted(set(reference) - set(saved))
    extra = sorted(set(saved) - set(reference))
    different = sorted(key for key in set(saved) & set(reference) if saved[key] != reference[key])
    ok = not (missing or extra or different)
    print(f"{label}: {len(saved)} tensors saved, {len(reference)} in sd-scripts' file: "
          + ("names, shapes and dtypes identical" if ok else
             f"{len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}, "
             f"{len(different)} differ {[(k, saved[k], reference[k]) for k in different[:3]]}"))
    return ok


def main():
    started = time.time()
    unet_config, _, te1_config, te2_config = sdxl_base_configs()
    with weight_init(skip=True):
        unet = SDXLUNet(unet_config)
    text_encoders = [build_text_encoder(te1_config, False), build_text_encoder(te2_config, True)]
    print(f"built full-size UNet and text encoders in {time.time() - started:.0f} s")

    np.random.seed(0)
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        network = create_network(1.0, 8, 4, None, text_encoders, unet)
        both = os.path.join(folder, "unet_te.safetensors")
        network.save_weights(both, np.float16, network.metadata())
        ok &= compare("UNet + text encoders", saved_keys(both), reference_keys("sdxl-lora-rank8-unet-te-keys.tsv"))

        network.apply_to(text_encoders, unet, apply_text_encoder=False)
        unet_only = os.path.join(folder, "unet.safetensors")
        network.save_weights(unet_only, np.float16, network.metadata())
        ok &= compare("UNet only", saved_keys(unet_only), reference_keys("sdxl-lora-rank8-unet-only-keys.tsv"))
    print(f"done in {time.time() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
