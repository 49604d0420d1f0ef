"""Whether the Hugging Face hub can be reached: asked once per process, with a short timeout.

Without a network the hub libraries retry each request with back-off (about 25 s and a
"Retrying in 8s" line per try before they give up). Before the first hub request the stages ask
``hub_or_offline()``: one TCP connection to the hub's host (``HF_ENDPOINT``), name resolution
included, within ``LST_HUB_TIMEOUT`` seconds (default 3). When that fails the libraries are
switched to offline mode (``HF_HUB_OFFLINE``), so what is in their local caches still loads and
everything else fails at once, and the caller says what to pass instead.

With ``HF_HUB_OFFLINE`` already set, or behind a proxy (``HTTPS_PROXY``, ``ALL_PROXY``: the
direct connection says nothing then), nothing is probed. No torch here: the CLI's data checks
import this module.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from functools import cache
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def probe_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get("LST_HUB_TIMEOUT", "3")))
    except ValueError:
        return 3.0


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


@cache
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (``host:port: reason``), or None when it answered or was not asked."""
    if offline_mode() or any(os.environ.get(v) for v in _PROXIES):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    timeout = probe_timeout()
    result: dict[str, str] = {}

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = "yes"
        except OSError as e:
            result["error"] = e.strerror or str(e) or type(e).__name__

    thread = threading.Thread(target=probe, name="lst-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if "ok" in result:
        return None
    return f"{host}:{port}: {result.get('error', f'no answer in {timeout:g} s')}"


def go_offline() -> None:
    """Switch huggingface_hub, transformers and datasets to their local caches alone."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        m = sys.modules.get(module)
        if m is not None and hasattr(m, attr):
            setattr(m, attr, True)


def hub_or_offline() -> str | None:
    """Before a hub request: None when the hub is reachable (or offline mode was chosen), else
    why not, with the libraries switched to offline mode."""
    why = hub_unreachable()
    if why is not None:
        go_offline()
    return why
