"""The ``ccat`` command: train, eval, probe, report, summary, results, analyze, export,
sweep, list. Each command parses, builds a config, calls one library function; user errors
print one sentence and exit non-zero."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ccat.run_config import load_config
from ccat.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate balanced multimodal models from shards.")
console = Console(stderr=True)

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report it
DEVICE_OPTION = typer.Option(None, help="auto, cpu or cuda; default: the run's device")


def _print_version(wanted: bool) -> None:
    if wanted:
        from ccat import __version__

        Console().print(f"ccat {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version,
                                          is_eager=True, help="Print the version and exit.")
             ) -> None:
    """Train and evaluate balanced multimodal models from shards."""


@contextlib.contextmanager
def interruptions_speak() -> Iterator[None]:
    """Ctrl-C in training: one line saying where it stopped, what was saved and the
    command that continues it (or, for an ``--overwrite`` stopped before its first
    checkpoint, starts it again); exit code 130."""
    from ccat.train import Interrupted

    try:
        yield
    except Interrupted as err:
        then = (f"continue with: {resume_command(sys.argv[1:])}" if err.resumable
                else f"start it again with: {shlex.join(['ccat', *sys.argv[1:]])}")
        console.print(f"[yellow]interrupted:[/yellow] {escape(str(err))}; {escape(then)}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None


@contextlib.contextmanager
def grid_interruptions(what: str) -> Iterator[None]:
    """Ctrl-C in a grid or sweep (the runs' own ``ccat train`` processes are interrupted
    with it and say where each stopped): one line, exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/yellow] {what} stopped; run the same command "
                      f"again to continue it (finished runs are reused, stopped ones resume)",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None


# The launch options that `ccat grid` and `ccat sweep` share (ccat.grid.GridOptions).
LAUNCHER = typer.Option("local", help="local (processes here) or slurm")
JOBS = typer.Option(1, help="local: runs at once, each on its own GPU if any")
PARTITION = typer.Option("", help="slurm: partition (default: the cluster's)")
TIME_LIMIT = typer.Option(1440, "--time", help="slurm: minutes per run (a run past it is "
                          "requeued and resumes)")
GPUS_PER_RUN = typer.Option(1, help="slurm: GPUs per run")
CPUS_PER_RUN = typer.Option(4, help="slurm: CPUs per run")
SLURM_OPTION = typer.Option([], help="slurm: KEY=VALUE sbatch option, repeatable")


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted training: ``ccat train`` gets
    ``--resume`` (and loses ``--overwrite``); ``ccat sweep`` resumes when run again."""
    args = [a for a in argv if a != "--overwrite"]
    if args[:1] == ["train"] and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["ccat", *args])


@app.command()
def train(config: Path = typer.Option(..., "--config", help="YAML config file"),
          method: Optional[str] = typer.Option(None, help="method name (see `ccat list`)"),
          data: Optional[str] = typer.Option(None, help="built dataset folder"),
          out: Optional[str] = typer.Option(None, help="run folder"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. optim.epochs=10"),
          resume: bool = typer.Option(False, help="continue the run in OUT (from last.pt), "
                                      "with its settings"),
          overwrite: bool = typer.Option(False, help="replace the run in OUT: its files are "
                                         "set aside once every check passes, and deleted "
                                         "at the new run's first checkpoint")) -> None:
    """Train every stage of a method on built shards."""
    from ccat.train import train as run_training

    cfg = load_config(config, set_, {"method.name": method, "data.path": data, "out": out})
    with interruptions_speak():
        run_training(cfg, resume=resume, overwrite=overwrite)


@app.command("eval")
def evaluate(ckpt: Path = typer.Option(..., help="checkpoint (best.pt or last.pt)"),
             data: Optional[str] = typer.Option(None, help="built dataset; default: the run's"),
             split: str = typer.Option("test", help="split to evaluate"),
             json_path: Optional[Path] = typer.Option(None, "--json", help="write metrics here"),
             probe: bool = typer.Option(False, help="add each modality's linear-probe "
                                        "accuracy (see `ccat probe`)"),
             device: Optional[str] = DEVICE_OPTION) -> None:
    """Evaluate a checkpoint: fused and per-modality accuracy, macro-F1, contributions."""
    from ccat.evaluate import evaluate_checkpoint

    probe_checkpoint = None
    if probe:  # sklearn is imported only when asked for
        from ccat.analysis.probe import probe_checkpoint
    evaluate_checkpoint(ckpt, data, split, json_path, probe_checkpoint, device)


@app.command("probe")
def probe(ckpt: Path = typer.Option(..., help="checkpoint (best.pt or last.pt)"),
          data: Optional[str] = typer.Option(None, help="built dataset; default: the run's"),
          split: str = typer.Option("test", help="split the probe is scored on"),
          json_path: Optional[Path] = typer.Option(None, "--json", help="write the probe here"),
          device: Optional[str] = DEVICE_OPTION) -> None:
    """Linear probe per modality on the frozen encoders: fit on train, accuracy on SPLIT."""
    from ccat.analysis.probe import probe as run_probe

    run_probe(ckpt, data, split, json_path, device)


@app.command("report")
def report(run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR",
                                                 help="run folders or folders of runs"),
           fmt: str = typer.Option("table", "--format",
                                   help="what to print: table (rich), markdown or csv"),
           out: Optional[Path] = typer.Option(None, help="also write OUT/table.md, table.csv"),
           split: str = typer.Option("test", help="use eval JSON of this split")) -> None:
    """Compare evaluated runs: methods x datasets, mean ± std over seeds, best in bold."""
    from ccat.report import report as make_report

    make_report(run_dirs, fmt, out, split)


@app.command("summary")
def summary(run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR",
                                                  help="run folders or folders of runs"),
            baseline: str = typer.Option("concat", help="method whose imbalance is described"),
            reference: str = typer.Option("unimodal", help="method giving each modality's "
                                          "level when trained alone"),
            out: Optional[Path] = typer.Option(None, help="also write the summary here "
                                               "(Markdown)"),
            split: str = typer.Option("test", help="use eval JSON of this split")) -> None:
    """Which modality dominated and how far the weak one is from its unimodal level."""
    from ccat.story import summary as make_summary

    make_summary(run_dirs, baseline, reference, out, split)


@app.command("results")
def results(run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR",
                                                  help="run folders or folders of runs"),
            out: Path = typer.Option(Path("docs/results.md"), help="Markdown page to write"),
            figures: Path = typer.Option(Path("docs/img"), help="folder for its figure"),
            command: str = typer.Option(..., help="the exact command that made the runs"),
            split: str = typer.Option("test", help="use eval JSON of this split")) -> None:
    """Write the results page: stamp, table, figure and summary, from evaluated runs."""
    from ccat.results import results as write_results

    write_results(run_dirs, out, figures, command, split)


@app.command("analyze")
def analyze(run: Optional[Path] = typer.Argument(None, help="run folder (its metrics.jsonl)"),
            ckpt: Optional[Path] = typer.Option(None, help="checkpoint for --tsne; "
                                                "default RUN/best.pt"),
            tsne: bool = typer.Option(False, help="t-SNE and cluster scores of the features"),
            split: str = typer.Option("test", help="split whose features --tsne maps"),
            data: Optional[str] = typer.Option(None, help="built dataset; default: the run's"),
            out: Optional[Path] = typer.Option(None, help="folder for the files; default: "
                                               "RUN/plots and CKPT's folder/analysis"),
            device: Optional[str] = DEVICE_OPTION) -> None:
    """Plot a run's contribution and accuracy curves; with --tsne, its feature geometry."""
    from ccat.analysis.analyze import analyze as run_analysis

    run_analysis(run, ckpt, tsne, split, data, out, device)


@app.command("export")
def export(ckpt: Path = typer.Option(..., help="checkpoint (best.pt or last.pt)"),
           out: Path = typer.Option(..., help="HDF5 file to write, e.g. feats.h5"),
           split: str = typer.Option("test", help="split to export"),
           data: Optional[str] = typer.Option(None, help="built dataset; default: the run's"),
           device: Optional[str] = DEVICE_OPTION) -> None:
    """Write per-sample keys, labels, embeddings, logits and contributions to HDF5."""
    from ccat.analysis.export import export as run_export

    run_export(ckpt, out, data, split, device)


@app.command("sweep")
def sweep(config: Path = typer.Option(..., "--config", help="YAML config file"),
          rank: str = typer.Option("1,2,4,8,16", help="LoRA ranks: 1,2,4 or start:stop:step"),
          beta: str = typer.Option("0.05:0.40:0.05", help="betas: 0.1,0.2 or start:stop:step"),
          data: Optional[str] = typer.Option(None, help="built dataset folder"),
          out: Optional[Path] = typer.Option(None, help="sweep folder; default: beside the "
                                             "config's run folder, named sweep"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. optim.epochs=10"),
          launcher: str = LAUNCHER, jobs: int = JOBS, partition: str = PARTITION,
          time_limit: int = TIME_LIMIT, gpus_per_run: int = GPUS_PER_RUN,
          cpus_per_run: int = CPUS_PER_RUN, slurm_option: list[str] = SLURM_OPTION) -> None:
    """Search the LoRA rank at the config's beta, then beta at the best rank (validation).
    Each phase's runs go through `ccat grid`'s launchers: --jobs K at once here, or Slurm."""
    from ccat import grid as grids
    from ccat.sweep import Command, parse_grid, sweep as run_sweep

    cfg = load_config(config, set_, {"data.path": data})
    ranks, betas = parse_grid(rank, "--rank", integer=True), parse_grid(beta, "--beta")
    launch = grids.GridOptions(launcher, jobs, partition, time_limit, gpus_per_run,
                               cpus_per_run, grids.slurm_options(slurm_option))
    with grid_interruptions("the sweep"):
        run_sweep(cfg, ranks, betas, out or Path(cfg.out).parent / "sweep",
                  Command(config, cfg.data.path, tuple(set_)), launch)


@app.command("grid", context_settings={"allow_extra_args": True,
                                        "ignore_unknown_options": True})
def grid(ctx: typer.Context,
         config: Path = typer.Option(..., "--config", help="YAML config file"),
         data: str = typer.Option(..., help="built dataset folder"),
         methods: str = typer.Option(..., help="methods, e.g. 'sum ccat' or sum,ccat"),
         seeds: str = typer.Option("0 1 2", help="seeds, e.g. '0 1 2' or 0,1,2"),
         out: Path = typer.Option(..., help="folder of the runs: OUT/<method>/s<seed>"),
         set_: list[str] = typer.Option([], "--set", help="override for every run"),
         method_args: list[str] = typer.Option([], help="METHOD=ARGS: more `ccat train` "
                                               "arguments for one method's runs; repeatable"),
         variant: list[str] = typer.Option([], help="NAME=METHOD [ARGS]: runs OUT/NAME/s<seed> "
                                           "of METHOD with ARGS (an ablation); repeatable"),
         launcher: str = LAUNCHER,
         jobs: int = JOBS,
         keep_going: bool = typer.Option(False, help="train the other runs past a failed one "
                                         "(make -k), then name every failed run"),
         dry_run: bool = typer.Option(False, help="print each run's commands, run nothing "
                                      "(make -n)"),
         report: Optional[Path] = typer.Option(None, help="folder of the report (table.md); "
                                               "default: OUT"),
         no_report: bool = typer.Option(False, help="train and evaluate only"),
         partition: str = PARTITION, time_limit: int = TIME_LIMIT,
         gpus_per_run: int = GPUS_PER_RUN, cpus_per_run: int = CPUS_PER_RUN,
         slurm_option: list[str] = SLURM_OPTION) -> None:
    """Train and evaluate every (method, seed) run, as `make table` does, then the report.
    Arguments after `--` go to every run's `ccat train`, after its own (the Makefile's ARGS)."""
    from ccat import grid as grids
    from ccat.report import report as make_report

    names, numbers = grids.split_list(methods), grids.split_list(seeds)
    variants = grids.variants_of(names, method_args, variant)
    runs = grids.runs_of(config, data, variants, grids.seeds_of(numbers), out,
                         [a for s in set_ for a in ("--set", s)], ctx.args)
    folders, report_out = [run.folder for run in runs], report or out
    if dry_run:
        grids.dry_run(runs)
        if not no_report:
            print(shlex.join([sys.executable, "-m", "ccat", "report", *map(str, folders),
                              "--out", str(report_out)]))
        return
    options = grids.GridOptions(launcher, jobs, partition, time_limit, gpus_per_run,
                                cpus_per_run, grids.slurm_options(slurm_option), keep_going)
    with grid_interruptions("the grid"):
        grids.grid(runs, options, out, lambda run: console.print(f"done: {run.folder}"))
    if not no_report:
        make_report(folders, "table", report_out, "test")


@app.command("list")
def list_registered() -> None:
    """Print the registered methods, encoders, fusions and dataset recipes, each with where
    it comes from: builtin, or the plugin distribution and version that adds it."""
    from ccat.methods import METHODS
    from ccat.models import ENCODERS, FUSIONS
    from preprocess.datasets import RECIPES

    table = Table("kind", "name", "from", box=None)
    for registry in (METHODS, ENCODERS, FUSIONS, RECIPES):
        for name, source in registry.sources().items():
            table.add_row(registry.kind, name, source)
    Console().print(table)


def main() -> None:
    """Console-script entry: run the app, turning user errors into one line."""
    try:
        app()
    except UserError as err:
        console.print(f"[red]error{_rank_tag()}:[/red] {escape(str(err))}", highlight=False,
                      soft_wrap=True)
        raise SystemExit(2) from None


def _rank_tag() -> str:
    """' (rank 1 of 2)' under torchrun, where every rank that hits an error prints it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
