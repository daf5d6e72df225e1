"""``ccat results`` and ``make results``: the page is stamped with the commit, whether the
tree had changes and the exact command; it holds one table row per method with the std over
seeds, a real figure and the summary's sentences."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ccat.cli import app, main
from test_story import write_run

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
COMMAND = 'make results METHODS="concat ccat" SEEDS="0 1" RESULTS_ARGS=""'


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout holding one committed file, with two methods x two seeds of runs
    (ignored, as runs/ is in the project), as the working directory."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "start")
    for seed in (0, 1):
        write_run(tmp_path / "runs" / "concat" / f"s{seed}", "concat", seed,
                  {"audio": 0.9 + 0.05 * seed, "video": 0.2}, 0.9)
        write_run(tmp_path / "runs" / "ccat" / f"s{seed}", "ccat", seed,
                  {"audio": 0.85, "video": 0.3 + 0.1 * seed}, 0.8, {"audio": 0.0, "video": 0.1})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_results(root: Path, command: str = COMMAND):
    return runner.invoke(app, ["results", str(root / "runs"), "--out", "docs/results.md",
                               "--figures", "docs/img", "--command", command])


def test_page_has_stamp_table_figure_and_sentences(checkout):
    result = write_results(checkout)
    assert result.exit_code == 0, result.output
    page = (checkout / "docs" / "results.md").read_text()
    commit = git(checkout, "rev-parse", "HEAD")
    assert f"Made by `{COMMAND}` at commit `{commit}` (clean)" in page
    table = page[page.index("| method"):].split("\n\n")[0].splitlines()
    rows = [line for line in table if "---" not in line]
    # one row per method, ranked by fused accuracy (concat 0.9, ccat 0.8)
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| concat", "| ccat"]
    concat = rows[1].split(" | ")
    assert "**92.50 ± 3.54**" in concat  # best probe audio: 0.90 and 0.95 over the two seeds
    assert "4 runs; their training epochs took 20 s" in page  # 2 s per epoch: 2 x 2 + 2 x 3
    assert "![fused accuracy and probes per method](img/results_accuracy.png)" in page
    assert "Under concat, audio dominated: its probe reached 92.5 %" in page
    # the fused comparison, paired by seed: ccat is 10 points below concat in both seeds
    assert "| ccat | 80.00 | -10.0 ± 0.0 | -10.0 |" in page
    assert "Above concat in every seed: none." in page
    with Image.open(checkout / "docs" / "img" / "results_accuracy.png") as figure:
        assert figure.format == "PNG" and figure.width > 300


def test_changes_to_tracked_files_are_stamped_but_its_own_output_is_not(checkout):
    assert write_results(checkout).exit_code == 0
    git(checkout, "add", "docs")
    git(checkout, "commit", "-q", "-m", "results")
    assert write_results(checkout, "make results SEEDS=0").exit_code == 0  # rewrites docs/
    assert "(clean)" in (checkout / "docs" / "results.md").read_text()
    (checkout / "code.py").write_text("x = 2\n")
    assert write_results(checkout).exit_code == 0
    assert "(uncommitted changes to 1 tracked file)" in (
        checkout / "docs" / "results.md").read_text()


def test_outside_a_checkout_the_commit_is_unknown_and_an_empty_command_refused(
        tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "runs" / "concat" / "s0", "concat", 0, {"audio": 0.9, "video": 0.2},
              0.9)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert write_results(tmp_path).exit_code == 0
    page = (tmp_path / "docs/results.md").read_text()
    assert "an unknown commit (not a git checkout)" in page and "1 run; their" in page
    (tmp_path / "runs" / "concat" / "s0" / "metrics.jsonl").unlink()  # no training time
    assert write_results(tmp_path).exit_code == 0
    assert "1 run; 1 of them did not record their training time." in (
        tmp_path / "docs/results.md").read_text()
    (tmp_path / "blocked").write_text("a file where --out needs a folder")
    monkeypatch.setattr(sys, "argv", ["ccat", "results", "runs", "--command", "make results",
                                      "--out", "blocked/results.md"])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: cannot write ")
    assert "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["ccat", "results", "runs", "--command", " "])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: --command is empty")


def test_make_results_dry_run(tmp_path):
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "-o", ".venv/.installed",
                          "results", "METHODS=concat reconboost", "SEEDS=0 1",
                          f"RESULTS_DIR={tmp_path}", "RESULTS_ARGS=--set optim.epochs=2"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert any(f"synth cremad --out {tmp_path}/raw" in line
               and f"build cremad --raw {tmp_path}/raw --out {tmp_path}/shards" in line
               for line in lines)
    train_lines = [line for line in lines if " train " in line]
    assert len(train_lines) == 4
    # each run's arguments in the order the per-run make rules gave them: seed, protocol,
    # the method's DEMO_SCHEDULE, RESULTS_ARGS
    schedule = {"concat": "", "reconboost": " --set method.params.boost_epochs=1 "
                                            "--set method.params.rectify_epochs=1"}
    for method in ("concat", "reconboost"):
        for seed in (0, 1):
            assert any(f"--method {method} " in line and "--config configs/demo.yaml" in line
                       and f"--data {tmp_path}/shards" in line
                       and f"--out {tmp_path}/{method}/s{seed} " in line
                       and line.endswith(f"--set seed={seed} --set protocol=shared"
                                         f"{schedule[method]} --set optim.epochs=2")
                       for line in train_lines)
    assert not any(" report " in line for line in lines)
    assert any(" results " in line and "--out docs/results.md" in line for line in lines)
    assert ("--command 'make results METHODS=\"concat reconboost\" SEEDS=\"0 1\" "
            "RESULTS_ARGS=\"--set optim.epochs=2\"'") in out


def test_page_says_which_code_trained_the_runs(checkout):
    import json

    for seed, code in ((0, ["commit `a1` (clean)"]), (1, ["commit `a1` (clean)", "commit `b2` (clean)"])):
        path = checkout / "runs" / "ccat" / f"s{seed}" / "eval.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "code": code}))
    assert write_results(checkout).exit_code == 0
    page = (checkout / "docs" / "results.md").read_text()
    assert ("Trained: 2 runs at commit `a1` (clean), 1 run at commit `b2` (clean) and 2 runs "
            "before checkpoints recorded their code.") in page


def test_page_names_the_params_that_differ_from_each_methods_defaults(checkout):
    from ccat.config import RunConfig, save_config

    for seed in (0, 1):
        cfg = RunConfig()
        cfg.method.name, cfg.method.params = "ccat", {"beta": 0.3, "rank": 2}  # rank 2: the default
        save_config(cfg, checkout / "runs" / "ccat" / f"s{seed}" / "config.yaml")
        cfg.method.name, cfg.method.params = "concat", {}
        save_config(cfg, checkout / "runs" / "concat" / f"s{seed}" / "config.yaml")
    assert write_results(checkout).exit_code == 0
    page = (checkout / "docs" / "results.md").read_text()
    assert "## Settings that differ from the methods' defaults" in page
    assert "- ccat: `method.params.beta=0.3`\n" in page and "- concat" not in page


def test_page_has_no_settings_section_when_every_run_used_the_defaults(checkout):
    from ccat.config import RunConfig, save_config

    for method in ("ccat", "concat"):
        for seed in (0, 1):
            cfg = RunConfig()
            cfg.method.name = method
            save_config(cfg, checkout / "runs" / method / f"s{seed}" / "config.yaml")
    assert write_results(checkout).exit_code == 0
    assert "Settings that differ" not in (checkout / "docs" / "results.md").read_text()


def test_page_says_whose_settings_it_could_not_read(checkout):
    """The fixture's runs have no config.yaml: their settings are unknown, not defaults."""
    assert write_results(checkout).exit_code == 0
    page = (checkout / "docs" / "results.md").read_text()
    assert "- concat: 2 runs without a readable config.yaml, settings unknown" in page


def test_figure1_compares_the_contribution_gaps_of_concat_mla_and_ccat(tmp_path, monkeypatch):
    """The paper's Figure 1 on the runs: the gaps over the last epochs, and sentences that
    follow them (here MLA narrows Concat's gap and CCAT narrows it further)."""
    gaps = {"concat": 0.4, "mla": 0.2, "ccat": 0.1}  # |audio - video| in every epoch
    for method, gap in gaps.items():
        folder = tmp_path / "runs" / method / "s0"
        write_run(folder, method, 0, {"audio": 0.9, "video": 0.5}, 0.8)
        rows = [{"stage": "joint", "epoch": e, "train_s": 2.0, "samples_per_s": 100.0,
                 "val/acc/fused": 0.8, "val/acc/audio": 0.8, "val/acc/video": 0.5,
                 "val/contrib/audio": 0.5 + gap / 2, "val/contrib/video": 0.5 - gap / 2}
                for e in (1, 2, 3)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["results", "runs", "--out", "docs/results.md", "--figures",
                                 "docs/img", "--command", "make results"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "![contribution of each modality per epoch](img/results_contributions.png)" in page
    assert "concat 40.0 points, mla 20.0 points, ccat 10.0 points" in page
    assert "Alternation (mla) narrows the gap of joint training (concat)." in page
    assert "CCAT's gap is smaller than concat's and smaller than mla's" in page
    with Image.open(tmp_path / "docs" / "img" / "results_contributions.png") as figure:
        assert figure.format == "PNG" and figure.width > 600


def test_fused_comparison_gives_each_methods_cost_over_concat_seed_by_seed(tmp_path,
                                                                          monkeypatch):
    """Cost is training wall-clock over Concat's, paired by seed: ccat takes 3 s an epoch in
    seed 0 and 4 s in seed 1 against Concat's 2 s, so 1.75x."""
    for method, per_epoch in {"concat": (2.0, 2.0), "ccat": (3.0, 4.0)}.items():
        for seed, seconds in enumerate(per_epoch):
            folder = tmp_path / "runs" / method / f"s{seed}"
            write_run(folder, method, seed, {"audio": 0.9, "video": 0.5}, 0.8)
            rows = [{"stage": "joint", "epoch": e, "train_s": seconds, "samples_per_s": 100.0,
                     "val/acc/fused": 0.8} for e in (1, 2)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["results", "runs", "--out", "docs/results.md", "--figures",
                                 "docs/img", "--command", "make results"])
    assert result.exit_code == 0, result.output
    rows = {line.split(" | ")[0].strip("| "): line for line in
            (tmp_path / "docs" / "results.md").read_text().splitlines()
            if line.endswith("x |")}
    assert rows["ccat"].endswith("| 1.75x |") and rows["concat"].endswith("| 1.00x |")
