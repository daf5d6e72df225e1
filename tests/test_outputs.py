"""Commands that read a run and write a file (eval, probe, export, analyze, report, summary,
results) never overwrite their inputs or a run's own files, refuse an unwritable place
before any work, and write atomically; a checkpoint not as ``ccat train`` wrote it, a
device that is not here and an eval.json that is no result are each one sentence (issue
22). Each rule is tested for every command and every case (every name a run folder owns,
every key a reader needs), through the console entry, on one real tiny run whose files
must stay byte-identical. Read-only and full disks are real tmpfs mounts (tests run as
root, which chmod does not stop), skipped where mounting is not allowed."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from ccat import checkpoint, run_dir
from ccat.cli import main
from ccat.config import save_config
from ccat.evaluate import evaluate_checkpoint
from ccat.train import train
from train_helpers import interrupt, tiny_config, tmpfs, write_tiny_dataset

NOWHERE = "/nonexistent/shards"  # --data that any work fails on: a refusal came before it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A one-epoch Concat run with its eval.json, and a copy of its best.pt outside it."""
    root = tmp_path_factory.mktemp("outputs")
    data = write_tiny_dataset(root / "shards")
    cfg = tiny_config(data, root / "run", "concat")
    cfg.threads = 1
    train(cfg)
    run = root / "run"
    evaluate_checkpoint(run / run_dir.BEST, json_path=run / run_dir.EVAL)
    shutil.copyfile(run / run_dir.BEST, root / "model.pt")
    return SimpleNamespace(root=root, data=data, run=run, ckpt=root / "model.pt")


def ccat(args: list, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ccat ARGS`` through the console-script entry: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def refused(result: tuple[int, str, str]) -> str:
    """The one sentence of a refused command (exit 2, no traceback)."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# Each command that writes one file, as (option, argv for an output path).
Argv = Callable[[SimpleNamespace, Path], list]
FILE_WRITERS: dict[str, tuple[str, Argv]] = {
    "eval": ("--json", lambda t, out: ["eval", "--ckpt", t.ckpt, "--data", NOWHERE,
                                       "--json", out]),
    "probe": ("--json", lambda t, out: ["probe", "--ckpt", t.ckpt, "--data", NOWHERE,
                                        "--json", out]),
    "export": ("--out", lambda t, out: ["export", "--ckpt", t.ckpt, "--data", NOWHERE,
                                        "--out", out]),
    "summary": ("--out", lambda t, out: ["summary", t.run, "--out", out]),
    "results": ("--out", lambda t, out: ["results", t.run, "--command", "make results",
                                         "--out", out, "--figures", t.root / "figures"]),
}
# Each command that writes fixed names into a folder: (the folder's option, a name it
# writes there, argv for the folder).
FOLDER_WRITERS: dict[str, tuple[str, str, Argv]] = {
    "analyze": ("--out", "accuracy.png", lambda t, out: ["analyze", t.run, "--out", out]),
    "analyze --tsne": ("--out", "clusters_test.json",
                       lambda t, out: ["analyze", "--ckpt", t.ckpt, "--tsne", "--data",
                                       NOWHERE, "--out", out]),
    "report": ("--out", "table.md", lambda t, out: ["report", t.run, "--out", out]),
}
OWNED = [(cmd, name) for cmd in FILE_WRITERS for name in run_dir.OWNERS
         if (cmd, name) != ("eval", run_dir.EVAL)]


@pytest.mark.parametrize("cmd,name", OWNED)
def test_no_command_writes_over_a_file_of_a_run(tiny, monkeypatch, capsys, cmd: str,
                                                name: str) -> None:
    before = files_of(tiny.run)
    option, argv = FILE_WRITERS[cmd]
    sentence = refused(ccat(argv(tiny, tiny.run / name), monkeypatch, capsys))
    assert str(tiny.run / name) in sentence and f"pass {option} another path" in sentence
    assert files_of(tiny.run) == before and not (tiny.root / "figures").exists()


@pytest.mark.parametrize("cmd", FOLDER_WRITERS)
@pytest.mark.parametrize("name", run_dir.OWNERS)
def test_no_folder_output_leads_onto_a_file_of_a_run(tiny, tmp_path, monkeypatch, capsys,
                                                     cmd: str, name: str) -> None:
    """The fixed names analyze and report write, placed as links to a run's own files."""
    option, written, argv = FOLDER_WRITERS[cmd]
    (tmp_path / written).symlink_to(tiny.run / name)
    before = files_of(tiny.run)
    sentence = refused(ccat(argv(tiny, tmp_path), monkeypatch, capsys))
    assert str(tmp_path / written) in sentence and f"pass {option}" in sentence
    assert files_of(tiny.run) == before


@pytest.mark.parametrize("cmd", FILE_WRITERS)
@pytest.mark.parametrize("how", ["the same path", "a symlink", "a hard link"])
def test_no_command_writes_over_its_own_input(tiny, tmp_path, monkeypatch, capsys, cmd: str,
                                              how: str) -> None:
    """eval, probe, export read the checkpoint; summary and results read RUN/eval.json."""
    source = tiny.ckpt if cmd in ("eval", "probe", "export") else tiny.run / run_dir.EVAL
    out = {"the same path": source, "a symlink": tmp_path / "out.json",
           "a hard link": tmp_path / "out.json"}[how]
    if how == "a symlink":
        out.symlink_to(source)
    elif how == "a hard link":
        os.link(source, out)
    before, kept = files_of(tiny.run), source.read_bytes()
    option, argv = FILE_WRITERS[cmd]
    sentence = refused(ccat(argv(tiny, out), monkeypatch, capsys))
    assert str(out) in sentence and f"pass {option} another path" in sentence
    assert source.read_bytes() == kept and files_of(tiny.run) == before


PLACES = {  # where no output goes, made under the tiny run's root
    "a hidden file of a run": lambda t: t.run / ".lock",
    "inside a run's tb/": lambda t: t.run / run_dir.TB_DIR / "x.json",
    "beside a manifest.json": lambda t: t.data / "x.json",
    "a folder": lambda t: t.root / "a_folder",
    "a device": lambda t: Path(os.devnull),
    "under a file": lambda t: t.root / "a_file" / "x.json",
}


@pytest.mark.parametrize("cmd", FILE_WRITERS)
@pytest.mark.parametrize("place", PLACES)
def test_no_output_goes_where_it_does_not_belong(tiny, monkeypatch, capsys, cmd: str,
                                                 place: str) -> None:
    (tiny.root / "a_folder").mkdir(exist_ok=True)
    (tiny.root / "a_file").write_text("a file where a folder would be")
    before, shards = files_of(tiny.run), files_of(tiny.data)
    option, argv = FILE_WRITERS[cmd]
    sentence = refused(ccat(argv(tiny, PLACES[place](tiny)), monkeypatch, capsys))
    assert f"pass {option}" in sentence
    assert files_of(tiny.run) == before and files_of(tiny.data) == shards


def test_eval_writes_its_run_s_eval_json_atomically(tiny, monkeypatch, capsys) -> None:
    """eval.json is the one run file ``ccat eval`` writes (``make table`` does)."""
    run = tiny.root / "evaluated"
    shutil.copytree(tiny.run, run, dirs_exist_ok=True)
    (run / run_dir.EVAL).write_text("an older evaluation")
    code, _, err = ccat(["eval", "--ckpt", run / run_dir.BEST, "--json", run / run_dir.EVAL],
                        monkeypatch, capsys)
    assert code == 0, err
    assert (run / run_dir.EVAL).read_bytes() == (tiny.run / run_dir.EVAL).read_bytes()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("cmd", [*FILE_WRITERS, *FOLDER_WRITERS])
def test_a_read_only_output_folder_is_refused_before_the_work(tiny, tmp_path, monkeypatch,
                                                              capsys, cmd: str) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        argv = FILE_WRITERS[cmd][1] if cmd in FILE_WRITERS else FOLDER_WRITERS[cmd][2]
        out = ro / "sub" / "out.json" if cmd in FILE_WRITERS else ro / "sub"
        sentence = refused(ccat(argv(tiny, out), monkeypatch, capsys))
        assert f"cannot write into {out.parent if cmd in FILE_WRITERS else out}: {ro} is on " \
               f"a read-only file system; pass --" in sentence
        assert not (tiny.root / "figures").exists()


@pytest.mark.parametrize("cmd,name", [("export", "feats.h5"), ("eval", "eval.json")])
def test_a_disk_that_fills_during_the_write_leaves_the_old_file(tiny, tmp_path, monkeypatch,
                                                                capsys, cmd: str,
                                                                name: str) -> None:
    """The check before the work passes (a file can still be created); the write itself
    fails: one sentence, the old file as it was, no temporary file left."""
    with tmpfs(tmp_path / "full", "size=64k") as full:
        (full / name).write_bytes(b"an older output " * 1000)
        (full / "filler").write_bytes(b"\0" * (64 * 1024 - 20000))
        args = ["--ckpt", tiny.ckpt, "--out" if cmd == "export" else "--json", full / name]
        sentence = refused(ccat([cmd, *args], monkeypatch, capsys))
        assert f"cannot write {full / name} (No space left on device); it is left as it was" \
               in sentence
        assert (full / name).read_bytes() == b"an older output " * 1000
        assert sorted(p.name for p in full.iterdir()) == sorted([name, "filler"])


# ---------------------------------------------------------------- checkpoints


def edit_config(**changes: Any) -> Callable[[dict], dict]:
    """A tamper that changes the config saved in a checkpoint: ``model__width=32``."""
    def tamper(state: dict) -> dict:
        config = copy.deepcopy(state["config"])
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            section = config
            for parent in parents:
                section = section[parent]
            section[leaf] = value
        return {**state, "config": config}
    return tamper


TAMPERS: dict[str, Callable[[dict], Any]] = {
    **{f"no {key}": (lambda s, key=key: {k: v for k, v in s.items() if k != key})
       for key in checkpoint.RESUME_KEYS},
    "a list": lambda s: [1, 2, 3],
    "a tensor": lambda s: torch.zeros(3),
    "its config as text": lambda s: {**s, "config": "model: {width: 16}"},
    "weights as text": lambda s: {**s, "model": {"classifier.weight": "none"}},
    "a stage its method does not have": lambda s: {**s, "stage_index": 7},
    "a weight missing": lambda s: {**s, "model": dict(list(s["model"].items())[:-1])},
    "an unknown config key": edit_config(bogus=1),
    "a wider model in its config": edit_config(model__width=32),
    "deeper encoders in its config": edit_config(model__encoder_blocks=[2, 1, 1, 1]),
    "another method in its config": edit_config(method__name="sum"),
}
READERS: dict[str, Callable[[Path, Path], list]] = {
    "eval": lambda ckpt, out: ["eval", "--ckpt", ckpt, "--json", out / "eval.json"],
    "probe": lambda ckpt, out: ["probe", "--ckpt", ckpt, "--json", out / "probe.json"],
    "export": lambda ckpt, out: ["export", "--ckpt", ckpt, "--out", out / "feats.h5"],
    "analyze --tsne": lambda ckpt, out: ["analyze", "--ckpt", ckpt, "--tsne", "--out", out],
}


def tampered(source: Path, how: str, target: Path) -> Path:
    torch.save(TAMPERS[how](torch.load(source, weights_only=True)), target)
    return target


@pytest.mark.parametrize("cmd", READERS)
@pytest.mark.parametrize("how", [how for how in TAMPERS if how.removeprefix("no ") not in
                                 set(checkpoint.RESUME_KEYS) - set(checkpoint.EVAL_KEYS)])
def test_a_checkpoint_not_as_training_wrote_it_is_one_sentence(tiny, tmp_path, monkeypatch,
                                                               capsys, cmd: str,
                                                               how: str) -> None:
    ckpt = tampered(tiny.ckpt, how, tmp_path / "model.pt")
    sentence = refused(ccat(READERS[cmd](ckpt, tmp_path / "out"), monkeypatch, capsys))
    assert str(ckpt) in sentence and sentence.endswith(checkpoint.CHECKPOINT_FIX)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def half(tiny, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A two-epoch Concat run stopped by Ctrl-C after its first epoch, and its config."""
    root = tmp_path_factory.mktemp("half")
    cfg = tiny_config(tiny.data, root / "run", "concat", epochs=2)
    cfg.threads = 1
    save_config(cfg, root / "config.yaml")
    with pytest.MonkeyPatch.context() as patch:
        interrupt(cfg, patch, at_epoch=2)
    return SimpleNamespace(run=root / "run", config=root / "config.yaml")


@pytest.mark.parametrize("how,args", [
    *((f"no {key}", []) for key in checkpoint.RESUME_KEYS), ("a list", []),
    ("a wider model in its config", ["--set", "model.width=32"])])
def test_a_resume_from_a_checkpoint_not_as_training_wrote_it_is_one_sentence(
        half, tmp_path, monkeypatch, capsys, how: str, args: list) -> None:
    run = Path(shutil.copytree(half.run, tmp_path / "run"))
    last = tampered(run / run_dir.LAST, how, run / run_dir.LAST)
    kept = last.read_bytes(), (run / run_dir.METRICS).read_bytes()
    sentence = refused(ccat(["train", "--config", half.config, "--out", run, "--resume",
                             *args], monkeypatch, capsys))
    assert str(last) in sentence and sentence.endswith(checkpoint.CHECKPOINT_FIX)
    assert (last.read_bytes(), (run / run_dir.METRICS).read_bytes()) == kept


# The dict `ccat train` wrote before checkpoints carried a version (version 0): these keys.
UNVERSIONED_KEYS = {"model", "optimizer", "scheduler", "rng", "method_state", "stage",
                    "stage_index", "epoch", "step", "best", "best_epoch", "selection",
                    "metrics", "config", "data", "fingerprint", "fingerprint_params", "code",
                    "world"}


def unversioned(source: Path, target: Path) -> Path:
    """``source`` as ccat wrote it before the version field: the same dict without it."""
    state = torch.load(source, weights_only=True)
    assert set(state) == UNVERSIONED_KEYS | {"version"}
    assert state["version"] == checkpoint.VERSION
    torch.save({k: v for k, v in state.items() if k != "version"}, target)
    return target


def test_a_checkpoint_from_before_versions_evaluates_as_it_did(tiny, tmp_path, monkeypatch,
                                                               capsys) -> None:
    old = unversioned(tiny.ckpt, tmp_path / "old.pt")
    assert checkpoint.load(old).version == 0 and checkpoint.load(tiny.ckpt).version == 1
    code, _, err = ccat(["eval", "--ckpt", old, "--json", tmp_path / "eval.json"],
                        monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "eval.json").read_text() == (tiny.run / run_dir.EVAL).read_text()


@pytest.mark.parametrize("version", [checkpoint.VERSION + 1, "1", True])
def test_a_checkpoint_of_a_format_this_ccat_does_not_read_names_its_version(
        tiny, half, tmp_path, monkeypatch, capsys, version: Any) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save({**torch.load(tiny.ckpt, weights_only=True), "version": version}, ckpt)
    said = f"{ckpt} is a checkpoint of format version {version!r}, but this ccat reads"
    for cmd in READERS:
        assert refused(ccat(READERS[cmd](ckpt, tmp_path / "out"), monkeypatch, capsys)
                       ).startswith(f"error: {said}")
    run = Path(shutil.copytree(half.run, tmp_path / "run"))
    last = run / run_dir.LAST
    torch.save({**torch.load(last, weights_only=True), "version": version}, last)
    sentence = refused(ccat(["train", "--config", half.config, "--out", run, "--resume"],
                            monkeypatch, capsys))
    assert sentence.startswith(f"error: {last} is a checkpoint of format version {version!r}")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- devices

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")
DEVICE_FIX = "pass --device cpu to run it on the CPU"


@NO_GPU
@pytest.mark.parametrize("cmd", READERS)
@pytest.mark.parametrize("device,says", [("cuda", "device is cuda, but torch finds no CUDA "
                                          "GPU on this machine"),
                                         ("gpu", "device 'gpu' is not one of auto, cpu, cuda")])
def test_a_device_that_is_not_here_is_one_sentence(tiny, tmp_path, monkeypatch, capsys,
                                                   cmd: str, device: str, says: str) -> None:
    argv = [*READERS[cmd](tiny.ckpt, tmp_path / "out"), "--device", device]
    sentence = refused(ccat(argv, monkeypatch, capsys))
    assert sentence.startswith(f"error: {says}") and sentence.endswith(DEVICE_FIX)


@NO_GPU
def test_a_run_trained_on_cuda_is_evaluated_here_with_device_cpu(tiny, tmp_path, monkeypatch,
                                                                 capsys) -> None:
    state = torch.load(tiny.ckpt, weights_only=True)
    torch.save(edit_config(device="cuda")(state), tmp_path / "gpu.pt")
    sentence = refused(ccat(["eval", "--ckpt", tmp_path / "gpu.pt"], monkeypatch, capsys))
    assert sentence.endswith(DEVICE_FIX)
    code, _, err = ccat(["eval", "--ckpt", tmp_path / "gpu.pt", "--device", "cpu", "--json",
                         tmp_path / "eval.json"], monkeypatch, capsys)
    assert code == 0, err
    ours, theirs = (json.loads(p.read_text()) for p in (tmp_path / "eval.json",
                                                         tiny.run / run_dir.EVAL))
    assert ours["accuracy"] == theirs["accuracy"]


@NO_GPU
def test_training_on_cuda_without_a_gpu_is_one_sentence(tiny, tmp_path, monkeypatch,
                                                        capsys) -> None:
    cfg = tiny_config(tiny.data, tmp_path / "run", "concat")
    save_config(cfg, tmp_path / "config.yaml")
    sentence = refused(ccat(["train", "--config", tmp_path / "config.yaml", "--set",
                             "device=cuda"], monkeypatch, capsys))
    assert sentence.endswith("set device=cpu (--set device=cpu) to run it on the CPU")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- eval.json readers

BAD_EVALS = {  # eval.json texts that Python's json reads (or fails on) but are no result
    "NaN": lambda good: good.replace('"fused": ', '"fused": NaN, "was": '),
    "Infinity": lambda good: good.replace('"fused": ', '"fused": Infinity, "was": '),
    "-Infinity": lambda good: good.replace('"fused": ', '"fused": -Infinity, "was": '),
    "1e400": lambda good: good.replace('"fused": ', '"fused": 1e400, "was": '),
    "nested 100000 deep": lambda good: "[" * 100_000 + "]" * 100_000,
}
SUMMARIZERS: dict[str, Callable[[Path, Path], list]] = {
    "report": lambda runs, out: ["report", runs, "--out", out],
    "summary": lambda runs, out: ["summary", runs, "--out", out / "summary.md"],
    "results": lambda runs, out: ["results", runs, "--command", "make results", "--out",
                                  out / "results.md", "--figures", out],
}


def bad_run(tiny, folder: Path, how: str) -> Path:
    """A run folder whose eval.json is ``tiny``'s made bad in way ``how``."""
    folder.mkdir(parents=True)
    good = (tiny.run / run_dir.EVAL).read_text()
    (folder / run_dir.EVAL).write_text(BAD_EVALS[how](good))
    return folder / run_dir.EVAL


@pytest.mark.parametrize("cmd", SUMMARIZERS)
@pytest.mark.parametrize("how", BAD_EVALS)
def test_an_eval_json_that_is_no_result_is_one_sentence(tiny, tmp_path, monkeypatch, capsys,
                                                        cmd: str, how: str) -> None:
    path = bad_run(tiny, tmp_path / "runs" / "bad", how)
    sentence = refused(ccat(SUMMARIZERS[cmd](tmp_path / "runs", tmp_path / "out"),
                            monkeypatch, capsys))
    assert f"{path}: unusable" in sentence
    assert "not a finite number" in sentence or "nested too deeply" in sentence
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", BAD_EVALS)
def test_report_skips_an_eval_json_that_is_no_result_and_says_so(tiny, tmp_path, monkeypatch,
                                                                 capsys, how: str) -> None:
    path = bad_run(tiny, tmp_path / "runs" / "bad", how)
    shutil.copytree(tiny.run, tmp_path / "runs" / "good")
    code, out, err = ccat(["report", tmp_path / "runs", "--format", "csv"], monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    fused = next(r for r in rows if r["accuracy"] == "fused")
    good = json.loads((tiny.run / run_dir.EVAL).read_text())["accuracy"]["fused"]
    assert len({r["row"] for r in rows}) == 1 and float(fused["mean"]) == good
    assert f"note: skipped {path}: unusable" in err


UNREADABLE = {  # files torch.load refuses, by what is in them
    "empty": lambda good: b"",
    "not a torch file": lambda good: b"not a checkpoint at all",
    "cut short": lambda good: good[:3000],
    "a pickled object": lambda good: pickled({"model": Path("weights")}),
}


def pickled(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("cmd", READERS)
@pytest.mark.parametrize("what", UNREADABLE)
def test_an_unreadable_checkpoint_is_one_sentence(tiny, tmp_path, monkeypatch, capsys,
                                                  cmd: str, what: str) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(UNREADABLE[what](tiny.ckpt.read_bytes()))
    sentence = refused(ccat(READERS[cmd](ckpt, tmp_path / "out"), monkeypatch, capsys))
    assert sentence.startswith(f"error: {ckpt} is not a readable ccat checkpoint (")
    assert sentence.endswith(checkpoint.CHECKPOINT_FIX) and "weights_only" not in sentence
