"""``ccat-data``: build, verify, describe and synthesize datasets.

Each command parses its options, calls one library function and prints the result.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ccat.data import remote, spec
from preprocess import check, download as downloads, media, writer
from preprocess.datasets import LayoutError, cremad, ks, mvsa
from preprocess.splits import SplitError, parse_split_arguments
from preprocess.text import TokenizerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn raw benchmark media into verified WebDataset shards.")
build_app = typer.Typer(no_args_is_help=True, help="Build the shards of one dataset.")
synth_app = typer.Typer(no_args_is_help=True, help="Write a small synthetic raw dataset.")
app.add_typer(build_app, name="build")
app.add_typer(synth_app, name="synth")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
USER_ERRORS = (LayoutError, SplitError, writer.BuildError, spec.SpecError, check.VerifyError,
               remote.RemoteError,
               downloads.DownloadError, media.MediaError, TokenizerError)

Raw = Annotated[Path, typer.Option("--raw", help="The raw dataset folder.")]
Out = Annotated[Path, typer.Option("--out", help="Where the shards and manifest.json go.")]
Splits = Annotated[Optional[list[str]], typer.Option(
    "--split", help="NAME=FILE published split list (train, val, test); repeatable.")]
Workers = Annotated[int, typer.Option(help="Processes (default: all cores).")]
ShardSize = Annotated[int, typer.Option(help="Samples per shard.")]
Seed = Annotated[int, typer.Option(help="Seed of the stratified splits.")]
ValFraction = Annotated[float, typer.Option(help="Share of train carved out as validation.")]
TestFraction = Annotated[float, typer.Option(
    help="Share held out as test when no split files are given.")]
Strict = Annotated[bool, typer.Option(help="Stop at the first bad sample instead of skipping it.")]
Overwrite = Annotated[bool, typer.Option(
    help="Remove the build (finished or interrupted) that --out holds and start afresh.")]
FrameSize = Annotated[int, typer.Option(help="Side of the square stored frames, px.")]
NumFrames = Annotated[int, typer.Option(help="Frames sampled per clip (segment centres).")]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@build_app.command("cremad")
def build_cremad(
    raw: Raw, out: Out, split: Splits = None,
    seconds: Annotated[float, typer.Option(
        help="Fixed audio duration: 3.0 as in the published CREMA-D code; the paper states 20."
    )] = cremad.DEFAULT_SECONDS,
    frame_size: FrameSize = 224, num_frames: NumFrames = 3, workers: Workers = 0,
    shard_size: ShardSize = 256, seed: Seed = 0, val_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.1, strict: Strict = False, overwrite: Overwrite = False,
) -> None:
    """CREMA-D: AudioWAV/<id>.wav + VideoFlash/<id>.flv -> audio spectrograms + frames."""
    recipe = cremad.Cremad(audio=media.AudioParams(seconds=seconds),
                           video=media.VideoParams(num_frames=num_frames, size=frame_size))
    _run_build(recipe, raw, out, parse_split_arguments(split or []),
               _options(seed, val_fraction, test_fraction, shard_size, workers, strict, overwrite))


@build_app.command("ks")
def build_ks(
    raw: Raw, out: Out, split: Splits = None,
    classes: Annotated[Optional[Path], typer.Option(
        help="Class names, one a line, in label order (the lists' label indices).")] = None,
    seconds: Annotated[float, typer.Option(
        help="Fixed audio duration: the clips' 10 s.")] = ks.DEFAULT_SECONDS,
    frame_size: FrameSize = 224, num_frames: NumFrames = 3, workers: Workers = 0,
    shard_size: ShardSize = 256, seed: Seed = 0, val_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.1, strict: Strict = False, overwrite: Overwrite = False,
) -> None:
    """Kinetics-Sounds: clips (.mp4/.mkv/.webm/.avi, flat or per class) -> spectrograms + frames."""
    recipe = ks.KineticsSounds(audio=media.AudioParams(seconds=seconds),
                               video=media.VideoParams(num_frames=num_frames, size=frame_size),
                               classes_file=classes)
    _run_build(recipe, raw, out, parse_split_arguments(split or []),
               _options(seed, val_fraction, test_fraction, shard_size, workers, strict, overwrite))


@build_app.command("mvsa")
def build_mvsa(
    raw: Raw, out: Out, split: Splits = None,
    labels: Annotated[str, typer.Option(
        help="agree: text and image labels equal (the published rule); resolve: drop "
             "positive/negative conflicts, neutral yields.")] = "agree",
    multiple: Annotated[bool, typer.Option(
        help="MVSA-Multiple: three annotator columns, majority vote per modality.")] = False,
    tokenizer: Annotated[str, typer.Option(
        help="BERT WordPiece tokenizer: a hub name or a local folder.")] = mvsa.DEFAULT_TOKENIZER,
    max_length: Annotated[int, typer.Option(help="Token ids per text, [CLS]/[SEP] included.")
                          ] = mvsa.DEFAULT_MAX_LENGTH,
    shorter_side: Annotated[int, typer.Option(help="Stored images' shorter side, px.")] = 256,
    max_image_pixels: Annotated[int, typer.Option(
        help="Skip (and record) images whose header declares more pixels.")
    ] = media.MAX_IMAGE_PIXELS,
    max_aspect: Annotated[float, typer.Option(
        help="Skip (and record) images whose longer side exceeds this many shorter sides.")
    ] = media.MAX_IMAGE_ASPECT,
    max_text_bytes: Annotated[int, typer.Option(
        help="Stored tweet text is cut to this many UTF-8 bytes (recorded in meta.json).")
    ] = mvsa.DEFAULT_MAX_TEXT_BYTES,
    workers: Workers = 0, shard_size: ShardSize = 256, seed: Seed = 0,
    val_fraction: ValFraction = 0.1, test_fraction: TestFraction = 0.1, strict: Strict = False,
    overwrite: Overwrite = False,
) -> None:
    """MVSA: data/<id>.jpg + data/<id>.txt + labelResultAll.txt -> images + token ids."""
    image = media.ImageParams(shorter_side=shorter_side, max_pixels=max_image_pixels,
                              max_aspect=max_aspect)
    recipe = mvsa.Mvsa(image=image, tokenizer=tokenizer, max_length=max_length, labels=labels,
                       multiple=multiple, max_text_bytes=max_text_bytes)
    _run_build(recipe, raw, out, parse_split_arguments(split or []),
               _options(seed, val_fraction, test_fraction, shard_size, workers, strict, overwrite))


def _options(seed: int, val_fraction: float, test_fraction: float, shard_size: int,
             workers: int, strict: bool, overwrite: bool) -> writer.BuildOptions:
    return writer.BuildOptions(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                               shard_size=shard_size, workers=workers or _cores(), strict=strict,
                               overwrite=overwrite)


def _run_build(recipe: Any, raw: Path, out: Path, split_files: dict[str, Path],
               options: writer.BuildOptions) -> None:
    with _progress() as progress:
        task = progress.add_task(f"building {recipe.name}", total=None)
        report = writer.build(recipe, raw, out, split_files, options,
                              on_progress=lambda done, total: progress.update(
                                  task, completed=done, total=total))
    _print_build_summary(report)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _print_build_summary(report: writer.BuildReport) -> None:
    manifest = report.manifest
    table = Table(title=f"{manifest['dataset']} -> {report.out}")
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
    console.print(f"processed {report.processed} clips in {report.seconds:.1f} s "
                  f"({report.clips_per_second:.1f} clips/s) on {report.workers} "
                  f"{'process' if report.workers == 1 else 'processes'}; reused "
                  f"{report.resumed_shards} finished shards")
    if report.first_sample_s is not None:
        console.print(f"first sample done {report.first_sample_s:.2f} s after the start")
    if report.unlisted:
        console.print(f"{report.unlisted} clips found on disk are in no split file (not built)")
    console.print(f"fingerprint {manifest['fingerprint']}")


def _print_skipped(manifest: dict[str, Any]) -> None:
    reasons = check.skipped_by_reason(manifest)
    if not reasons:
        console.print("skipped: none")
        return
    table = Table(title=f"skipped {sum(reasons.values())} samples (ids in manifest.json)")
    table.add_column("reason")
    table.add_column("samples", justify="right")
    for reason, count in reasons.most_common():
        table.add_row(reason, str(count))
    console.print(table)


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
    """Recompute every sha256 and count, decode every sample, check shapes and dtypes.

    A URL is verified from the bytes its server sends, not from a local cache.
    """
    if cache_dir and not remote.is_remote(location):
        raise typer.BadParameter(f"--cache-dir keeps the shards of a URL; {location} is a "
                                 "local folder already")
    source = check.open_source(location, cache_dir)
    total = sum(len(e["shards"]) for e in source.manifest["splits"].values())
    with _progress() as progress:
        task = progress.add_task(f"verifying {location}", total=total)
        try:
            report = check.verify(source, on_shard=lambda _: progress.advance(task))
        except check.VerifyError as err:
            progress.stop()
            err_console.print(f"[red]verify failed:[/red] {escape(str(err))}")
            raise typer.Exit(1) from None
    console.print(f"[green]ok[/green]: {report.shards} shards, {report.samples} samples, "
                  f"{_size(report.bytes)} match the manifest of {location}")


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
    console.print(f"  raw content ({raw.get('num_files', '?')} files): {raw.get('sha256')}")
    for name, digest in manifest["sources"].get("split_files", {}).items():
        console.print(f"  list file {name}: {digest}")


def _check_easy(easy: str, modalities: tuple[str, ...]) -> None:
    if easy not in modalities:
        raise typer.BadParameter(f"--easy {easy!r}: choose {' or '.join(modalities)}")


@synth_app.command("cremad")
def synth_cremad(
    out: Out,
    clips: Annotated[int, typer.Option(help="Number of clips (balanced over 6 classes).")] = 120,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same files.")] = 0,
    easy: Annotated[str, typer.Option(help="The easy modality: audio or video.")] = "audio",
    width: Annotated[int, typer.Option(help="Video width, px.")] = 96,
    height: Annotated[int, typer.Option(help="Video height, px.")] = 72,
) -> None:
    """A small raw tree in the exact CREMA-D layout, one modality much easier than the other."""
    from preprocess.datasets.synth import synthesize_cremad

    _check_easy(easy, ("audio", "video"))
    with _progress() as progress:
        task = progress.add_task("writing synthetic CREMA-D", total=clips)
        ids = synthesize_cremad(out, clips, seed, easy=easy, width=width, height=height,
                                progress=lambda n: progress.update(task, completed=n))
    counts = Counter(cremad.CLASSES[cremad.label_of(i)] for i in ids)
    console.print(f"wrote {len(ids)} clips to {out} ({easy} is the easy modality); per class: "
                  + ", ".join(f"{c} {counts[c]}" for c in cremad.CLASSES))


@synth_app.command("ks")
def synth_ks(
    out: Out,
    clips: Annotated[int, typer.Option(help="Number of clips, round robin over the classes.")
                     ] = 60,
    classes: Annotated[int, typer.Option(help="Number of classes, 2 to 5.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same files.")] = 0,
    easy: Annotated[str, typer.Option(help="The easy modality: audio or video.")] = "audio",
    seconds: Annotated[float, typer.Option(help="Clip length, s.")] = 2.0,
) -> None:
    """A small Kinetics-Sounds tree: <class>/<id>_<start>.mp4, H.264 + AAC."""
    from preprocess.datasets.synth import synthesize_ks

    _check_easy(easy, ("audio", "video"))
    if not 2 <= classes <= 5:
        raise typer.BadParameter(f"--classes {classes}: choose 2 to 5")
    with _progress() as progress:
        task = progress.add_task("writing synthetic Kinetics-Sounds", total=clips)
        ids = synthesize_ks(out, clips, seed, easy=easy, num_classes=classes, duration=seconds,
                            progress=lambda n: progress.update(task, completed=n))
    console.print(f"wrote {len(ids)} clips in {classes} class folders to {out} "
                  f"({easy} is the easy modality)")


@synth_app.command("mvsa")
def synth_mvsa(
    out: Out,
    pairs: Annotated[int, typer.Option(help="Number of image-text pairs.")] = 90,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same files.")] = 0,
    easy: Annotated[str, typer.Option(help="The easy modality: text or image.")] = "text",
) -> None:
    """A small MVSA-Single tree: data/<id>.jpg, data/<id>.txt, labelResultAll.txt."""
    from preprocess.datasets.synth import synthesize_mvsa

    _check_easy(easy, ("text", "image"))
    with _progress() as progress:
        task = progress.add_task("writing synthetic MVSA", total=pairs)
        ids = synthesize_mvsa(out, pairs, seed, easy=easy,
                              progress=lambda n: progress.update(task, completed=n))
    console.print(f"wrote {len(ids)} pairs to {out} ({easy} is the easy modality)")


@app.command()
def download(
    dataset: Annotated[str, typer.Argument(help="cremad")],
    out: Annotated[Path, typer.Option(help="Where the raw data goes.")] = Path("data/raw"),
) -> None:
    """Fetch what can be fetched; otherwise say what to install or where to get it."""
    for line in downloads.download(dataset, out):
        console.print(line)


def main() -> None:
    """Console-script entry: user errors become one red sentence and exit code 1."""
    try:
        app()
    except USER_ERRORS as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
