"""The `mnistjobs` command line: one click group, one command per verb.

Commands that need Ray or MLflow import them lazily, so `mnistjobs models` and
`mnistjobs --help` start fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageFailure(click.ClickException):
    """A bad input: printed as one paragraph, exit code 2, nothing created."""

    exit_code = 2


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="mnistjobs")
def main() -> None:
    """mnistjobs: sweeps of compact MNIST CNNs as Ray jobs, tracked in MLflow.

    \b
    Quick start:
      mnistjobs submit --models all --wait   # a sweep on the embedded local Ray + MLflow
      mnistjobs compare                      # side-by-side epoch table from MLflow
      mnistjobs train --model v0             # one run in the foreground, no Ray, no MLflow
    """


# --- shared options ---------------------------------------------------------

def recipe_options(func):
    """The training-recipe options shared by `train` and `submit`.

    Defaults come from mnistnets.train.TrainConfig, the one place the recipe lives.
    Each option's value reaches the command as a keyword of the same name
    (batch_size, optimizer, lr, ...), None meaning "the recipe's default".
    """
    options = [
        click.option("--epochs", type=int, default=None, help="Epochs per run  [default: 15]"),
        click.option("--batch-size", type=int, default=None, help="Training batch size  [default: 128]"),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=None,
                     help="Optimizer  [default: sgd, Nesterov momentum 0.9]"),
        click.option("--lr", type=float, default=None,
                     help="Base learning rate (the peak of the default onecycle); a schedule's max_lr overrides it  [default: 0.1]"),
        click.option("--momentum", type=float, default=None, help="SGD momentum  [default: 0.9]"),
        click.option("--weight-decay", type=float, default=None, help="Weight decay  [default: 1e-4]"),
        click.option("--label-smoothing", type=float, default=None, help="Label smoothing  [default: 0]"),
        click.option("--dropout", type=float, default=None,
                     help="Rate of every Dropout2d layer (v1-v3)  [default: per model]"),
        click.option("--augment/--no-augment", default=None,
                     help="Random affine augmentation of training batches  [default: on]"),
        click.option("--train-limit", type=int, default=None, help="Train on the first N images only"),
        click.option("--test-limit", type=int, default=None, help="Test on the first N images only"),
        click.option("--data-dir", type=click.Path(file_okay=False), envvar="MNISTJOBS_DATA_DIR",
                     default=None, help="Folder with the four MNIST IDX files (.gz or raw)  "
                     "[env: MNISTJOBS_DATA_DIR; default: download once into the state folder]"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def recipe_overrides(**values) -> dict:
    """Map recipe option values (None = unset) to TrainConfig fields."""
    return {k: v for k, v in values.items() if v is not None}


home_option = click.option(
    "--home", type=click.Path(file_okay=False), envvar="MNISTJOBS_HOME", default=None,
    help="State folder for data, services, runs  [env: MNISTJOBS_HOME; default: ./.mnistjobs]")


# --- service commands begin
# --- service commands end


# --- compare command begin
@main.command("compare", context_settings=CONTEXT_SETTINGS)
@click.option("--experiment", default="mnistjobs", show_default=True, metavar="NAME",
              help="MLflow experiment to read (the --experiment given at submit time).")
@click.option("--job", metavar="JOB", default=None,
              help="Only the trials of this job id (see `mnistjobs list`). Default: all jobs.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]),
              default="table", show_default=True,
              help="Output format: aligned text, CSV (one '# title' line per table), or "
                   "Markdown pipe tables.")
@click.option("--table", "which", type=click.Choice(["all", "epochs", "summary", "groups"]),
              default="all", show_default=True,
              help="Which tables: the side-by-side epoch table, the per-run summary, the "
                   "per-(model, schedule) seed statistics, or all of them.")
@click.option("--target", type=float, default=99.4, show_default=True, metavar="PCT",
              help="Test accuracy (percent) for the summary's 'first epoch >=' column.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="FILE", help="Write the tables to FILE instead of standard output.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="PNG", help="Also write the train/test accuracy curves of all runs "
                                  "to this PNG file.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
              help="MLflow tracking server (or sqlite:///... store). [env: MLFLOW_TRACKING_URI; "
                   "default: the embedded server of --home, as started by `mnistjobs up`]")
@home_option
def compare(experiment, job, fmt, which, target, output, plot, tracking_uri, home):
    """Compare trial runs from MLflow: the seed-style epoch table and a summary per run.

    Reads the trial runs of one experiment (all jobs, or one with --job) from the MLflow
    tracking server and prints:

    \b
      - the side-by-side epoch table: "<run> Train Acc" / "<run> Test Acc" per epoch;
      - a summary per run: model, parameters, schedule, seed, status, final and best
        test accuracy, the first epoch reaching --target (99.4%), epochs, wall seconds;
      - mean/min/max final test accuracy over seeds, for each (model, schedule) with
        two or more finished seeds.

    \b
    Examples:
      mnistjobs compare
      mnistjobs compare --job raysubmit_XXXX --format markdown -o results.md
      mnistjobs compare --table summary --format csv -o summary.csv --plot accuracy.png
    """
    from jobs import report

    home = home or ".mnistjobs"
    if not tracking_uri:
        # Embedded default: jobs.services.tracking_uri_for(home) when the service module has
        # it, else <home>/services.json's "mlflow_uri" (see report.default_tracking_uri).
        tracking_uri = report.default_tracking_uri(home)
    if not tracking_uri:
        raise UsageFailure(
            f"No MLflow tracking server is known: the state folder {home} has no running "
            "embedded default (start it with `mnistjobs up` or `mnistjobs submit`). Pass "
            "--tracking-uri or set MLFLOW_TRACKING_URI to read another server."
        )
    try:
        runs, epochs = report.load_runs(tracking_uri, experiment=experiment, job=job)
        summary = report.summary_table(runs, epochs, target=target)
        tables = {}
        if which in ("all", "epochs"):
            tables["Side-by-side epoch table"] = report.epoch_table(epochs, runs)
        if which in ("all", "summary"):
            tables["Summary"] = summary
        groups = report.group_table(summary)
        if which == "groups" or (which == "all" and len(groups)):
            tables["Final test accuracy over seeds"] = groups
        text = report.render_report(tables, fmt)
        if output:
            report.write_atomic(output, text)
            click.echo(f"Wrote {output}", err=True)
        else:
            click.echo(text, nl=False)
        if plot:
            report.plot_accuracy(epochs, runs, plot, target=target)
            click.echo(f"Wrote {plot}", err=True)
    except report.ReportError as exc:
        raise UsageFailure(str(exc)) from None
    except OSError as exc:
        raise UsageFailure(f"Cannot write {exc.filename or 'the output'}: {exc.strerror}.") from None
# --- compare command end


# --- foreground commands: models, data, train -------------------------------

def _state_home(home: str | None) -> Path:
    return Path(home or os.environ.get("MNISTJOBS_HOME") or ".mnistjobs")


@main.command("models")
@click.argument("names", nargs=-1)
@click.option("--checks/--no-checks", default=True, show_default=True,
              help="Print the architecture checks under each table.")
def models_cmd(names: tuple[str, ...], checks: bool) -> None:
    """Print the layer table of each model (all when no NAME is given).

    The table has the seed's columns (Layer (type), Output Shape, Param #) and
    totals; the checks count BatchNorm, Dropout (Dropout2d included), Linear and
    global-pooling layers and give the receptive field.
    """
    from mnistnets import create_model, list_models
    from mnistnets.summary import format_checks, format_table

    chosen = list(names) or list_models()
    unknown = [n for n in chosen if n not in list_models()]
    if unknown:
        raise UsageFailure(f"unknown model(s): {', '.join(unknown)}. "
                           f"Valid models: {', '.join(list_models())}.")
    for name in chosen:
        model = create_model(name)
        click.echo(f"model {name}")
        click.echo(format_table(model))
        if checks:
            click.echo(format_checks(model))
        click.echo("")


@main.command("data")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="MNISTJOBS_DATA_DIR", default=None,
              help="Folder with the four MNIST IDX files  [env: MNISTJOBS_DATA_DIR; "
              "default: <home>/data/mnist, downloaded once]")
@home_option
def data_cmd(data_dir: str | None, home: str | None) -> None:
    """Check an MNIST folder: counts, class histograms and md5 of each file.

    Each problem (missing file, truncated file, wrong magic number, count
    mismatch, bad label) is reported with the file it concerns; exit code 2.
    """
    from mnistnets.data import DataError, check_mnist, format_check_report, resolve_data_dir

    try:
        folder = resolve_data_dir(data_dir, home=_state_home(home))
        report = check_mnist(folder)
    except DataError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(format_check_report(report))


@main.command("train")
@click.option("--model", "model_name", default="v0", show_default=True,
              help="Model name (see `mnistjobs models`).")
@click.option("--schedule", default=None,
              help="LR schedule spec, e.g. 'onecycle:max_lr=0.05,pct_start=0.2', 'step:step_size=6,gamma=0.1'"
                   "  [default: the recipe's onecycle]")
@recipe_options
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where last.pt and best.pt go  [default: <home>/runs/<model>-s<seed>]")
@click.option("--resume", "resume_from", type=click.Path(dir_okay=False), default=None,
              help="Continue from a checkpoint written by an earlier run (last.pt).")
@click.option("--quiet", is_flag=True, help="No progress bars, only the per-epoch test lines.")
@home_option
def train_cmd(model_name, schedule, seed, device, checkpoint_dir, resume_from, quiet, home, **recipe):
    """Train one model in the foreground (no Ray, no MLflow).

    Prints a progress bar per epoch (`Train Loss=... Accuracy=...`, like the
    seed) and a test line per epoch, writes checkpoints, and ends with a summary.
    """
    from mnistnets.data import DataError, load_mnist, resolve_data_dir
    from mnistnets.train import CheckpointError, TrainConfig, fit

    values = recipe_overrides(**recipe)
    values.update(model=model_name, seed=seed, device=device)
    if schedule is not None:
        values["schedule"] = schedule
    try:
        config = TrainConfig.from_dict(values).validate()
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    state = _state_home(home)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else state / "runs" / f"{config.model}-s{config.seed}"
    try:
        data = load_mnist(resolve_data_dir(config.data_dir, home=state), config.train_limit, config.test_limit)
    except DataError as exc:
        raise UsageFailure(str(exc)) from None

    from tqdm import tqdm

    from mnistnets import count_parameters
    from mnistnets.train import build_model

    click.echo(f"model {config.model}: {count_parameters(build_model(config)):,} parameters; "
               f"{len(data.train_labels):,} train / {len(data.test_labels):,} test images; "
               f"schedule {config.schedule}; checkpoints in {ckpt}")
    bar = None

    def progress(epoch, batch, n_batches, loss, acc):
        nonlocal bar
        if quiet:
            return
        if bar is None:
            click.echo(f"Epoch {epoch}")
            bar = tqdm(total=n_batches, leave=True, dynamic_ncols=True)
        bar.set_description(f"Train Loss={loss:.4f} Accuracy={acc:.2f}", refresh=False)
        bar.update(batch - bar.n)

    results = []
    try:
        for r in fit(config, data=data, checkpoint_dir=ckpt, resume_from=resume_from, progress=progress):
            if bar is not None:
                bar.close()
                bar = None
            n_test = len(data.test_labels)
            click.echo(f"Test set: Average loss: {r['test_loss']:.4f}, Accuracy: "
                       f"{round(r['test_acc'] * n_test / 100)}/{n_test} ({r['test_acc']:.2f}%)"
                       f"  [epoch {r['epoch']}, lr {r['lr']:.4g}, {r['epoch_seconds']:.1f}s, "
                       f"{r['images_per_second']:.0f} img/s]")
            results.append(r)
    except CheckpointError as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; resume with --resume {ckpt / 'last.pt'}", err=True)
        sys.exit(130)
    if results:
        best = max(results, key=lambda r: r["test_acc"])
        final = results[-1]
        total = sum(r["epoch_seconds"] for r in results)
        click.echo(f"\nfinal test accuracy {final['test_acc']:.2f}% at epoch {final['epoch']}; "
                   f"best {best['test_acc']:.2f}% at epoch {best['epoch']}; "
                   f"{total:.1f}s training; checkpoints: {ckpt}")


if __name__ == "__main__":  # pragma: no cover
    main()
