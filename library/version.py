"""The one place this project's name and version are defined (written into model metadata)."""

PROJECT_NAME = "sdxl-lora-mindspore"
__version__ = "0.1.0"
