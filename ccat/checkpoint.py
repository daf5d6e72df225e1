"""Checkpoints: the one typed record of what ``ccat train`` saves, how it is read back
(versioned, checked), and :func:`open_checkpoint`, which every reader uses to open its data,
device, method and model: ``ccat eval`` (and ``--probe``), ``ccat probe``, ``ccat export``,
``ccat analyze --tsne``. ``--resume`` reads the same record and restores it with
:meth:`Checkpoint.restore`.

On disk a checkpoint is a torch file of plain data (:meth:`Checkpoint.to_dict`), read with
``weights_only=True`` so that a file from elsewhere cannot run code. Its ``version`` says
which layout it has: version 0 is the unversioned dict every checkpoint held before the
field existed, with the same keys, and is read as it always was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ccat import distributed, fileio, provenance
from ccat.config import ConfigError, RunConfig, from_dict
from ccat.data import spec
from ccat.data.reader import BuiltDataset, open_dataset
from ccat.data.spec import MANIFEST_NAME
from ccat.errors import CcatError, UserError
from ccat.methods import METHODS, Method
from ccat.models import MultimodalModel
from ccat.predict import Predictions, predict

VERSION = 1  # the layout `ccat train` writes; change it (and READ_VERSIONS) with the layout
READ_VERSIONS = (0, 1)  # 0: the unversioned dict written before `version` was recorded

# What the readers of a checkpoint index, with the type each expects: every reader
# (eval, probe, export, analyze) needs EVAL_KEYS, --resume RESUME_KEYS. OPTIONAL keys are
# absent from older checkpoints and read with a default, but must have this type when there.
EVAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "config": dict, "fingerprint": str, "fingerprint_params": dict,
    "stage": str, "stage_index": int, "epoch": int}
RESUME_KEYS = {**EVAL_KEYS, "optimizer": dict, "scheduler": dict, "rng": dict,
               "best": (int, float)}
OPTIONAL_KEYS = {"method_state": dict, "data": dict, "selection": dict, "code": list,
                 "best_epoch": int, "step": int, "metrics": dict, "world": int}
CHECKPOINT_FIX = "pass a best.pt or last.pt as `ccat train` wrote it"
MISMATCH_DETAIL = 200  # characters of torch's first mismatch kept in the sentence
DEVICE_FIX = "pass --device cpu to run it on the CPU"  # how eval, probe, export, analyze say it
UNRECORDED_SELECTION = {"split": None, "rule": "unrecorded (an older checkpoint)"}


@dataclass
class Checkpoint:
    """One checkpoint as ``ccat train`` writes it (``last.pt``, ``best.pt``). The fields a
    reader may find absent (checkpoints written before they were recorded) have the default
    every reader used for them."""

    model: dict[str, torch.Tensor]  # the model's state_dict in the stage it was saved in
    config: dict[str, Any]  # the resolved RunConfig, as config.to_dict writes it
    fingerprint: str  # of the data it was trained on
    fingerprint_params: dict[str, Any]  # what made that fingerprint (named when they differ)
    stage: str  # the stage's name, and its place among the method's stages
    stage_index: int
    epoch: int  # epochs done in that stage
    optimizer: dict[str, Any] | None = None  # --resume's: None only for an eval-only record
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None  # :func:`rng_state`
    best: float | None = None  # the selection score so far, and the epoch it was reached
    best_epoch: int | None = None
    method_state: dict[str, Any] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)  # train.data_location: given, absolute
    selection: dict[str, Any] | None = None  # how best.pt is chosen (Run.selection)
    metrics: dict[str, Any] = field(default_factory=dict)  # the epoch's evaluation
    code: list[str] = field(default_factory=lambda: [provenance.UNRECORDED])
    step: int = 0  # training batches so far, over all stages
    world: int | None = None  # processes that trained it (None: not recorded then)
    version: int = VERSION

    @functools.cached_property
    def cfg(self) -> RunConfig:
        """The saved config, as a RunConfig (checked readable by :func:`load`)."""
        return from_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        """What the file holds: every field by name, plain data and tensors only."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def save(self, path: Path) -> None:
        save_atomic(self.to_dict(), path)

    def selection_block(self) -> dict[str, Any]:
        """How the run chose this checkpoint (split or last epoch) and where it is in the
        run, as the eval and probe JSON record it."""
        return {**(self.selection or UNRECORDED_SELECTION), "stage": self.stage,
                "epoch": self.epoch}

    def data_path(self) -> str:
        """Where the run found its data: the absolute path it recorded, else the path as
        given (relative to where this runs), else a CcatError saying to pass --data."""
        given = self.cfg.data.path
        location = {"given": given, "absolute": given, **self.data}
        candidates = list(dict.fromkeys(str(location[k]) for k in ("absolute", "given")))
        for path in candidates:
            if "://" in path or (Path(path) / MANIFEST_NAME).is_file():
                return path
        raise CcatError(f"the run's data is neither at {location['absolute']} nor at "
                        f"{location['given']!r} from {Path.cwd()}; pass --data DIR (the shards "
                        f"it was trained on)")

    def check_fingerprint(self, dataset: BuiltDataset, what: str) -> None:
        """Refuse data whose fingerprint differs from the checkpoint's, naming the
        parameters."""
        if self.fingerprint == dataset.fingerprint:
            return
        diff = spec.diff_fingerprint_params(self.fingerprint_params,
                                            spec.fingerprint_params(dataset.manifest))
        raise CcatError(f"{what} was trained on data with fingerprint {self.fingerprint[:12]}, "
                        f"but {dataset.root} has {dataset.fingerprint[:12]}; differing "
                        f"parameters: {'; '.join(diff) or 'none recorded'}. Use the shards it "
                        f"was trained on.")

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, method: Method,
                path: Path) -> None:
        """``--resume``: put the weights, the optimizer and schedule, every generator and
        the method's state back as they were when this was saved (``path``: where it was
        read, named in a mismatch). The order is that of training's own restore."""
        load_state(model, self.model, path, "model")
        opt.load_state_dict(self.optimizer)
        sched.load_state_dict(self.scheduler)
        set_rng_state(self.rng)
        method.load_state_dict(self.method_state)


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


def load(path: str | Path,
         keys: dict[str, type | tuple[type, ...]] = EVAL_KEYS) -> Checkpoint:
    """The checkpoint at ``path``, refused in one sentence naming it unless it is a dict of
    a version this ccat reads, holding ``keys`` (and the optional keys) with their types,
    weights as tensors, and a config this version of ccat reads."""
    path = Path(path)
    if not path.is_file():
        raise CcatError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when loaded
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise CcatError(f"{path} is not a readable ccat checkpoint ({_unreadable(path, err)}); "
                        f"{CHECKPOINT_FIX}") from None
    if not isinstance(raw, dict):
        raise CcatError(f"{path} holds a {type(raw).__name__}, not a ccat checkpoint (a "
                        f"dict of weights, config and data fingerprint); {CHECKPOINT_FIX}")
    _check_version(raw, path)
    _check_keys(raw, keys, path)
    try:
        from_dict(raw["config"])
    except ConfigError as err:  # still a ConfigError: the config is what is wrong
        raise ConfigError(f"the config saved in {path} cannot be read ({err}); "
                          f"{CHECKPOINT_FIX}") from None
    names = {f.name for f in dataclasses.fields(Checkpoint)}
    return Checkpoint(**{**{k: v for k, v in raw.items() if k in names},
                         "version": raw.get("version", 0)})


def _check_version(raw: dict[str, Any], path: Path) -> None:
    """Refuse a layout this ccat does not read, naming its version."""
    version = raw.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or \
            version not in READ_VERSIONS:
        raise CcatError(f"{path} is a checkpoint of format version {version!r}, but this ccat "
                        f"reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}; read it "
                        f"with the ccat that wrote it (its `code` entry) or retrain it")


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


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for reading: its data (fingerprint-checked), the device, and its
    method and model in the stage it was saved in, with the method's state. What it predicts
    is kept per split, so each split is predicted once however many readers ask."""

    path: Path
    ckpt: Checkpoint
    dataset: BuiltDataset
    ctx: distributed.Context  # the process group's: under torchrun, this rank's share
    method: Method
    model: MultimodalModel
    predicted: dict[tuple[str, int], Predictions] = field(default_factory=dict, repr=False)

    @property
    def cfg(self) -> RunConfig:
        return self.ckpt.cfg

    def predict(self, split: str, whole: bool = False, progress: bool = False) -> Predictions:
        """:func:`ccat.predict.predict` of ``split`` over the process group (``whole``: by
        this process alone, all of it, as export, the probe and the t-SNE read it; the same
        thing when one process runs), once: a second call returns the first's."""
        ctx = distributed.Context(0, 1, self.ctx.device) if whole else self.ctx
        if (split, ctx.world) not in self.predicted:
            check_split(self.dataset, split)
            self.predicted[split, ctx.world] = predict(self.method, self.model, self.dataset,
                                                       split, ctx, self.cfg, progress=progress)
        return self.predicted[split, ctx.world]


@contextlib.contextmanager
def open_checkpoint(path: str | Path, data: str | None = None, device: str | None = None,
                    splits: tuple[str, ...] = ()) -> Iterator[OpenCheckpoint]:
    """Load the checkpoint at ``path`` once and open what reading it needs: its data (or
    ``data``), fingerprint-checked and holding ``splits``; the device (``device``, default
    the run's; the process group under torchrun, left at the end); its method and model."""
    ckpt = load(path)
    dataset = open_dataset(data or ckpt.data_path(), ckpt.cfg.data.cache_dir or None)
    ckpt.check_fingerprint(dataset, str(path))
    for split in splits:
        check_split(dataset, split)
    ctx = distributed.setup(device or ckpt.cfg.device, DEVICE_FIX)
    try:
        if ctx.device.type == "cpu":
            distributed.configure_cpu(ckpt.cfg.deterministic, ckpt.cfg.threads)
        method, model = build(ckpt, dataset, ctx.device, Path(path))
        yield OpenCheckpoint(Path(path), ckpt, dataset, ctx, method, model)
    finally:
        distributed.cleanup()


def check_split(dataset: BuiltDataset, split: str) -> None:
    if split not in dataset.splits:
        raise CcatError(f"{dataset.root} has no split {split!r}; choose one of {dataset.splits}")


def build(ckpt: Checkpoint, dataset: BuiltDataset, device: torch.device,
          path: Path) -> tuple[Method, MultimodalModel]:
    """Rebuild the checkpoint's method and model (``path``: where it was read from), in the
    stage it was saved in, with the method's state (what its predict may read: ensemble
    weights, prototypes); a config that no longer builds them is one sentence naming it."""
    cfg = ckpt.cfg
    try:
        method = METHODS.get(cfg.method.name)(cfg.method, cfg.optim.epochs)
        model = method.build_model(dataset.modalities, len(dataset.classes), cfg.model)
        stages = method.stages()
    except UserError as err:
        raise CcatError(f"the config saved in {path} does not build a model here ({err}); "
                        f"{CHECKPOINT_FIX}") from None
    if not 0 <= ckpt.stage_index < len(stages):
        raise CcatError(f"{path} says it was saved in stage {ckpt.stage_index} of a method "
                        f"with {len(stages)}; {CHECKPOINT_FIX}")
    method.begin_stage(stages[ckpt.stage_index], model)
    load_state(model, ckpt.model, path, "model")
    load_state(method, ckpt.method_state, path, "method state")
    return method, model.to(device)
