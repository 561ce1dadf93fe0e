"""A diverging run stops: fit raises Diverged at the end of the epoch whose loss became NaN or
infinite (checked on the epoch's loss sum, with no extra host sync per batch), `mnistjobs train`
exits 1 with its one line, an lr no float32 weight can take is refused before training (exit 2),
and a sweep trial that diverges ends its MLflow run FAILED with the diverged tags, is not retried,
and the rest of the sweep goes on (slow: the session's shared services)."""
from __future__ import annotations

import types

import pytest
import torch

from _service_helpers import TINY, job_id_of, mlflow_client, run_cli
from jobs.contract import TAG_DIVERGED, TAG_DIVERGED_REASON
from mnistnets.train import MAX_LR, Diverged, fit, load_checkpoint, recipe_for

SMALL = dict(epochs=2, batch_size=32, train_limit=256, test_limit=64, tta="none")
BLOW_UP = "onecycle:max_lr=1e12"  # NaN within the first epoch's few steps, whatever the model or CPU


def _config(model="v1", **settings):
    return recipe_for(model, **{**SMALL, **settings})


def _poison_loss(monkeypatch, after_calls: int, value: float) -> None:
    """From the (after_calls + 1)-th training batch on, the loss fit computes is ``value`` (NaN or
    inf): the real loss times it, so the gradients and then the weights become non-finite too."""
    import mnistnets.train as train_module

    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * value if calls["n"] > after_calls else loss

    monkeypatch.setattr(train_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))


def test_a_nan_loss_stops_fit_at_the_end_of_that_epoch(synthetic_data, tmp_path):
    """onecycle up to lr 1e12 (its first step at 4e10): the first epoch's loss is NaN; fit raises
    Diverged for epoch 1 instead of training on, and no checkpoint of the broken epoch is written.
    (max_lr=1000 diverges too, but on tiny data not always in epoch 1: v1 here reaches epoch 2.)"""
    results = []
    with pytest.raises(Diverged) as caught:
        for r in fit(_config(schedule=BLOW_UP), data=synthetic_data, checkpoint_dir=tmp_path):
            results.append(r)
    assert results == [] and caught.value.epoch == 1
    line = str(caught.value)
    assert line.startswith("training diverged in epoch 1/2: ") and "nan" in line and "lower lr" in line, line
    assert "\n" not in line and len(line) < 300
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_epochs_before_the_divergence_are_yielded_and_checkpointed(synthetic_data, tmp_path, monkeypatch,
                                                                        value):
    """The loss of epoch 2's last batch (of 3 epochs, 8 batches each) is NaN or inf: epoch 1 is
    yielded and checkpointed as usual, epoch 2 raises Diverged naming the value, epoch 3 never
    trains."""
    _poison_loss(monkeypatch, after_calls=8 + 7, value=value)
    cfg = _config(epochs=3, schedule="cosine")
    epochs = []
    with pytest.raises(Diverged) as caught:
        for r in fit(cfg, data=synthetic_data, checkpoint_dir=tmp_path):
            epochs.append(r["epoch"])
    assert epochs == [1] and caught.value.epoch == 2
    assert f"the epoch's training loss is {value}" in str(caught.value), str(caught.value)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_the_divergence_check_adds_no_host_sync_per_batch(synthetic_data, monkeypatch):
    """Without a progress callback, an epoch reads the device as often with 16 batches as with 4:
    the NaN check rides on the epoch's one read of the loss sum."""
    counts = {}
    real_item = torch.Tensor.item

    def counting_item(self):
        counts["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    for train_limit in (128, 512):  # 4 and 16 batches of 32
        counts["n"] = 0
        list(fit(_config(epochs=1, schedule="cosine", train_limit=train_limit), data=synthetic_data))
        counts[train_limit] = counts["n"]
    assert counts[128] == counts[512] > 0, counts


def test_an_optimizer_step_that_overflows_is_a_divergence_not_a_traceback(synthetic_data):
    """A weight decay no float32 can hold makes torch refuse the SGD step ("value cannot be
    converted to type float without overflow"): fit raises Diverged with one line instead."""
    with pytest.raises(Diverged) as caught:
        list(fit(_config(schedule="constant", weight_decay=1e39), data=synthetic_data))
    assert caught.value.epoch == 1 and "overflowed float32" in str(caught.value), str(caught.value)


@pytest.mark.parametrize("settings, needle", [
    ({"schedule": "onecycle:max_lr=1e308"}, "max_lr of the schedule 'onecycle:max_lr=1e308' is 1e+308"),
    ({"lr": 1e38, "schedule": "cosine"}, "lr is 1e+38"),
    ({"schedule": "cosine:eta_min=1e300"}, "eta_min of the schedule 'cosine:eta_min=1e300' is 1e+300"),
])
def test_an_lr_no_float32_weight_can_take_is_refused_by_validate(settings, needle):
    with pytest.raises(ValueError) as caught:
        _config(model="v2", **settings).validate()
    assert needle in str(caught.value) and "the largest lr accepted" in str(caught.value), str(caught.value)


def test_the_largest_accepted_lr_passes_validation():
    _config(model="v2", schedule=f"onecycle:max_lr={MAX_LR!r}").validate()
    _config(model="v2", lr=MAX_LR, schedule="cosine").validate()


# ------------------------------------------------------------------------------ mnistjobs train

def _train_args(synthetic_dir, *extra):
    return ["train", "--model", "v2", "--epochs", "2", "--train-limit", "256", "--test-limit", "64",
            "--batch-size", "32", "--tta", "none", "--data-dir", str(synthetic_dir), *extra]


def test_train_exits_1_with_the_one_line_when_the_loss_diverges(home, synthetic_dir):
    result = run_cli(_train_args(synthetic_dir, "--schedule", BLOW_UP))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if "diverged" in line]
    assert len(lines) == 1 and lines[0].startswith("Error: training diverged in epoch 1/2: "), result.output
    assert "Traceback" not in result.output and "final test accuracy" not in result.output


def test_train_refuses_an_overflowing_lr_before_training(home, synthetic_dir):
    result = run_cli(_train_args(synthetic_dir, "--schedule", "onecycle:max_lr=1e308"))
    assert result.exit_code == 2, result.output
    assert "max_lr of the schedule 'onecycle:max_lr=1e308' is 1e+308" in result.output, result.output
    assert "parameters;" not in result.output  # nothing trained
    assert not (home / "runs").exists()


# ------------------------------------------------------------------------------------- a sweep

@pytest.mark.slow
def test_a_diverging_trial_ends_failed_with_the_tags_is_not_retried_and_the_sweep_goes_on(
        embedded, synthetic_dir):
    """Two trials of v1, 2 epochs, max_failures 2: cosine trains both epochs and ends FINISHED;
    onecycle up to lr 1e12 diverges in epoch 1, its run ends FAILED with mnistjobs.diverged=true
    and the one-line reason, and Tune does not retry it (one attempt in the job's log)."""
    from jobs.tracking import job_runs

    experiment = "svc-diverge"
    result = run_cli(["submit", "--models", "v1", "--epochs", 2, *TINY, "--schedules", BLOW_UP,
                      "--max-failures", 2, "--data-dir", synthetic_dir, "--experiment", experiment, "--wait"],
                     home=embedded.home)
    out = result.output
    job = job_id_of(out)
    mlf = mlflow_client(embedded)
    exp = mlf.get_experiment_by_name(experiment)
    runs = job_runs(mlf, job, role="trial", experiment_ids=[exp.experiment_id])
    assert len(runs) == 2, out[-4000:]
    diverged = [r for r in runs if r.data.tags.get(TAG_DIVERGED) == "true"]
    assert len(diverged) == 1, [(r.info.run_name, r.info.status, r.data.tags) for r in runs]
    (bad,) = diverged
    (good,) = [r for r in runs if r is not bad]
    assert bad.info.status == "FAILED", bad.info
    reason = bad.data.tags[TAG_DIVERGED_REASON]
    assert reason.startswith("training diverged in epoch 1/2: ") and "\n" not in reason, reason
    assert mlf.get_metric_history(bad.info.run_id, "test_acc") == []  # the broken epoch is not logged
    assert good.info.status == "FINISHED" and TAG_DIVERGED not in good.data.tags, (good.info, good.data.tags)
    assert sorted(m.step for m in mlf.get_metric_history(good.info.run_id, "test_acc")) == [1, 2]
    # not retried: one attempt printed its reason, and Tune never reported a retry
    assert out.count(f"[{bad.info.run_name}] training diverged in epoch 1/2") == 1, out[-4000:]
    assert "retrying from its last checkpoint" not in out, out[-4000:]
