"""Fewer host syncs per training step (issue 17), with unchanged numbers: the losses a step
reports are fetched in one copy, and the non-finite check of every loss since zero_grad is
one sync at step() instead of one per backward."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ccat.methods import ccat as ccat_module
from ccat.step import NonFiniteLoss, Step, host_floats
from ccat.train import train
from train_helpers import tiny_config, write_tiny_dataset


def test_host_floats_equal_item_for_every_dtype_and_keep_the_order() -> None:
    values = {"half": torch.tensor(1 / 3, dtype=torch.float16),
              "bf16": torch.tensor(2 / 3, dtype=torch.bfloat16),
              "single": torch.tensor(0.1, dtype=torch.float32),
              "count": torch.tensor([True, False, True]).sum(),
              "plain": 0.25}
    fetched = host_floats(values)
    assert list(fetched) == list(values)
    assert fetched == {k: v.item() if isinstance(v, torch.Tensor) else v
                       for k, v in values.items()}
    assert host_floats({}) == {}


def test_a_non_finite_loss_in_any_backward_since_zero_grad_stops_the_step() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    step = Step(torch.optim.SGD([weight], lr=0.1))
    step.zero_grad()
    step.backward((weight * float("nan")).sum())
    step.backward(weight.sum())  # a finite second loss does not hide the first
    with pytest.raises(NonFiniteLoss):
        step.step()
    step.zero_grad()  # the flag is per update
    step.backward(weight.sum())
    step.step()
    assert torch.equal(weight.detach(), torch.full((2,), 0.9)) and step.updates == 1


def per_item(values: dict) -> dict[str, float]:
    """The reporting before issue 17: one .item() (one sync) per value."""
    return {k: v.item() if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}


def trained(data: Path, out: Path, secondary_forward: str) -> tuple[list[dict], str]:
    cfg = tiny_config(data, out, method="ccat", epochs=2)
    cfg.method.params.update(beta=0.6, secondary_forward=secondary_forward)  # picks samples
    rows = [{k: v for k, v in row.items() if k not in ("train_s", "samples_per_s")}
            for row in train(cfg)]
    weights = torch.load(out / "last.pt", weights_only=False)["model"]
    return rows, hashlib.sha256(b"".join(t.numpy().tobytes() for t in weights.values())).hexdigest()


@pytest.mark.parametrize("secondary_forward", ["batch", "subset"])
def test_ccat_reports_and_trains_the_same_as_with_one_item_per_value(
        secondary_forward: str, tmp_path: Path, monkeypatch) -> None:
    data = write_tiny_dataset(tmp_path / "data")
    fetched_once = trained(data, tmp_path / "once", secondary_forward)
    monkeypatch.setattr(ccat_module, "host_floats", per_item)
    one_by_one = trained(data, tmp_path / "each", secondary_forward)
    assert fetched_once == one_by_one
    assert any(row.get("selected/audio", 0) > 0 for row in fetched_once[0])
