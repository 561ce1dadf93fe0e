"""The foreground commands through the real console entry point (click's runner)."""
import re

import pytest

from _service_helpers import run_cli


@pytest.fixture
def run(home):
    """`mnistjobs ARGS` with the test's private state folder ($MNISTJOBS_HOME) and a clean env."""
    def _run(*args):
        return run_cli(args)
    return _run


def test_help_reads_like_documentation(run):
    out = run("--help").output
    for cmd in ("train", "models", "data"):
        assert cmd in out
    out = run("train", "--help").output
    assert "--schedule" in out and "onecycle" in out and "MNISTJOBS_DATA_DIR" in out


def _help_default(help_text: str, option: str) -> str:
    """The "[default: ...]" text of ``option`` in a --help page (click wraps long lines)."""
    flat = " ".join(help_text.split())
    m = re.search(r"\s" + re.escape(option) + r"\b(?:(?! --[a-z]).)*?\[default: ([^\]]*)\]", flat)
    assert m, f"{option} has no [default: ...] in --help"
    return m.group(1)


@pytest.mark.parametrize("command", ["train", "submit"])
def test_help_defaults_agree_with_the_recipes(run, command):
    """--help repeats the recipe without importing torch; this keeps it true to mnistnets.train."""
    from mnistnets.train import MODEL_RECIPES, TTA_VIEWS, TrainConfig

    out = run(command, "--help").output
    assert f"--tta [{'|'.join(TTA_VIEWS)}]" in out  # the choices, too
    c = TrainConfig()
    for option, field, shared in [("--lr", "lr", f"{c.lr:g}"),
                                  ("--weight-decay", "weight_decay", f"{c.weight_decay:.0e}".replace("e-0", "e-")),
                                  ("--label-smoothing", "label_smoothing", f"{c.label_smoothing:g}"),
                                  ("--clean-epochs", "clean_epochs", f"{c.clean_epochs}"),
                                  ("--ema", "ema", f"{c.ema:g}"),
                                  ("--batch-size", "batch_size", f"{c.batch_size}"),
                                  ("--tta", "tta", c.tta),
                                  ("--dropout", "dropout", "the model's own")]:
        text = _help_default(out, option)
        assert text.split(";")[0] == shared, (option, text)
        by_model = {}
        for names, value in re.findall(r"((?:v\d+, )*v\d+): ([^,;]+)", text):
            for name in names.split(", "):
                by_model[name] = value
        expected = {m: r[field] for m, r in MODEL_RECIPES.items() if field in r}
        assert set(by_model) == set(expected), (option, text)
        for name, value in expected.items():
            assert float(by_model[name]) == float(value), (option, name, text)


def test_train_one_model_in_the_foreground(run, synthetic_dir, tmp_path):
    r = run("train", "--model", "v2", "--epochs", "2", "--batch-size", "32", "--data-dir", synthetic_dir,
            "--checkpoint-dir", tmp_path / "ck", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(re.findall(r"Test set: Average loss: [0-9.]+, Accuracy: \d+/256 \([0-9.]+%\)", r.output)) == 2
    assert "Train Loss=" in r.output and "Accuracy=" in r.output
    assert "final test accuracy" in r.output
    assert (tmp_path / "ck" / "last.pt").is_file()


def test_train_resumes_an_interrupted_run(run, synthetic_dir, synthetic_data, tmp_path):
    from mnistnets.train import fit, recipe_for

    # v2's default recipe, as `train` builds it (a checkpoint resumes only the same recipe)
    config = recipe_for("v2", epochs=3, batch_size=32, device="cpu", data_dir=str(synthetic_dir))
    for r in fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "ck"):
        break  # stopped after epoch 1
    args = ["train", "--model", "v2", "--batch-size", "32", "--data-dir", synthetic_dir,
            "--checkpoint-dir", tmp_path / "ck", "--resume", tmp_path / "ck" / "last.pt", "--quiet"]
    r = run(*args, "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert "[epoch 2," in r.output and "[epoch 3," in r.output and "[epoch 1," not in r.output
    r = run(*args, "--epochs", "4")  # another schedule length: not the same run
    assert r.exit_code == 2 and "epochs=3 there, 4 here" in r.output
    assert r.output.startswith("Error: "), "the error is the whole output: no header line before it"
    r = run(*args, "--epochs", "3")  # the run is complete: nothing to train, and it says so
    assert r.exit_code == 0 and "Nothing to resume" in r.output and "epoch 3 of 3" in r.output
    assert "[epoch" not in r.output


def _no_cuda():
    import torch

    return not torch.cuda.is_available()


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--batch-size", "0"], "batch_size must be"),
    (["--model", "v7"], "unknown model 'v7'"),
    (["--schedule", "onecycle:peak=3"], "no key 'peak'"),
    (["--schedule", "onecycle:pct_start=1.5"], "pct_start"),
    (["--schedule", "step:step_size=0"], "step_size"),
    (["--device", "cudax"], "device must be auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif("not _no_cuda()")),
    (["--resume", "{tmp}/nothere.pt"], "does not exist"),
    (["--resume", "{tmp}/notes.txt"], "cannot be read"),
    (["--resume", "{tmp}/empty.pt"], "is not a mnistjobs checkpoint"),
])
def test_train_bad_input_exits_2(run, home, synthetic_dir, tmp_path, args, words):
    import torch

    (tmp_path / "notes.txt").write_text("hello\n")
    torch.save({"version": 1}, tmp_path / "empty.pt")
    args = [a.format(tmp=tmp_path) for a in args]
    r = run("train", "--data-dir", synthetic_dir, "--checkpoint-dir", tmp_path / "ck", *args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and words in r.output and "Traceback" not in r.output
    assert not (tmp_path / "ck").exists() and not home.exists()


def test_train_unwritable_checkpoint_dir_exits_2_before_training(run, home, synthetic_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    r = run("train", "--data-dir", synthetic_dir, "--checkpoint-dir", tmp_path / "a-file" / "ck", "--epochs", "1")
    assert r.exit_code == 2, r.output
    assert "cannot write checkpoints to" in r.output and "--checkpoint-dir" in r.output
    assert "Test set" not in r.output and not home.exists()


def test_train_default_checkpoints_make_a_private_state_folder(run, home, synthetic_dir):
    r = run("train", "--model", "v2", "--data-dir", synthetic_dir, "--epochs", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert (home / "runs" / "v2-s1" / "last.pt").is_file()
    assert home.stat().st_mode & 0o777 == 0o700


def test_train_a_run_of_a_few_steps(run, synthetic_dir, tmp_path):
    """512 images at batch 103 are 5 steps: onecycle's warmup is 0.2 x 5 = 1 step (it once divided by 0)."""
    r = run("train", "--model", "v2", "--data-dir", synthetic_dir, "--checkpoint-dir", tmp_path / "ck",
            "--epochs", "1", "--batch-size", "103", "--quiet")
    assert r.exit_code == 0, r.output
    assert "final test accuracy" in r.output


def test_train_missing_data_dir_exits_2_and_names_it(run, tmp_path):
    r = run("train", "--data-dir", tmp_path / "nowhere", "--epochs", "1")
    assert r.exit_code == 2
    assert "nowhere" in r.output and "Traceback" not in r.output


def test_models_prints_seed_tables_and_checks(run):
    r = run("models")
    assert r.exit_code == 0
    for total in ("18,214", "10,970", "4,232", "7,932"):
        assert f"Total params: {total}" in r.output
    assert "Conv2d-1" in r.output and "receptive" in r.output.lower()
    r = run("models", "v2", "--no-checks")
    assert r.output.count("Total params") == 1 and "4,232" in r.output
    assert "default recipe: sgd" in r.output and "this model: lr 0.3," in r.output
    r = run("models", "v9")
    assert r.exit_code == 2 and "unknown model" in r.output and "v0" in r.output


def test_data_reports_counts(run, synthetic_dir):
    r = run("data", "--data-dir", synthetic_dir)
    assert r.exit_code == 0, r.output
    assert "512" in r.output and "256" in r.output


def test_data_bad_folder_exits_2(run, tmp_path):
    (tmp_path / "d").mkdir()
    r = run("data", "--data-dir", tmp_path / "d")
    assert r.exit_code == 2 and "train-images" in r.output
