import pytest
import torch

from mnistnets.schedules import ScheduleError, build_scheduler, list_schedules, parse_schedule


def _opt(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def _lrs(spec, epochs=4, steps=10, lr=0.1, metrics=None):
    opt = _opt(lr)
    sched = build_scheduler(spec, opt, epochs, steps)
    per_batch = []
    for e in range(epochs):
        for _ in range(steps):
            per_batch.append(sched.get_lr())
            opt.step()
            sched.step_batch()
        sched.step_epoch(metrics[e] if metrics else None)
    return per_batch


def test_parse_valid_specs():
    assert parse_schedule("onecycle:max_lr=0.05,pct_start=0.2") == ("onecycle", {"max_lr": 0.05, "pct_start": 0.2})
    assert parse_schedule("step:step_size=6,gamma=0.1") == ("step", {"step_size": 6, "gamma": 0.1})
    assert parse_schedule(" Cosine ") == ("cosine", {})
    assert parse_schedule("cosine:warmup=1.5")[1] == {"warmup": 1.5}
    assert set(list_schedules()) >= {"onecycle", "step", "multistep", "exponential", "cosine", "plateau", "constant"}


@pytest.mark.parametrize("spec, words", [
    ("bogus", ["unknown schedule 'bogus'", "onecycle", "plateau"]),
    ("step:size=3", ["no key 'size'", "step_size", "gamma"]),
    ("step:step_size=abc", ["step_size='abc'", "int"]),
    ("onecycle:max_lr", ["not key=value"]),
    ("onecycle:max_lr=-1", [">= 0"]),
    ("multistep:milestones=a/b", ["milestones"]),
    ("", ["empty schedule spec"]),
])
def test_bad_specs_name_what_is_valid(spec, words):
    with pytest.raises(ScheduleError) as err:
        parse_schedule(spec)
    for w in words:
        assert w in str(err.value)


def test_onecycle_steps_per_batch_and_peaks_at_max_lr():
    lrs = _lrs("onecycle:max_lr=0.2,pct_start=0.25", epochs=4, steps=10)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.2, rel=1e-6)
    assert peak == pytest.approx(0.25 * 40, abs=1)
    assert lrs[0] == pytest.approx(0.2 / 25)
    assert lrs[-1] < 1e-4  # annealed down to max_lr / (25 * 1e4) at the end
    assert len(set(lrs[:10])) == 10  # it moves within the first epoch: per batch


def test_step_changes_only_at_epoch_boundaries():
    lrs = _lrs("step:step_size=2,gamma=0.5", epochs=4, steps=5, lr=0.1)
    assert lrs[:10] == [pytest.approx(0.1)] * 10
    assert lrs[10:] == [pytest.approx(0.05)] * 10


def test_multistep_and_exponential():
    lrs = _lrs("multistep:milestones=1/3,gamma=0.1", epochs=4, steps=2, lr=1.0)
    assert [round(v, 6) for v in lrs[::2]] == [1.0, 0.1, 0.1, 0.01]
    lrs = _lrs("exponential:gamma=0.5", epochs=3, steps=1, lr=1.0)
    assert lrs == [pytest.approx(v) for v in (1.0, 0.5, 0.25)]


def test_plateau_uses_the_epoch_metric():
    lrs = _lrs("plateau:factor=0.5,patience=0", epochs=4, steps=1, lr=1.0, metrics=[1.0, 1.0, 1.0, 1.0])
    assert lrs[0] == 1.0 and lrs[-1] < 1.0


def test_warmup_ramps_linearly_then_hands_over():
    lrs = _lrs("constant:warmup=1", epochs=3, steps=4, lr=0.4)
    assert lrs[:4] == [pytest.approx(v) for v in (0.1, 0.2, 0.3, 0.4)]
    assert lrs[4:] == [pytest.approx(0.4)] * 8
    lrs = _lrs("cosine:warmup=1", epochs=3, steps=4, lr=0.4)
    assert lrs[3] == pytest.approx(0.4) and lrs[4] == pytest.approx(0.4)
    assert lrs[-1] < 0.1


def test_state_dict_round_trip_continues_identically():
    full = _lrs("onecycle:max_lr=0.3,warmup=1", epochs=4, steps=5)
    opt = _opt()
    s = build_scheduler("onecycle:max_lr=0.3,warmup=1", opt, 4, 5)
    for _ in range(12):
        opt.step()
        s.step_batch()
    state, opt_state = s.state_dict(), opt.state_dict()
    opt2 = _opt()
    s2 = build_scheduler("onecycle:max_lr=0.3,warmup=1", opt2, 4, 5)
    opt2.load_state_dict(opt_state)
    s2.load_state_dict(state)
    rest = []
    for _ in range(8):
        rest.append(s2.get_lr())
        opt2.step()
        s2.step_batch()
    assert rest == [pytest.approx(v) for v in full[12:20]]
