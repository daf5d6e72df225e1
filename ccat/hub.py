"""Pretrained files from a local folder or the Hugging Face hub, failing at once offline.

transformers retries an unreachable hub for about a minute before it gives up; a machine
without network should hear that in seconds, in one sentence. Both the tokenizer of
``ccat-data build`` and the BERT of ``ccat train`` load through :func:`load_local_first`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

HUB_PROBE_TIMEOUT_S = 5.0  # the one request that tells whether the hub answers at all


def load_local_first(load: Callable[..., T], name: str, fail: Callable[[str], Exception]) -> T:
    """``load(name, local_files_only=True)``: a folder, or a hub name already cached; else
    (a hub name only) one request asks whether the hub answers, then ``load(name)``.
    Every failure raises ``fail(why)``, ``why`` being one clause."""
    try:
        return load(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if Path(name).is_dir():
            raise fail(_first_line(err)) from None
        if offline():
            raise fail("it is not cached here and HF_HUB_OFFLINE is set") from None
    check_hub_reachable(fail)
    try:
        return load(name)
    except (OSError, ValueError) as err:
        raise fail(_first_line(err)) from None


def check_hub_reachable(fail: Callable[[str], Exception]) -> None:
    """One request to the hub's address, no retries: ``fail(why)`` when nothing answers."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.TransportError as err:
        raise fail(f"it is not cached here and {constants.ENDPOINT} does not answer: "
                   f"{err}") from None


def offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids the network."""
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
