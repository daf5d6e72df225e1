"""``ccat-data``: build, verify, describe and synthesize datasets.

Each command parses its options, calls one library function and prints the result.
"""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import click
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ccat.data import remote, spec
from ccat.errors import UserError
from preprocess import datasets, download as downloads, verify as verifying, writer
from preprocess import launch as launching, parts as parting
from preprocess.splits import parse_split_arguments

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn raw benchmark media into verified WebDataset shards.")


class RecipeGroup(typer.core.TyperGroup):
    """A group with one command per registered recipe, added when the group is first used:
    a command that needs no recipe (``ccat-data verify``, ``info``) imports no recipe
    plugin. An unknown name is a user error naming the known ones (one sentence), not
    click's usage screen."""

    recipes_added = False

    def recipe_command(self, name: str) -> click.Command | None:
        """The command of recipe ``name`` in this group, or None when it has none."""
        raise NotImplementedError

    def _add_recipes(self) -> None:
        if self.recipes_added:
            return
        self.recipes_added = True
        sources = datasets.RECIPES.sources()
        for name in datasets.recipe_names():
            try:
                command = self.recipe_command(name)
            except datasets.RecipeError as err:  # a plugin's options clash with the common ones
                err_console.print(f"warning: recipe {name!r} ({sources[name]}) skipped: "
                                  f"{err}", markup=False, highlight=False)
                continue
            if command is not None:
                self.add_command(command, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_recipes()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_recipes()
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[Any, Any, list[str]]:
        self._add_recipes()
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            raise datasets.RecipeError(f"unknown dataset recipe {args[0]!r} for "
                                       f"`{ctx.command_path}`; known: "
                                       f"{', '.join(sorted(self.commands))}")
        return super().resolve_command(ctx, args)


class BuildGroup(RecipeGroup):
    """``ccat-data build NAME``, one command per recipe."""

    def recipe_command(self, name: str) -> click.Command | None:
        return _as_click(name, _build_command(name))


class SynthGroup(RecipeGroup):
    """``ccat-data synth NAME``, one command per recipe that has a ``synth`` class."""

    def recipe_command(self, name: str) -> click.Command | None:
        synth = datasets.get_recipe(name).synth
        return None if synth is None else _as_click(name, _synth_command(synth))


build_app = typer.Typer(cls=BuildGroup, no_args_is_help=True,
                        help="Build the shards of one dataset: one command per registered recipe.")
synth_app = typer.Typer(cls=SynthGroup, no_args_is_help=True,
                        help="Write a small synthetic raw dataset in a recipe's real layout.")
app.add_typer(build_app, name="build")
app.add_typer(synth_app, name="synth")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

Raw = Annotated[Path, typer.Option("--raw", help="The raw dataset folder.")]
Out = Annotated[Path, typer.Option("--out", help="Where the shards and manifest.json go.")]
RawOut = Annotated[Path, typer.Option(
    "--out", help="Where the raw tree goes (media and label files, not shards): pass it to "
                  "`ccat-data build DATASET --raw`.")]
Splits = Annotated[Optional[list[str]], typer.Option(
    "--split", help="NAME=FILE published split list (train, val, test); repeatable.")]


def _print_version(wanted: bool) -> None:
    if wanted:
        from preprocess import __version__

        console.print(f"ccat-data {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _app_options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """Turn raw benchmark media into verified WebDataset shards."""


def _build_options(raw: Raw, out: Out, split: Splits = None) -> None:
    """The options of every ``build NAME`` before the recipe's and writer.BuildOptions'
    (a signature only: its parameters are copied)."""


def _typer_parameters(cls: type) -> list[inspect.Parameter]:
    """Keyword-only parameters whose typer options are the dataclass's fields."""
    return [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                              annotation=Annotated[o.type, typer.Option(o.flag, help=_help(o))])
            for o in datasets.options_of(cls)]


def _help(option: datasets.Option) -> str:
    """An option's help text, with its range when it has one."""
    return f"{option.help} [range: {option.range}]" if option.range else option.help


def _command(callback: Callable[..., None], parameters: list[inspect.Parameter],
             doc: str | None) -> Callable[..., None]:
    """``callback`` with the signature typer reads its options from."""
    names = [p.name for p in parameters]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise datasets.RecipeError(f"option {', '.join(twice)} is declared twice; rename the "
                                   "recipe's field")

    def command(**values: Any) -> None:
        callback(**values)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def _as_click(name: str, command: Callable[..., None]) -> click.Command:
    """The click command typer makes of ``command``, named ``name``."""
    single = typer.Typer(add_completion=False)
    single.command(name)(command)
    return typer.main.get_command(single)


def _build_command(name: str) -> Callable[..., None]:
    """``ccat-data build NAME``: the common build options and the recipe's own."""
    factory = datasets.get_recipe(name)
    common = list(inspect.signature(_build_options, eval_str=True).parameters.values())
    common = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in common]
    recipe_fields = {o.name for o in datasets.options_of(factory)}
    launch_fields = {o.name for o in datasets.options_of(launching.LaunchOptions)}

    def run(raw: Path, out: Path, split: Optional[list[str]], **values: Any) -> None:
        recipe = _make(factory, {k: values.pop(k) for k in recipe_fields})
        launch = _make(launching.LaunchOptions, {k: values.pop(k) for k in launch_fields})
        options = _make(writer.BuildOptions, values)
        split_files = _split_files(recipe, raw, split)
        if launch.part:
            _run_part(recipe, raw, out, split_files, options, parting.Part.parse(launch.part))
        elif launch.parts:
            _run_parts(recipe, raw, out, split_files, options, launch)
        else:
            _run_build(recipe, raw, out, split_files, options)

    parameters = (common + _typer_parameters(factory) + _typer_parameters(writer.BuildOptions)
                  + _typer_parameters(launching.LaunchOptions))
    return _command(run, parameters, factory.__doc__)


def _split_files(recipe: Any, raw: Path, split: Optional[list[str]]) -> dict[str, Path]:
    """The ``--split`` files, or else the recipe's published ones under ``raw/splits``."""
    if split:
        return parse_split_arguments(split)
    published = datasets.published_split_files(recipe, raw)
    if published:
        console.print("published split files: " +
                      ", ".join(f"{k}={v}" for k, v in published.items()))
    return published


def _make(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` with every option in its range (an OptionError sentence names the
    first that is not), checked before anything is read or written."""
    made = cls(**values)
    datasets.check_options(made)
    return made


def _run_build(recipe: Any, raw: Path, out: Path, split_files: dict[str, Path],
               options: writer.BuildOptions) -> None:
    progress, tasks = _progress(), []

    def on_progress(done: int, total: int) -> None:
        if not tasks:  # the bar appears once the build starts work, not for a refusal
            progress.start()
            tasks.append(progress.add_task(f"building {recipe.name}", total=total))
        progress.update(tasks[0], completed=done, total=total)

    try:
        report = writer.build(recipe, raw, out, split_files, options, on_progress=on_progress)
    finally:
        if tasks:
            progress.stop()
    _print_build_summary(report, recipe.unit)


def _run_part(recipe: Any, raw: Path, out: Path, split_files: dict[str, Path],
              options: writer.BuildOptions, part: parting.Part) -> None:
    """``--part I/N``: this part's shards, and a line saying what is left to do."""
    with _progress() as progress:
        task = progress.add_task(f"building {recipe.name} part {part}", total=None)
        report = parting.build_part(recipe, raw, out, split_files, options, part,
                                    lambda done, total: progress.update(task, completed=done,
                                                                        total=total))
    console.print(f"part {part}: processed {report.processed} {recipe.unit} in "
                  f"{report.seconds:.1f} s on {report.workers} "
                  f"{'process' if report.workers == 1 else 'processes'}; reused "
                  f"{report.resumed_shards} finished shards")
    if report.manifest:
        console.print(f"{out} is merged already: fingerprint {report.manifest['fingerprint']}")
    else:
        console.print(f"once every part is done: ccat-data merge {out}")


def _run_parts(recipe: Any, raw: Path, out: Path, split_files: dict[str, Path],
               options: writer.BuildOptions, launch: Any) -> None:
    """``--parts N``: launch them, show progress over parts and shards, merge."""
    with _progress() as progress:
        parts = progress.add_task("parts done", total=launch.parts)
        shards = progress.add_task(f"shards of {recipe.name} recorded", total=None)

        def on_progress(done: int, recorded: int, total: int) -> None:
            progress.update(parts, completed=done)
            progress.update(shards, completed=recorded, total=total)

        manifest = launching.launch(recipe, raw, out, split_files, options, launch, on_progress,
                                    lambda sentence: progress.console.print(sentence))
    console.print(f"merged {launch.parts} parts ({launch.launcher}; logs in "
                  f"{launching.log_folder(out)})")
    _print_splits(manifest, out)
    console.print(f"fingerprint {manifest['fingerprint']}")


@app.command()
def merge(out: Annotated[Path, typer.Argument(help="The --out folder every part built into.")],
          ) -> None:
    """Write manifest.json of a build in parts (`build NAME ... --part I/N`) once every
    part is finished; refuses, naming it, a part missing, unfinished or of another plan."""
    manifest = parting.merge(out)
    _print_splits(manifest, out)
    console.print(f"fingerprint {manifest['fingerprint']}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _print_build_summary(report: writer.BuildReport, unit: str) -> None:
    manifest = report.manifest
    _print_splits(manifest, report.out)
    console.print(f"processed {report.processed} {unit} in {report.seconds:.1f} s "
                  f"({report.clips_per_second:.1f} {unit}/s) on {report.workers} "
                  f"{'process' if report.workers == 1 else 'processes'}; reused "
                  f"{report.resumed_shards} finished shards")
    if report.rebuilt:
        console.print(f"rebuilt {len(report.rebuilt)} shards whose bytes did not match their "
                      "record: " + ", ".join(f"{name} ({why})" for name, why in
                                             sorted(report.rebuilt.items())))
    if report.first_sample_s is not None:
        console.print(f"first sample done {report.first_sample_s:.2f} s after the start")
    if report.unlisted:
        console.print(f"{report.unlisted} {unit} found on disk are in no split file (not built)")
    console.print(f"fingerprint {manifest['fingerprint']}")


def _print_splits(manifest: dict[str, Any], out: Path) -> None:
    """The table of a build's splits, then its skipped samples."""
    table = Table(title=f"{manifest['dataset']} -> {out}")
    for column in ("split", "samples", "shards", "size"):
        table.add_column(column, justify="left" if column == "split" else "right")
    total_bytes = 0
    for name, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"])
        total_bytes += size
        table.add_row(name, str(entry["num_samples"]), str(len(entry["shards"])), _size(size))
    table.add_row("all", str(sum(e["num_samples"] for e in manifest["splits"].values())),
                  str(sum(len(e["shards"]) for e in manifest["splits"].values())),
                  _size(total_bytes), style="bold")
    console.print(table)
    _print_skipped(manifest)


def _print_skipped(manifest: dict[str, Any]) -> None:
    reasons = verifying.skipped_by_reason(manifest)
    if not reasons:
        console.print("skipped: none")
        return
    table = Table(title=f"skipped {sum(reasons.values())} samples (ids in manifest.json)")
    table.add_column("reason")
    table.add_column("samples", justify="right")
    by_split = Counter((s["reason"], s["split"] or "none") for s in manifest["skipped"])
    splits = sorted({split for _, split in by_split}, key=_split_rank)
    for split in splits:  # per split too: e.g. listed clips whose media are gone
        table.add_column(split, justify="right")
    for reason, count in reasons.most_common():
        table.add_row(reason, str(count), *(str(by_split[reason, s]) for s in splits))
    console.print(table)


def _split_rank(name: str) -> tuple[int, str]:
    order = (*spec.SPLIT_NAMES, "none")
    return (order.index(name) if name in order else len(order), name)


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


Location = Annotated[str, typer.Argument(
    help="A built dataset: a folder, an http(s):// URL or any fsspec URL (s3://, gs://, ...).")]
@app.command()
def verify(location: Location, cache_dir: Annotated[Optional[Path], typer.Option(
        help="Also keep the shards of a URL here as they are verified, for training to "
             "reuse (default: keep nothing).")] = None) -> None:
    """Recompute every sha256 and count, decode every sample, check shapes and dtypes, and
    that the shards' keys and labels are the membership the fingerprint covers.

    A URL is verified from the bytes its server sends, not from a local cache.
    """
    if cache_dir and not remote.is_remote(location):
        raise typer.BadParameter(f"--cache-dir keeps the shards of a URL; {location} is a "
                                 "local folder already")
    source = verifying.open_source(location, cache_dir)
    total = sum(len(e["shards"]) for e in source.manifest["splits"].values())
    with _progress() as progress:
        task = progress.add_task(f"verifying {location}", total=total)
        try:
            report = verifying.verify(source, on_shard=lambda _: progress.advance(task))
        except verifying.VerifyError as err:
            progress.stop()
            err_console.print(f"[red]verify failed:[/red] {escape(str(err))}")
            raise typer.Exit(1) from None
    fingerprint = source.manifest["fingerprint"][:spec.SHORT_HASH]
    console.print(f"[green]ok[/green]: {report.shards} shards, {report.samples} samples, "
                  f"{_size(report.bytes)} match the manifest of {location}: every shard's "
                  "size and sha256, every sample decoded to its shapes, and their keys and "
                  f"labels are exactly the membership fingerprint {fingerprint} covers, each "
                  "key once (docs/format.md, \"What verify proves\")")


@app.command()
def info(location: Location) -> None:
    """Splits, counts, class histogram per split, parameters and fingerprint."""
    manifest = (remote.load_manifest(location) if remote.is_remote(location)
                else spec.load_manifest(Path(location)))
    console.print(f"[bold]{manifest['dataset']}[/bold] (spec v{manifest['spec_version']}, "
                  f"built by ccat-data {manifest['tool_version']})")
    table = Table(title="samples per class")
    table.add_column("split")
    for name in manifest["classes"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    table.add_column("shards", justify="right")
    for name, entry in manifest["splits"].items():
        counts = entry.get("class_counts", ["?"] * len(manifest["classes"]))
        table.add_row(name, *map(str, counts), str(entry["num_samples"]), str(len(entry["shards"])))
    console.print(table)
    params = Table(title="preprocessing parameters")
    params.add_column("parameter")
    params.add_column("value")
    for key, value in spec.fingerprint_params(manifest).items():
        if key.startswith(("modalities.", "sources.")) and not key.startswith("sources.raw."):
            params.add_row(key, str(value))
    console.print(params)
    _print_identity(manifest)
    _print_skipped(manifest)
    console.print(f"fingerprint {manifest['fingerprint']}")


def _print_identity(manifest: dict[str, Any]) -> None:
    """What the fingerprint covers besides parameters: membership and raw content (plain
    lines, so the full hashes can be compared by eye or by grep)."""
    console.print("[bold]identity[/bold] (covered by the fingerprint, with the parameters)")
    for name, entry in manifest["splits"].items():
        console.print(f"  {name} membership ({entry['num_samples']} keys): "
                      f"{entry.get('membership_sha256')}")
    raw = manifest["sources"].get("raw", {})
    algorithm = next((k for k in raw if k != "num_files"), "sha256")
    console.print(f"  raw content ({raw.get('num_files', '?')} files): {algorithm} "
                  f"{raw.get(algorithm)}")
    for name, digest in manifest["sources"].get("split_files", {}).items():
        console.print(f"  list file {name}: {digest}")


def _synth_command(synth: type) -> Callable[..., None]:
    """``ccat-data synth NAME``: --out and the options of the recipe's ``synth`` class."""
    out = inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=RawOut)

    def run(out: Path, **values: Any) -> None:
        writer_ = _make(synth, values)
        with _progress() as progress:
            task = progress.add_task(f"writing {synth.title}", total=writer_.total)
            summary = writer_.write(out, lambda n: progress.update(task, completed=n))
        console.print(summary)

    return _command(run, [out, *_typer_parameters(synth)], synth.__doc__)


def _download_help() -> str:
    """The download command's help: what each dataset gets, and what to fetch by hand."""
    lines = ["Fetch what can be fetched into OUT/DATASET; say what to fetch by hand."]
    for name, published in datasets.iter_published():
        if published.media_repo:
            lines.append(f"{name}: the media (a git + git-lfs clone of {published.media_repo}) "
                         "and the published lists.")
        elif not published.lists_url:
            lines.append(f"{name}: nothing to fetch (the lists come with the media). "
                         + published.media_by_hand.format(target=f"OUT/{name}") + ".")
        else:
            lines.append(f"{name}: the published lists only. "
                         + published.media_by_hand.format(target=f"OUT/{name}") + ".")
    return "\n\n".join(lines)


class DownloadCommand(typer.core.TyperCommand):
    """The download command, whose help lists the recipes when it is shown, not at import
    (which would import every recipe plugin for any command)."""

    @property  # type: ignore[override]
    def help(self) -> str:
        return _download_help()

    @help.setter
    def help(self, value: str | None) -> None:
        """typer sets the docstring; the list replaces it."""


@app.command(cls=DownloadCommand)
def download(
    dataset: Annotated[str, typer.Argument(help="A recipe with published split files (listed "
                                                "above).")],
    out: Annotated[Path, typer.Option(help="Where the raw data goes.")] = Path("data/raw"),
) -> None:
    """Fetch what can be fetched; otherwise say what to install or where to get it."""
    for line in downloads.download(dataset, out):
        console.print(line)


def main() -> None:
    """Console-script entry: user errors become one red sentence and exit code 1 (2 for an
    option out of its range: a usage error, as click's own)."""
    try:
        app()
    except datasets.OptionError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise SystemExit(2) from None
    except UserError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
