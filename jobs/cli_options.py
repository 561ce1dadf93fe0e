"""What the `mnistjobs` commands share: click settings, the usage error, the mapping of service
and job-client errors to exit codes, and the options that more than one command takes (the
training recipe, --home, --address, --tracking-uri).

Imports click (and the limits of jobs.spec, which imports no torch): --help texts repeat the
recipe's defaults without importing torch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import click

from jobs.spec import MAX_EPOCHS

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageFailure(click.ClickException):
    """A bad input: printed as one paragraph, exit code 2, nothing created."""

    exit_code = 2


@contextlib.contextmanager
def service_errors() -> Iterator[None]:
    """Map the service and job-client errors to exit codes (2: bad input, 1: runtime)."""
    from jobs import services
    from jobs.client import JobClientError, JobUsageError
    from jobs.cluster import UnreachableError
    from jobs.state import StateError

    try:
        yield
    except (services.PortInUseError, UnreachableError, JobUsageError) as exc:
        raise UsageFailure(str(exc)) from None
    except (services.ServiceError, StateError, JobClientError) as exc:
        raise click.ClickException(str(exc)) from None


def _at_most_max_epochs(ctx, param, value):
    """--epochs past MAX_EPOCHS: a usage error before anything else runs (the lower bound is left
    to the spec's and the recipe's own checks, which name it the same way)."""
    if value is not None and value > MAX_EPOCHS:
        raise UsageFailure(f"--epochs must be a whole number from 1 to {MAX_EPOCHS}, not {value}.")
    return value


def recipe_options(func):
    """The training-recipe options shared by `train` and `submit`.

    Defaults come from mnistnets.train (TrainConfig's defaults, MODEL_RECIPES' per-model settings),
    the one place the recipe lives; the "[default: ...]" texts below repeat them for --help without
    importing torch, and tests/test_cli_train.py checks that they agree. Each option's value
    reaches the command as a keyword of the same name (batch_size, optimizer, lr, ...), None
    meaning "the recipe's default".
    """
    options = [
        click.option("--epochs", type=int, default=None, callback=_at_most_max_epochs,
                     help=f"Epochs per run, at most {MAX_EPOCHS}  [default: 15]"),
        click.option("--batch-size", type=int, default=None, help="Training batch size  [default: 128; v0: 64]"),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default=None,
                     help="Optimizer  [default: sgd, Nesterov momentum 0.9]"),
        click.option("--lr", type=float, default=None,
                     help="Base learning rate (the peak of the default onecycle); a schedule's max_lr overrides it  "
                          "[default: 0.1; v2: 0.3]"),
        click.option("--momentum", type=float, default=None, help="SGD momentum  [default: 0.9]"),
        click.option("--weight-decay", type=float, default=None, help="Weight decay  [default: 1e-4; v0: 5e-4, v2: 5e-5]"),
        click.option("--label-smoothing", type=float, default=None, help="Label smoothing  [default: 0; v0: 0.05]"),
        click.option("--dropout", type=float, default=None,
                     help="Rate of every Dropout2d layer (v1-v3)  [default: the model's own; v2: 0]"),
        click.option("--augment/--no-augment", default=None,
                     help="Random affine augmentation of training batches  [default: on]"),
        click.option("--clean-epochs", type=int, default=None, metavar="N",
                     help="Train the last N epochs on un-augmented images  [default: 0; v2: 2]"),
        click.option("--ema", type=float, default=None, metavar="DECAY",
                     help="Evaluate (and checkpoint) an exponential moving average of the weights "
                          "with this decay per step; 0 turns it off  [default: 0; v0, v2: 0.999]"),
        click.option("--tta", type=click.Choice(["none", "shift4", "shift8"]), default=None,
                     help="After the last epoch, also report test accuracy with test-time augmentation: "
                          "the mean prediction over the image and its 4 or 8 one-pixel shifts "
                          "(metric tta_test_acc)  [default: shift8]"),
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
address_option = click.option(
    "--address", envvar="RAY_ADDRESS", default=None, metavar="URL",
    help="Ray dashboard (job API) address of a running cluster, e.g. http://head:8265, as for "
         "`ray job submit`; its token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
         "~/.ray/auth_token  [env: RAY_ADDRESS; default: the embedded local Ray of --home]")
tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, metavar="URI",
    help="MLflow tracking server the jobs log to  [env: MLFLOW_TRACKING_URI; default: the "
         "embedded MLflow server of --home]")
