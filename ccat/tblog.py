"""TensorBoard event files beside a run's metrics.jsonl (optional: ``ccat[tensorboard]``).

Every numeric value of an epoch's metrics row becomes a scalar at the run's global epoch
(epochs counted across stages): validation values under ``<val split>/...`` as logged,
training values under ``train/...`` (losses, batch contributions, fractions selected for
secondary updates, learning rate).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from ccat.run_dir import TB_DIR  # OUT/tb/: `tensorboard --logdir` at OUT or a folder of runs
from ccat.ui import make_console

NOT_SCALARS = ("stage", "epoch")

console = make_console()


@contextlib.contextmanager
def open_writer(out: Path, enabled: bool = True) -> Iterator[Any]:
    """A SummaryWriter on ``out/tb`` for the block, closed after it; None when not
    ``enabled`` (other ranks) or when the tensorboard package is not installed."""
    if not enabled:
        yield None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        console.print("[dim]TensorBoard logging off: pip install 'ccat[tensorboard]'[/dim]")
        yield None
        return
    writer = SummaryWriter(log_dir=str(Path(out) / TB_DIR))
    try:
        yield writer
    finally:
        writer.close()


def scalar_tags(row: dict[str, Any], val_split: str) -> dict[str, float]:
    """The row's numeric values under their TensorBoard tags."""
    tags = {}
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = key if key.startswith(f"{val_split}/") else f"train/{key}"
        tags[tag] = float(value)
    return tags


def log_epoch(writer: Any, row: dict[str, Any], step: int, val_split: str) -> None:
    """Write one epoch's row at global epoch ``step`` and flush, so a watcher sees it now."""
    if writer is None:
        return
    for tag, value in scalar_tags(row, val_split).items():
        writer.add_scalar(tag, value, step)
    writer.flush()
