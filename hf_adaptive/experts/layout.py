"""Names of the files and folders of a saved expert library (shared by `library` and `hub`)."""

from __future__ import annotations

LIBRARY_FILE = "library.json"
EXPERTS_DIR = "experts"
ROUTER_DIR = "router"
LIBRARY_FORMAT_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
