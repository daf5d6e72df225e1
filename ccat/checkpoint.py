"""Checkpoints: atomic writes, RNG state capture, the data fingerprint check."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccat import fileio
from ccat.data import spec
from ccat.data.reader import BuiltDataset
from ccat.errors import CcatError


def rng_state() -> dict[str, Any]:
    """Every generator's state in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` atomically (:func:`ccat.fileio.atomic_writer`): readers never
    see half, and a failed write leaves the file there before as it was. ``torch.save``
    serializes into memory first: writing into a file itself, it reports a full disk as a
    RuntimeError about stream positions, while this way the write raises the OSError
    (ENOSPC, EROFS, ...) that the caller words."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with fileio.atomic_writer(path) as out:
        out.write(buffer.getbuffer())


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CcatError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when loaded
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise CcatError(f"{path} is not a readable ccat checkpoint ({err})") from None


def check_fingerprint(ckpt: dict[str, Any], dataset: BuiltDataset, what: str) -> None:
    """Refuse data whose fingerprint differs from the checkpoint's, naming the parameters."""
    if ckpt["fingerprint"] == dataset.fingerprint:
        return
    diff = spec.diff_fingerprint_params(ckpt["fingerprint_params"],
                                        spec.fingerprint_params(dataset.manifest))
    raise CcatError(f"{what} was trained on data with fingerprint {ckpt['fingerprint'][:12]}, "
                    f"but {dataset.root} has {dataset.fingerprint[:12]}; differing parameters: "
                    f"{'; '.join(diff) or 'none recorded'}. Use the shards it was trained on.")
