"""``ccat summary``: the sentences follow the numbers whichever way they go (CCAT lifts
the weak modality or not, audio or video dominant), and the command reads hand-built run
folders: probes from eval.json, CCAT's selected fractions from metrics.jsonl."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccat import run_dir
from ccat.cli import app, main
from ccat.story import MethodNumbers, tell

runner = CliRunner()


def numbers(method: str, audio: float, video: float, fused: float = 0.9,
            selected: dict[str, float] | None = None) -> MethodNumbers:
    return MethodNumbers(method, fused, {"audio": audio, "video": video}, selected, 1)


def test_ccat_lifting_the_weak_modality_is_said_with_its_numbers():
    story = tell([numbers("concat", 0.9167, 0.2083), numbers("ccat", 0.875, 0.375),
                  numbers("unimodal", 0.9167, 0.4583)])
    assert story.sentences[:2] == (
        "Under concat, audio dominated: its probe reached 91.7 % against 20.8 % for video.",
        "Trained alone (unimodal), video's probe reaches 45.8 %; under concat 25.0 points "
        "below it, under ccat 8.3 points below it, so ccat lifts video 16.7 points above "
        "concat.")


def test_ccat_not_lifting_it_is_said_too_and_video_can_dominate():
    story = tell([numbers("concat", 0.30, 0.80), numbers("ccat", 0.25, 0.85),
                  numbers("unimodal", 0.60, 0.85)])
    assert story.sentences[:2] == (
        "Under concat, video dominated: its probe reached 80.0 % against 30.0 % for audio.",
        "Trained alone (unimodal), audio's probe reaches 60.0 %; under concat 30.0 points "
        "below it, under ccat 35.0 points below it, so ccat leaves audio 5.0 points below "
        "concat.")


def test_equal_numbers_and_a_weak_modality_above_its_own_level():
    story = tell([numbers("concat", 0.9, 0.5), numbers("ccat", 0.9, 0.5),
                  numbers("unimodal", 0.9, 0.4)])
    assert story.sentences[1] == (
        "Trained alone (unimodal), video's probe reaches 40.0 %; under concat 10.0 points "
        "above it, under ccat 10.0 points above it, so ccat leaves video where concat has it.")
    tie = tell([numbers("concat", 0.5, 0.5), numbers("ccat", 0.6, 0.5)])
    assert tie.sentences[0] == ("Under concat, no modality dominated: every modality's probe "
                                "reached 50.0 %.")


def test_with_several_methods_each_distance_is_given_without_a_list_of_comparisons():
    story = tell([numbers("concat", 0.9, 0.2), numbers("sum", 0.9, 0.1),
                  numbers("ccat", 0.9, 0.4), numbers("unimodal", 0.9, 0.5)])
    assert story.sentences[1] == (
        "Trained alone (unimodal), video's probe reaches 50.0 %; under concat 30.0 points "
        "below it, under sum 40.0 points below it, under ccat 10.0 points below it.")


def test_without_a_unimodal_run_the_gap_is_relative_to_concat():
    story = tell([numbers("concat", 0.9, 0.2), numbers("ccat", 0.8, 0.3)])
    assert story.sentences[1] == ("Without a unimodal run to give video's own level, compare "
                                  "with concat: ccat lifts video 10.0 points above concat.")
    alone = tell([numbers("concat", 0.9, 0.2)])
    assert alone.sentences[1].endswith("there is no other method to compare.")


def test_fused_accuracy_is_compared_with_the_unimodal_ensemble_whichever_way():
    story = tell([numbers("concat", 0.9, 0.2, fused=0.8), numbers("ccat", 0.9, 0.4, fused=0.96),
                  numbers("unimodal", 0.9, 0.5, fused=0.94)])
    assert story.sentences[2] == ("Fused, the unimodal ensemble (unimodal) reaches 94.0 %; "
                                  "concat is 14.0 points below it, ccat 2.0 points above it.")
    level = tell([numbers("concat", 0.9, 0.2, fused=0.9), numbers("unimodal", 0.9, 0.5,
                                                                    fused=0.9)])
    assert level.sentences[2] == ("Fused, the unimodal ensemble (unimodal) reaches 90.0 %; "
                                  "concat is level with it.")


def test_without_a_unimodal_run_fused_accuracy_is_compared_with_concat():
    story = tell([numbers("concat", 0.9, 0.2, fused=0.75), numbers("ccat", 0.8, 0.3,
                                                                     fused=0.70)])
    assert story.sentences[2] == "Fused, concat reaches 75.0 %; ccat is 5.0 points below it."
    alone = tell([numbers("concat", 0.9, 0.2, fused=0.75)])
    assert alone.sentences[2] == "Fused, concat reaches 75.0 %."


def write_run(folder: Path, method: str, seed: int, probe: dict[str, float], fused: float,
              selected: dict[str, float] | None = None) -> None:
    """An eval.json as `ccat eval --probe` writes it, and a two-epoch metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(
        {"split": "test", "accuracy": {"fused": fused, "audio": fused, "video": 0.2},
         "probe": probe, "run": {"method": method, "variant": "", "dataset": "cremad",
                                 "seed": seed}}))
    rows = [{"stage": "joint", "epoch": e, "train_s": 2.0, "samples_per_s": 100.0}
            for e in (1, 2)]
    if selected is not None:  # CCAT's stage 2: only its rows record selected/<m>
        rows[1].update({f"selected/{m}": v for m, v in selected.items()})
        rows.append({**rows[1], "epoch": 3,
                     **{f"selected/{m}": 3 * v for m, v in selected.items()}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_selected_fractions_are_the_mean_over_the_epochs_that_record_them(tmp_path):
    write_run(tmp_path / "ccat", "ccat", 0, {"audio": 0.9, "video": 0.4}, 0.9,
              {"audio": 0.0, "video": 0.05})
    assert run_dir.selected_fractions(tmp_path / "ccat") == pytest.approx(
        {"audio": 0.0, "video": 0.1})
    write_run(tmp_path / "concat", "concat", 0, {"audio": 0.9, "video": 0.2}, 0.9)
    assert run_dir.selected_fractions(tmp_path / "concat") == {}


def test_summary_command_prints_and_writes_the_table_and_sentences(tmp_path):
    for seed, video in ((0, 0.25), (1, 0.35)):  # two ccat seeds: means over them
        write_run(tmp_path / "ccat" / f"s{seed}", "ccat", seed, {"audio": 0.9, "video": video},
                  0.8, {"audio": 0.0, "video": 0.05})
    write_run(tmp_path / "concat" / "s0", "concat", 0, {"audio": 0.95, "video": 0.2}, 0.9)
    write_run(tmp_path / "unimodal" / "s0", "unimodal", 0, {"audio": 0.9, "video": 0.5}, 0.85)
    out = tmp_path / "summary.md"
    result = runner.invoke(app, ["summary", str(tmp_path / "concat"), str(tmp_path / "ccat"),
                                 str(tmp_path / "unimodal"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert "| concat | 90.0 % | 95.0 % | 20.0 % | n/a | n/a |" in lines
    assert "| ccat | 80.0 % | 90.0 % | 30.0 % | 0.0 % | 10.0 % |" in lines
    assert lines[-2] == ("Trained alone (unimodal), video's probe reaches 50.0 %; under concat "
                         "30.0 points below it, under ccat 20.0 points below it, so ccat "
                         "lifts video 10.0 points above concat.")
    assert lines[-1] == ("Fused, the unimodal ensemble (unimodal) reaches 85.0 %; concat is "
                         "5.0 points above it, ccat 5.0 points below it.")
    assert "Under concat, audio dominated" in result.stdout and "n/a" in result.stdout


def run_main(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_no_baseline_or_no_probe_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "ccat", "ccat", 0, {"audio": 0.9, "video": 0.3}, 0.8)
    code, err = run_main(["summary", tmp_path / "ccat"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: no concat run among the runs given (ccat)")
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "eval.json").write_text(json.dumps(
        {"split": "test", "accuracy": {"fused": 0.5, "audio": 0.5, "video": 0.2},
         "run": {"method": "concat", "variant": "", "dataset": "cremad", "seed": 0}}))
    code, err = run_main(["summary", tmp_path / "old"], monkeypatch, capsys)
    assert code == 2 and "the concat runs on cremad have no probe accuracies" in err


def test_make_demo_trains_the_three_methods_on_one_set_of_shards_then_summarizes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "-s", "-C", str(repo), "-o", ".venv/.installed", "demo",
                          f"DEMO_DIR={tmp_path}"], capture_output=True, text=True,
                         check=True).stdout
    loop = next(line for line in out.splitlines() if line.startswith("for m in"))
    assert loop.startswith("for m in concat ccat unimodal; do")
    assert (f"ccat train --config configs/demo.yaml --method $m --data {tmp_path}/shards "
            f"--out {tmp_path}/$m") in loop
    assert f"ccat eval --ckpt {tmp_path}/$m/best.pt --probe --json {tmp_path}/$m/eval.json" in loop
    assert out.splitlines()[-1].endswith(
        f"ccat summary {tmp_path}/concat {tmp_path}/ccat {tmp_path}/unimodal "
        f"--out {tmp_path}/summary.md")
