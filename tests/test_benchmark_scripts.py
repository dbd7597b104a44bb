"""The benchmark scripts that drive the trainer's and the inference script's own code still run (no timing
is asserted: figures are read from their output only to check that each phase produced one)."""

import re

from benchmarks import caching_and_inference


def test_caching_and_inference_runs_on_the_tiny_sdxl(capsys):
    caching_and_inference.main(["--resolution", "64", "--steps", "2", "--generate", "2"])
    out = capsys.readouterr().out
    figures = {name: float(value) for name, value in re.findall(
        r"^\s*(load|caching latents|caching text-encoder outputs|inference)[^:]*: ([0-9]+\.[0-9]+)", out, re.M)}
    assert set(figures) == {"load", "caching latents", "caching text-encoder outputs", "inference"}, out
    assert all(value > 0 for value in figures.values()), out
