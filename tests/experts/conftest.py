"""Fixtures of the expert tests: a Hub-compatible server on 127.0.0.1 and the client pointed at it.

`HF_ENDPOINT` is set here, at import time, for the case where huggingface_hub is not imported yet; every call
of the tests also passes the endpoint explicitly (the library functions take `endpoint=`), and the plain-peft
check runs in a subprocess with `HF_ENDPOINT` and `HF_HUB_OFFLINE=0`, so the tests hold whatever was imported
first.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"

import pytest  # noqa: E402
from hub_server import HubServer  # noqa: E402


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh Hub server (files under tmp) with the client online and its cache in tmp."""
    import huggingface_hub.constants as constants

    try:
        server = HubServer(tmp_path / "hub", port=HUB_PORT).start()
    except OSError:  # the port was taken meanwhile: any port works, the endpoint is passed explicitly
        server = HubServer(tmp_path / "hub").start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    yield server
    server.stop()
