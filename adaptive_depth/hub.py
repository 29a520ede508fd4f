"""Hugging Face Hub ids, fetched within a bounded time.

``huggingface_hub`` leaves some requests without a timeout (``repo_info`` in ``snapshot_download``)
and retries the others with backoff, so behind a network that accepts connections and never
answers, resolving a Hub id can block for many minutes. :func:`fetch_within_deadline` runs the
fetch in a worker thread and gives up after :func:`hub_timeout_s` seconds (environment variable
``ADAPTIVE_DEPTH_HUB_TIMEOUT``, default 300: enough to download a BERT-base model over a slow
link) with one line that says how to work offline. A fetch that gave up keeps running in its
(daemon) thread until the network answers or the process exits; nothing waits for it.

Example:
    >>> looks_like_hub_id("org/model"), looks_like_hub_id("./runs/model"), looks_like_hub_id("a/b/c")
    (True, False, False)
    >>> fetch_within_deadline(lambda: 42, "a quick fetch", timeout_s=5.0)
    42
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["DEFAULT_HUB_TIMEOUT_S", "HUB_TIMEOUT_ENV", "OFFLINE_HINT", "HubTimeoutError", "download_snapshot",
           "fetch_within_deadline", "hub_timeout_s", "looks_like_hub_id"]

HUB_TIMEOUT_ENV = "ADAPTIVE_DEPTH_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT_S = 300.0
OFFLINE_HINT = "to work offline set HF_HUB_OFFLINE=1 (models already in the local cache) or pass a local folder"

T = TypeVar("T")


class HubTimeoutError(TimeoutError):
    """Fetching from the Hugging Face Hub did not finish within :func:`hub_timeout_s` seconds."""


def hub_timeout_s() -> float:
    """The longest a Hub id may take to resolve, in seconds: ``$ADAPTIVE_DEPTH_HUB_TIMEOUT``, else 300.

    Raises:
        ValueError: the variable is not a positive finite number.
    """
    text = os.environ.get(HUB_TIMEOUT_ENV)
    if text is None or not text.strip():
        return DEFAULT_HUB_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{HUB_TIMEOUT_ENV}={text!r} must be a positive number of seconds.")
    return value


def looks_like_hub_id(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` can be a Hub id (``"model"`` or ``"org/model"``) rather than a local path:
    at most one ``/``, not starting with ``.``, ``/`` or ``~``, and no such path exists."""
    text = os.fspath(name)
    return (bool(text) and text.count("/") <= 1 and "\\" not in text and not text.startswith((".", "/", "~"))
            and not Path(text).exists())


def fetch_within_deadline(fetch: Callable[[], T], what: str, timeout_s: float | None = None) -> T:
    """``fetch()``, run in a daemon thread and abandoned after ``timeout_s`` seconds.

    Args:
        fetch: the network call (its exceptions are re-raised here).
        what: what is being fetched, for the message (``"'org/x' from the Hugging Face Hub"``).
        timeout_s: the bound; default :func:`hub_timeout_s`.

    Raises:
        HubTimeoutError: ``fetch`` did not return in time (the message says how to work offline).
    """
    limit = hub_timeout_s() if timeout_s is None else timeout_s
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fetch()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"hub fetch: {what}", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise HubTimeoutError(
            f"fetching {what} ({endpoint}) did not finish within {limit:g} s (the network does not answer); "
            f"{OFFLINE_HINT}; for a slow but working download raise {HUB_TIMEOUT_ENV}"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def download_snapshot(repo_id: str, revision: str | None = None, timeout_s: float | None = None) -> Path:
    """A local copy of Hub repository ``repo_id`` (``huggingface_hub.snapshot_download``, the local
    cache when ``HF_HUB_OFFLINE=1``), within :func:`fetch_within_deadline`'s bound.

    Raises:
        HubTimeoutError: the Hub did not answer in time.
        Exception: whatever ``snapshot_download`` raised (unknown repository, offline and not cached...).
    """
    from huggingface_hub import snapshot_download

    return Path(fetch_within_deadline(lambda: snapshot_download(repo_id=repo_id, revision=revision),
                                      f"{repo_id!r} from the Hugging Face Hub", timeout_s))
