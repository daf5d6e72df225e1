"""`ccat train` never loses a finished run (issue 22, the training part): --overwrite checks
everything before it moves the old run aside and deletes it only at the new run's first
checkpoint; one writer per run folder; no resume on another number of processes; a full
disk, a read-only --out and a missing GPU are one sentence each."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from ccat import folder_lock, run_dir
from ccat.cli import main
from ccat.errors import CcatError
from test_cache_faults import tmpfs
from train_helpers import cli_train, interrupt, tiny_config, tmpfs, write_tiny_dataset

TINY_YAML = """\
device: cpu
threads: 1
data: {batch_size: 8, workers: 0}
model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, ffn_mult: 2}
optim: {epochs: 1, lr: 0.01}
method: {name: sum}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def finished(tiny, config_file, tmp_path_factory):
    """A finished, evaluated and plotted run: every kind of file --overwrite replaces."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli_train(config_file, tiny, out).returncode == 0
    (out / run_dir.EVAL).write_text('{"accuracy": 0.5}')
    (out / run_dir.PLOTS_DIR).mkdir()
    (out / run_dir.PLOTS_DIR / "curves.png").write_bytes(b"png")
    (out / "notes.txt").write_text("mine")  # not a run file
    return out


def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def run_main(args, monkeypatch, capsys):
    """``ccat ARGS`` through the console entry; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def contents(folder):
    """Every file under ``folder`` -> the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def untouched(folder):
    """:func:`contents` plus each file's ctime, which a move (rename) changes as well."""
    return {name: (digest, (folder / name).stat().st_ctime_ns)
            for name, digest in contents(folder).items()}


def one_sentence(err):
    line = err.strip()
    assert line.startswith("error") and len(line.splitlines()) == 1, err
    assert "Traceback" not in err
    return line


# ------------------------------------------------------------------ 1. --overwrite


def causes(tmp_path, tiny):
    """Data that fails --overwrite's checks, by kind."""
    bad = tmp_path / "bad_manifest"
    shutil.copytree(tiny, bad)
    (bad / "manifest.json").write_text('{"spec_version": ')
    return {"missing": tmp_path / "DOESNOTEXIST", "bad manifest": bad,
            "url": "http://127.0.0.1:1/x"}


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
FAILING_CHECKS = [
    ("missing", [], "has no manifest.json"),
    ("bad manifest", [], "manifest.json is not JSON"),
    ("url", [], "cannot reach http://127.0.0.1:1/x/manifest.json"),
    (None, ["--set", "data.batch_size=64"], "is larger than the train split"),
    (None, ["--set", "select_split=nope"], "select_split 'nope' is not a split"),
    (None, ["--set", 'optim.encoder_lr={"depth": 0.1}'], "optim.encoder_lr names ['depth']"),
    (None, ["--set", "optim.lr=-1"], "optim.lr is -1.0 but must be in (0, 10]"),
    (None, ["--set", "method.params.rank=8"], "method 'sum' has no param 'rank'"),
    pytest.param(None, ["--set", "device=cuda"], "torch finds no CUDA GPU", marks=NO_GPU),
    (None, ["--set", "device=gpu"], "device 'gpu' is not one of auto, cpu, cuda"),
    (None, ["--resume"], "pass one of them"),
]


@pytest.mark.parametrize("data,extra,says", FAILING_CHECKS)
def test_overwrite_checks_everything_before_it_touches_the_old_run(
        data, extra, says, finished, tiny, config_file, tmp_path, monkeypatch, capsys):
    """The rule, for every kind of check: a refused --overwrite leaves every file of the old
    run in place, byte-identical and never moved (its ctime is unchanged)."""
    out = run_copy(finished, tmp_path)
    before = untouched(out)
    data = causes(tmp_path, tiny)[data] if data else tiny
    code, _, err = run_main(["train", "--config", config_file, "--data", data, "--out", out,
                             "--overwrite", *extra], monkeypatch, capsys)
    assert code == 2 and says in one_sentence(err)
    assert untouched(out) == before  # no .lock, no .overwritten left either


def test_overwrite_failing_in_its_first_epoch_puts_the_old_run_back(
        finished, tiny, config_file, tmp_path, monkeypatch, capsys):
    """Failures after the old run was set aside: a shard found missing in epoch 1, and
    Ctrl-C in epoch 1 (whose message then repeats the --overwrite command, not --resume)."""
    out = run_copy(finished, tmp_path)
    before = contents(out)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny, damaged)
    (damaged / "train-000001.tar").unlink()
    args = ["train", "--config", config_file, "--out", out, "--overwrite"]
    code, _, err = run_main([*args, "--data", damaged], monkeypatch, capsys)
    assert code == 2 and "train-000001.tar" in one_sentence(err)
    assert contents(out) == before
    from ccat import train as train_module

    def ctrl_c(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_train_epoch", ctrl_c)
    code, _, err = run_main([*args, "--data", tiny], monkeypatch, capsys)
    assert code == 130 and "the run it was replacing is back in place" in err
    assert err.strip().endswith(f"start it again with: ccat {' '.join(map(str, args))} "
                                f"--data {tiny}")
    assert contents(out) == before


@pytest.mark.parametrize("kill_after", [f"{run_dir.METRICS}:1", f"{run_dir.LAST}:1"])
def test_a_kill_during_overwrite_is_put_right_by_the_next_train(
        kill_after, finished, tiny, config_file, tmp_path, monkeypatch, capsys):
    """SIGKILL before the new run's first last.pt: the old run waits in .overwritten/ and the
    next `ccat train` puts it back; SIGKILL just after it: the next one deletes it."""
    out = run_copy(finished, tmp_path)
    before = contents(out)
    proc = cli_train(config_file, tiny, out, "--overwrite", "--set", "seed=1",
                     env={run_dir.KILL_ENV: kill_after})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / run_dir.OVERWRITTEN).is_dir()
    new_run_saved = kill_after.startswith(run_dir.LAST)
    seed = "seed=1" if new_run_saved else "seed=0"
    code, said, _ = run_main(["train", "--config", config_file, "--data", tiny, "--out", out,
                              "--resume", "--set", seed], monkeypatch, capsys)
    assert code == 0 and "finished already" in said
    assert not (out / run_dir.OVERWRITTEN).exists() and not (out / run_dir.LOCK).exists()
    if new_run_saved:
        assert "removed " in said and (out / "notes.txt").is_file()
        assert torch.load(out / run_dir.BEST, weights_only=True)["config"]["seed"] == 1
    else:
        assert "put back the run" in said and contents(out) == before


def test_ctrl_c_as_the_first_checkpoint_is_written_keeps_the_new_run(
        finished, tiny, config_file, tmp_path):
    """Ctrl-C right after the new run's first last.pt lands (SIGINT from the write itself)
    takes effect once the run knows of that checkpoint: the old run is deleted, not put back
    over it, and the message names last.pt and --resume."""
    out = run_copy(finished, tmp_path)
    proc = cli_train(config_file, tiny, out, "--overwrite", "--set", "seed=1",
                     env={run_dir.KILL_ENV: f"{run_dir.LAST}:1:INT"})
    assert proc.returncode == 130
    assert f"last checkpoint: {out / run_dir.LAST} (stage 'joint', epoch 1)" in proc.stderr
    assert proc.stderr.strip().endswith("--set seed=1 --resume")
    assert not (out / run_dir.OVERWRITTEN).exists() and not (out / run_dir.EVAL).exists()
    assert torch.load(out / run_dir.LAST, weights_only=True)["config"]["seed"] == 1


def test_a_kill_while_moving_the_old_run_is_moved_back(
        finished, tiny, config_file, tmp_path, monkeypatch, capsys):
    """A kill in the middle of setting aside (or of putting back) leaves
    .overwritten.moving/: its files belong in the folder and go back there."""
    out = run_copy(finished, tmp_path)
    before = contents(out)
    (out / run_dir.MOVING).mkdir()
    for name in (run_dir.LAST, run_dir.METRICS, run_dir.PLOTS_DIR):
        os.replace(out / name, out / run_dir.MOVING / name)
    code, said, _ = run_main(["train", "--config", config_file, "--data", tiny, "--out", out,
                              "--resume"], monkeypatch, capsys)
    assert code == 0 and "put back the run files" in said and "finished already" in said
    assert contents(out) == before


# ------------------------------------------------------------------ 2. one writer


def signed(lock):
    """Whether a holder has taken ``lock`` and written its name into it."""
    return lock.is_file() and bool(lock.read_text().strip())


def test_a_second_writer_is_refused_naming_the_holder(tiny, config_file, tmp_path,
                                                     monkeypatch, capsys):
    """A real training holds the folder: a second --resume (another process), --overwrite or
    fresh train (this one) of it is refused naming the first's PID and host, and changes
    nothing; once the holder is killed its lock is gone with it."""
    out = tmp_path / "run"
    args = ["--config", config_file, "--data", tiny, "--out", out, "--set", "optim.epochs=500"]
    first = subprocess.Popen([sys.executable, "-m", "ccat", "train", *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    refusal = (f"{out} is being written by another ccat train (process {first.pid} on host "
               f"{socket.gethostname()}); wait for it to end, or train into another --out")
    try:
        deadline = time.monotonic() + 600  # a bound for a hung start, not a speed check
        while not signed(out / run_dir.LOCK):
            assert first.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        proc = subprocess.run([sys.executable, "-m", "ccat", "train", *map(str, args),
                               "--resume"], capture_output=True, text=True)
        assert proc.returncode == 2 and refusal in one_sentence(proc.stderr)
        for extra in (["--overwrite"], []):
            code, _, err = run_main(["train", *args, *extra], monkeypatch, capsys)
            assert code == 2 and refusal in one_sentence(err)
        assert first.poll() is None and not (out / run_dir.OVERWRITTEN).exists()
    finally:
        first.kill()
        first.wait()
    fd = folder_lock.acquire(out / run_dir.LOCK)  # the killed holder's lock died with it
    assert fd is not None
    folder_lock.release(out / run_dir.LOCK, fd)


# ------------------------------------------------------------------ 3. world size


def test_resume_refuses_another_number_of_processes(tiny, tmp_path, monkeypatch, capsys):
    """The checkpoint records the world size; a resume on another is refused naming both
    (a real 2-process run resumed on 1: tests/test_ddp.py). A checkpoint from before the
    record resumes, with a note saying it cannot be checked."""
    cfg = tiny_config(tiny, tmp_path / "run", method="sum", epochs=2)
    interrupt(cfg, monkeypatch, at_epoch=2)
    last = tmp_path / "run" / run_dir.LAST
    state = torch.load(last, weights_only=True)
    assert state["world"] == 1
    state["world"] = 4
    torch.save(state, last)
    from ccat.train import train

    with pytest.raises(CcatError, match=r"was trained by 4 processes \(torchrun world size 4\) "
                                        r"but this resume runs 1 process"):
        train(cfg, resume=True)
    del state["world"]
    torch.save(state, last)
    capsys.readouterr()
    assert [row["epoch"] for row in train(cfg, resume=True)] == [1, 2]
    assert "does not record how many processes trained it" in capsys.readouterr().out


# ------------------------------------------------------------------ 4-6. faults


def fill(folder, leave):
    """Fill ``folder``'s file system but for ``leave`` bytes."""
    stat = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_a_full_disk_while_writing_a_checkpoint_is_one_sentence(
        tiny, config_file, tmp_path, monkeypatch, capsys):
    """A real full disk (a small tmpfs): the checkpoint write fails with ENOSPC, the run
    stops naming the folder and the fix, last.pt keeps the epoch before and no temporary
    file is left; with room again, --resume finishes. An --overwrite that meets a full disk
    at its first checkpoint puts the old run back."""
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        out = disk / "run"
        cfg = tiny_config(tiny, out, method="sum", epochs=2)
        interrupt(cfg, monkeypatch, at_epoch=2)
        before, size = contents(out), (out / run_dir.LAST).stat().st_size
        fill(disk, leave=size // 2)
        args = ["train", "--config", config_file, "--data", tiny, "--out", out,
                "--set", "optim.epochs=2", "--set", "threads=0"]
        code, _, err = run_main([*args, "--resume"], monkeypatch, capsys)
        assert code == 2 and (
            f"the disk holding {out} is full (No space left on device); {out / run_dir.LAST} "
            f"still holds stage 'joint', epoch 1: free space on it, then continue with --resume"
        ) == one_sentence(err).removeprefix("error: ")
        assert contents(out)[run_dir.LAST] == before[run_dir.LAST]
        assert not run_dir.temporaries(out)
        before = contents(out)
        code, _, err = run_main([*args, "--overwrite"], monkeypatch, capsys)
        assert code == 2 and "the run it was replacing is back in place" in one_sentence(err)
        assert contents(out) == before
        (disk / "filler").unlink()
        code, said, _ = run_main([*args, "--resume"], monkeypatch, capsys)
        assert code == 0 and [r["epoch"] for r in run_dir.read_metrics(out)] == [1, 2]


def test_a_read_only_out_is_refused_before_any_work(config_file, tmp_path, monkeypatch,
                                                    capsys):
    """A read-only mount (which root cannot write either): refused before the data is even
    looked at, so a missing --data is not what the user hears about first."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        for out in (read_only, read_only / "run"):
            code, _, err = run_main(["train", "--config", config_file, "--data",
                                     tmp_path / "DOESNOTEXIST", "--out", out], monkeypatch,
                                    capsys)
            assert code == 2 and one_sentence(err) == (
                f"error: cannot write into {out} (Read-only file system); give --out a "
                f"folder you can write to")
