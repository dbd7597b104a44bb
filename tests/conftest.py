import os

# Tests must never reach a model hub; set before transformers/mindone are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_v", "3")

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl_files(tmp_path_factory):
    """The tiny SDXL written by the project's own tool, as a single file and as a diffusers folder."""
    from tools.make_tiny_sdxl import make_tiny_sdxl
    from library.model_loading import save_diffusers_folder, save_single_file

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    models = make_tiny_sdxl(seed=0)
    single, diffusers = folder / "tiny.safetensors", folder / "tiny_diffusers"
    save_single_file(models, str(single))
    save_diffusers_folder(models, str(diffusers))
    return {"single": str(single), "diffusers": str(diffusers)}
