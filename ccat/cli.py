"""The ``ccat`` command: train, eval, list. Each command parses, builds a config, calls
one library function; user errors print one sentence and exit non-zero."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ccat.config import ConfigError, load_config
from ccat.data.reader import DatasetError
from ccat.data.spec import SpecError
from ccat.errors import CcatError
from ccat.registry import RegistryError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate balanced multimodal models from shards.")
console = Console(stderr=True)
USER_ERRORS = (CcatError, ConfigError, DatasetError, SpecError, RegistryError)


@app.command()
def train(config: Path = typer.Option(..., "--config", help="YAML config file"),
          method: Optional[str] = typer.Option(None, help="method name (see `ccat list`)"),
          data: Optional[str] = typer.Option(None, help="built dataset folder"),
          out: Optional[str] = typer.Option(None, help="run folder"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. optim.epochs=10"),
          resume: bool = typer.Option(False, help="continue from OUT/last.pt")) -> None:
    """Train every stage of a method on built shards."""
    from ccat.train import train as run_training

    cfg = load_config(config, set_, {"method.name": method, "data.path": data, "out": out})
    run_training(cfg, resume=resume)


@app.command("eval")
def evaluate(ckpt: Path = typer.Option(..., help="checkpoint (best.pt or last.pt)"),
             data: Optional[str] = typer.Option(None, help="built dataset; default: the run's"),
             split: str = typer.Option("test", help="split to evaluate"),
             json_path: Optional[Path] = typer.Option(None, "--json", help="write metrics here")) -> None:
    """Evaluate a checkpoint: fused and per-modality accuracy, macro-F1, contributions."""
    from ccat.evaluate import evaluate_checkpoint

    evaluate_checkpoint(ckpt, data, split, json_path)


@app.command("list")
def list_registered() -> None:
    """Print the registered methods, encoders and fusions."""
    from ccat.methods import METHODS
    from ccat.models import ENCODERS, FUSIONS

    out = Console()
    for registry in (METHODS, ENCODERS, FUSIONS):
        out.print(f"[bold]{registry.kind}s[/bold]: {', '.join(registry.names())}")


def main() -> None:
    """Console-script entry: run the app, turning user errors into one line."""
    try:
        app()
    except USER_ERRORS as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        raise SystemExit(2) from None
