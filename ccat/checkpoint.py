"""Checkpoints: atomic writes, RNG state capture, the data fingerprint check."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccat import fileio
from ccat.config import ConfigError, from_dict
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


# What the readers of a checkpoint index, with the type each expects: every reader
# (eval, probe, export, analyze) needs EVAL_KEYS, --resume RESUME_KEYS. OPTIONAL keys are
# absent from older checkpoints and read with a default, but must have this type when there.
EVAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "config": dict, "fingerprint": str, "fingerprint_params": dict,
    "stage": str, "stage_index": int, "epoch": int}
RESUME_KEYS = {**EVAL_KEYS, "optimizer": dict, "scheduler": dict, "rng": dict,
               "best": (int, float)}
OPTIONAL_KEYS = {"method_state": dict, "data": dict, "selection": dict, "code": list,
                 "best_epoch": int, "step": int}
CHECKPOINT_FIX = "pass a best.pt or last.pt as `ccat train` wrote it"
MISMATCH_DETAIL = 200  # characters of torch's first mismatch kept in the sentence


def load(path: str | Path,
         keys: dict[str, type | tuple[type, ...]] = EVAL_KEYS) -> dict[str, Any]:
    """The checkpoint at ``path``, refused in one sentence naming it unless it is a dict
    holding ``keys`` (and the optional keys) with their types, weights as tensors, and a
    config this version of ccat reads."""
    path = Path(path)
    if not path.is_file():
        raise CcatError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when loaded
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise CcatError(f"{path} is not a readable ccat checkpoint ({_unreadable(path, err)}); "
                        f"{CHECKPOINT_FIX}") from None
    if not isinstance(ckpt, dict):
        raise CcatError(f"{path} holds a {type(ckpt).__name__}, not a ccat checkpoint (a "
                        f"dict of weights, config and data fingerprint); {CHECKPOINT_FIX}")
    _check_keys(ckpt, keys, path)
    try:
        from_dict(ckpt["config"])
    except ConfigError as err:  # still a ConfigError: the config is what is wrong
        raise ConfigError(f"the config saved in {path} cannot be read ({err}); "
                          f"{CHECKPOINT_FIX}") from None
    return ckpt


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch.load refused ``path``, in a few words: torch's own text runs to many lines
    and suggests ``weights_only=False``, which would let a foreign file run code."""
    if path.stat().st_size == 0:
        return "it is empty"
    if isinstance(err, pickle.UnpicklingError):
        return ("it is not a torch file, or holds objects other than tensors and plain data, "
                "which ccat never unpickles")
    first = next((line.strip() for line in str(err).splitlines() if line.strip()),
                 type(err).__name__)
    return first if len(first) <= MISMATCH_DETAIL else f"{first[:MISMATCH_DETAIL]}..."


def _check_keys(ckpt: dict[str, Any], keys: dict[str, type | tuple[type, ...]],
                path: Path) -> None:
    """Refuse a checkpoint without ``keys``, or with a key of the wrong type."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise CcatError(f"{path} is not a complete ccat checkpoint: it has no "
                        f"{', '.join(missing)}; {CHECKPOINT_FIX}")
    wrong = [f"{key} is a {type(ckpt[key]).__name__}"
             for key, kind in {**OPTIONAL_KEYS, **keys}.items()
             if key in ckpt and not isinstance(ckpt[key], kind)]
    if not wrong and not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        wrong = ["model holds values that are not tensors"]
    if wrong:
        raise CcatError(f"{path} is not a ccat checkpoint as `ccat train` writes it "
                        f"({'; '.join(wrong)}); {CHECKPOINT_FIX}")


def load_state(target: Any, state: dict[str, Any], path: Path, what: str) -> None:
    """``target.load_state_dict(state)`` (a model, optimizer, scheduler or method), with a
    mismatch between the saved state and the object its config builds said in one sentence:
    the checkpoint or the config saved in it was changed after training."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__)
        detail = detail.rstrip(".") if len(detail) <= MISMATCH_DETAIL else \
            f"{detail[:MISMATCH_DETAIL]}..."
        more = f"; {len(lines) - 2} more like it" if len(lines) > 2 else ""
        raise CcatError(f"the {what} saved in {path} does not fit the one its saved config "
                        f"builds ({detail}{more}): the checkpoint or its config was changed "
                        f"after training; {CHECKPOINT_FIX}") from None


def check_fingerprint(ckpt: dict[str, Any], dataset: BuiltDataset, what: str) -> None:
    """Refuse data whose fingerprint differs from the checkpoint's, naming the parameters."""
    if ckpt["fingerprint"] == dataset.fingerprint:
        return
    diff = spec.diff_fingerprint_params(ckpt["fingerprint_params"],
                                        spec.fingerprint_params(dataset.manifest))
    raise CcatError(f"{what} was trained on data with fingerprint {ckpt['fingerprint'][:12]}, "
                    f"but {dataset.root} has {dataset.fingerprint[:12]}; differing parameters: "
                    f"{'; '.join(diff) or 'none recorded'}. Use the shards it was trained on.")
