import pytest
import torch

from mnistnets.train import CheckpointError, TrainConfig, fit, load_checkpoint, save_checkpoint


def _config(**kw):
    base = dict(model="v2", epochs=3, batch_size=32, schedule="onecycle:max_lr=0.1", seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_fit_yields_one_result_per_epoch_and_learns(synthetic_data, tmp_path):
    results = list(fit(_config(), data=synthetic_data, checkpoint_dir=tmp_path))
    assert [r["epoch"] for r in results] == [1, 2, 3]
    for r in results:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds", "images_per_second"):
            assert isinstance(r[key], float), key
        assert 0 <= r["test_acc"] <= 100 and r["images_per_second"] > 0
    assert results[-1]["test_acc"] > 50  # 10 classes: chance is 10%
    assert results[-1]["test_loss"] < results[0]["test_loss"] or results[0]["test_acc"] > 90
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert results[-1]["checkpoint"] == str(tmp_path / "last.pt")


def test_seeded_runs_are_reproducible_on_cpu(synthetic_data, tmp_path):
    a = list(fit(_config(epochs=2), data=synthetic_data, checkpoint_dir=tmp_path / "a"))
    b = list(fit(_config(epochs=2), data=synthetic_data, checkpoint_dir=tmp_path / "b"))
    c = list(fit(_config(epochs=2, seed=4), data=synthetic_data, checkpoint_dir=tmp_path / "c"))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    wa, wb, wc = (_weights(tmp_path / x / "last.pt") for x in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("model", ["v1", "v3"])  # models with dropout and augmentation on
def test_resume_from_epoch_k_ends_with_the_same_weights(synthetic_data, tmp_path, model):
    config = _config(model=model, epochs=3, schedule="onecycle:max_lr=0.05,warmup=0.5")
    full = list(fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "full"))
    for r in fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "cut"):
        if r["epoch"] == 1:
            break  # "crash" after epoch 1
    resumed = list(fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "cut",
                       resume_from=tmp_path / "cut" / "last.pt"))
    assert [r["epoch"] for r in resumed] == [2, 3]
    assert [r["test_acc"] for r in resumed] == [r["test_acc"] for r in full[1:]]
    wf, wr = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert len(load_checkpoint(tmp_path / "cut" / "last.pt")["history"]) == 3


def test_checkpoint_errors(tmp_path, synthetic_data):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="corrupt"):
        list(fit(_config(), data=synthetic_data, resume_from=bad))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_checkpoints_load_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"version": 1, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    ok = tmp_path / "ok.pt"
    state = {"version": 1, "epoch": 1, "config": {}, "model": {"w": torch.ones(2)}, "optimizer": {},
             "scheduler": {}, "best_test_acc": 0.0}
    save_checkpoint(ok, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "ok.pt"]  # no temporary file left
    assert torch.equal(load_checkpoint(ok)["model"]["w"], torch.ones(2))
    for key in ("config", "model", "epoch"):  # a checkpoint of ours lacking a part is refused, not a KeyError
        save_checkpoint(ok, {k: v for k, v in state.items() if k != key})
        with pytest.raises(CheckpointError, match="not a mnistjobs checkpoint"):
            load_checkpoint(ok)


@pytest.mark.parametrize("kw, words", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(model="v9"), "unknown model 'v9'"),
    (dict(schedule="warp"), "unknown schedule 'warp'"),
    (dict(optimizer="lion"), "unknown optimizer 'lion'"),
    (dict(lr=-1.0), "lr must be"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(device="tpu"), "device must be"),
    (dict(ema=1.0), "ema must be a decay"),
    (dict(ema=-0.1), "ema must be a decay"),
    (dict(clean_epochs=4), "clean_epochs must be an integer from 0 to epochs"),
    (dict(dropout="0.1"), "dropout must be a number"),
    (dict(nesterov="no"), "nesterov must be true or false"),
    (dict(augment=1), "augment must be true or false"),
    (dict(translate=1.5), "translate is a fraction"),
    (dict(scale=1.0), "scale is a fraction"),
    (dict(shear=95.0), "shear must be < 90"),
    (dict(device="cudax"), "device must be auto, cpu, cuda or cuda:N"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(schedule=None), "schedule must be a spec string"),
])
def test_validate_rejects_bad_settings(kw, words):
    with pytest.raises(ValueError, match=words):
        _config(**kw).validate()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"modle": "v0"})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_other_optimizers_and_label_smoothing_train(synthetic_data, optimizer):
    results = list(fit(_config(epochs=1, optimizer=optimizer, lr=0.003, schedule="cosine",
                               label_smoothing=0.1, augment=False), data=synthetic_data))
    assert len(results) == 1 and results[0]["train_loss"] > 0


def test_ema_evaluates_and_checkpoints_the_averaged_weights(synthetic_data, tmp_path):
    from mnistnets.train import build_model, evaluate
    from mnistnets.data import DeviceLoader

    config = _config(epochs=2, ema=0.9)
    results = list(fit(config, data=synthetic_data, checkpoint_dir=tmp_path))
    state = load_checkpoint(tmp_path / "last.pt")
    avg, live = state["model"], state["live"]
    assert state["ema_updates"] == 2 * -(-len(synthetic_data.train_labels) // 32)
    assert not all(torch.equal(avg[k], live[k]) for k in avg)  # an average, not a copy
    # The reported test accuracy is the averaged weights' accuracy.
    model = build_model(config)
    model.load_state_dict(avg)
    loader = DeviceLoader(synthetic_data.test_images, synthetic_data.test_labels, 1000)
    assert evaluate(model, loader)[1] == results[-1]["test_acc"]
    model.load_state_dict(live)
    assert evaluate(model, loader)[0] != results[-1]["test_loss"]


def test_ema_resume_ends_with_the_same_weights(synthetic_data, tmp_path):
    config = _config(model="v1", epochs=3, ema=0.95, clean_epochs=1)
    full = list(fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "full"))
    for r in fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "cut"):
        break
    resumed = list(fit(config, data=synthetic_data, checkpoint_dir=tmp_path / "cut",
                       resume_from=tmp_path / "cut" / "last.pt"))
    assert [r["test_acc"] for r in resumed] == [r["test_acc"] for r in full[1:]]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for key in ("model", "live"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_clean_epochs_switch_augmentation_off_at_the_end(synthetic_data, monkeypatch):
    from mnistnets import data as data_mod

    seen = []
    original = data_mod.DeviceLoader.__iter__

    def spy(self):
        if self.shuffle:  # the training loader
            seen.append(self.augment is not None)
        return original(self)

    monkeypatch.setattr(data_mod.DeviceLoader, "__iter__", spy)
    list(fit(_config(epochs=3, clean_epochs=2), data=synthetic_data))
    assert seen == [True, False, False]
    seen.clear()
    list(fit(_config(epochs=2, clean_epochs=0), data=synthetic_data))
    assert seen == [True, True]


def test_model_recipes_fill_in_what_is_not_given(monkeypatch):
    from mnistnets import train

    monkeypatch.setitem(train.MODEL_RECIPES, "v2", {"weight_decay": 5e-5, "dropout": 0.0})
    c = train.recipe_for("v2", seed=4)
    assert (c.model, c.seed, c.weight_decay, c.dropout, c.lr) == ("v2", 4, 5e-5, 0.0, TrainConfig.lr)
    assert train.recipe_for("v2", weight_decay=1e-3).weight_decay == 1e-3  # given beats recipe
    assert train.recipe_for("v1") == TrainConfig(model="v1")
    with pytest.raises(ValueError, match="unknown training setting"):
        train.recipe_for("v2", wd=1)


def test_a_recipes_clean_epochs_fit_short_runs(monkeypatch):
    from mnistnets import train

    monkeypatch.setitem(train.MODEL_RECIPES, "v2", {"clean_epochs": 2})
    assert train.recipe_for("v2").clean_epochs == 2
    assert train.recipe_for("v2", epochs=1).validate().clean_epochs == 1  # capped: a quick run works
    with pytest.raises(ValueError, match="clean_epochs"):  # asked for explicitly: an error
        train.recipe_for("v2", epochs=1, clean_epochs=2).validate()


def test_shift_images_moves_pixels_and_fills_the_border():
    from mnistnets.train import shift_images

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    right = shift_images(x, 0, 1, fill=-1.0)
    assert torch.equal(right[0, 0, :, 1:], x[0, 0, :, :3]) and (right[0, 0, :, 0] == -1).all()
    up = shift_images(x, -1, 0, fill=-1.0)
    assert torch.equal(up[0, 0, :3], x[0, 0, 1:]) and (up[0, 0, 3] == -1).all()
    diag = shift_images(x, 1, -1, fill=0.0)
    assert diag[0, 0, 1, 0] == x[0, 0, 0, 1] and diag.shape == x.shape
    assert shift_images(x, 0, 0, fill=5.0) is x


def test_tta_is_reported_after_the_last_epoch_only(synthetic_data, tmp_path):
    from mnistnets.data import DeviceLoader
    from mnistnets.train import build_model, evaluate, evaluate_tta

    results = list(fit(_config(epochs=2, tta="shift8"), data=synthetic_data, checkpoint_dir=tmp_path))
    assert "tta_test_acc" not in results[0]
    last = results[-1]
    assert 0 <= last["tta_test_acc"] <= 100 and last["tta_test_loss"] > 0
    model = build_model(_config())
    model.load_state_dict(load_checkpoint(tmp_path / "last.pt")["model"])
    loader = DeviceLoader(synthetic_data.test_images, synthetic_data.test_labels, 1000)
    assert evaluate_tta(model, loader, "shift8")[1] == last["tta_test_acc"]
    # One view is plain evaluation.
    assert evaluate_tta(model, loader, "none")[1] == evaluate(model, loader)[1] == last["test_acc"]
    assert load_checkpoint(tmp_path / "last.pt")["history"][-1]["tta_test_acc"] == last["tta_test_acc"]
    with pytest.raises(ValueError, match="unknown tta"):
        _config(tta="rot").validate()


@pytest.mark.filterwarnings("ignore:Detected call of")  # the replay steps no optimizer
@pytest.mark.parametrize("schedule", ["onecycle:max_lr=0.1", "cosine:warmup=1", "step:step_size=1,gamma=0.5"])
def test_logged_lr_is_the_lr_of_the_epochs_last_step(synthetic_data, schedule):
    """Per-batch schedules step after every batch: the logged lr is the one the last batch used,
    not the next one (for the last epoch that would be past the end of the schedule)."""
    from mnistnets.schedules import build_scheduler

    config = _config(schedule=schedule)
    results = list(fit(config, data=synthetic_data))
    n_batches = -(-len(synthetic_data.train_labels) // config.batch_size)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    sched = build_scheduler(schedule, opt, config.epochs, n_batches)
    expected = []
    for r in results:
        for i in range(1, n_batches + 1):
            if i == n_batches:
                expected.append(sched.get_lr())
            sched.step_batch()
        sched.step_epoch(r["test_loss"])
    assert [r["lr"] for r in results] == pytest.approx(expected, rel=1e-12)
    if schedule.startswith("onecycle"):  # the last step of a one-cycle run is near its floor
        assert results[-1]["lr"] < 1e-3


def test_a_failed_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    """Checkpoints go through mnistnets.files.write_atomic: a write that fails midway leaves the
    previous checkpoint whole and no temporary file."""
    path = tmp_path / "last.pt"
    state = {"version": 1, "epoch": 1, "config": {}, "model": {"w": torch.ones(2)}, "optimizer": {},
             "scheduler": {}, "best_test_acc": 0.0}
    save_checkpoint(path, state)
    with pytest.raises((AttributeError, TypeError)):  # torch cannot pickle a local function
        save_checkpoint(path, {**state, "epoch": 2, "bad": lambda: None})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_is_number_is_a_finite_real_not_a_bool():
    from mnistnets.train import is_number

    assert all(is_number(v) for v in (0, 1, -3, 0.5, 1e300))
    assert not any(is_number(v) for v in (True, False, float("nan"), float("inf"), -float("inf"), "1", None))


def test_fit_reads_the_config_data_dir_and_needs_data(synthetic_dir, synthetic_data):
    config = _config(epochs=1, train_limit=64, test_limit=32)
    from_dir = list(fit(TrainConfig(**{**config.to_dict(), "data_dir": str(synthetic_dir)})))
    given = list(fit(config, data=synthetic_data))  # fit applies the limits to given data too
    assert [r["test_acc"] for r in from_dir] == [r["test_acc"] for r in given]
    assert from_dir[0]["images_per_second"] > 0 and given[0]["train_loss"] == from_dir[0]["train_loss"]
    with pytest.raises(ValueError, match="data_dir"):
        next(fit(config))  # mnistnets takes paths: no variable or state folder to fall back on
