"""The four seed models against the seed's tables, the registry, and the summary/checks."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import mnistnets
from mnistnets.models import (
    MODEL_REGISTRY,
    UnknownModelError,
    count_parameters,
    create_model,
    list_models,
)
from mnistnets.summary import (
    LayerRow,
    architecture_checks,
    format_checks,
    format_table,
    layer_table,
)

try:  # tests/ as a package or as a plain folder on sys.path
    from . import seed_tables
except ImportError:  # pragma: no cover - depends on how pytest imports tests/
    import seed_tables

SEED_TABLES = seed_tables.SEED_TABLES
MODELS = ["v0", "v1", "v2", "v3"]


# ----------------------------------------------------------------------------- registry


def test_registry_lists_exactly_the_four_seed_models():
    assert list_models() == MODELS
    assert sorted(MODEL_REGISTRY) == MODELS
    assert mnistnets.list_models() == MODELS
    from mnistnets.config import MODEL_NAMES  # the torch-free names settings are checked against

    assert list(MODEL_NAMES) == MODELS
    assert mnistnets.create_model is create_model
    assert mnistnets.count_parameters is count_parameters


def test_unknown_model_raises_with_the_valid_names():
    with pytest.raises(UnknownModelError) as info:
        create_model("v9")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'v9'" in message
    for name in MODELS:
        assert name in message
    assert info.value.valid == MODELS


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="dropout"):
        create_model("v1", dropuot=0.1)


def test_create_model_returns_fresh_instances():
    a, b = create_model("v1"), create_model("v1")
    assert a is not b
    assert a.head.weight.data_ptr() != b.head.weight.data_ptr()


# ----------------------------------------------------------------------------- the seed's tables


@pytest.mark.parametrize("name", MODELS)
def test_layer_table_equals_the_seed_row_by_row(name):
    rows = layer_table(create_model(name))
    seed = SEED_TABLES[name]
    assert len(rows) == len(seed)
    for row, (seed_name, seed_shape, seed_params) in zip(rows, seed):
        assert (row.name, row.type, row.output_shape, row.params) == (
            seed_name,
            seed_name.rsplit("-", 1)[0],
            seed_shape,
            seed_params,
        ), f"{name}: {row} != seed {seed_name} {seed_shape} {seed_params}"


@pytest.mark.parametrize("name", MODELS)
def test_totals_equal_the_seed(name):
    model = create_model(name)
    total = seed_tables.TOTALS[name]
    assert count_parameters(model) == total
    assert count_parameters(model, trainable_only=True) == total
    assert sum(r.params for r in layer_table(model)) == total
    text = format_table(model)
    assert f"Total params: {total:,}" in text.splitlines()
    assert f"Trainable params: {total:,}" in text.splitlines()
    assert "Non-trainable params: 0" in text.splitlines()


def test_seed_totals_are_the_design_numbers():
    assert seed_tables.TOTALS == {"v0": 18214, "v1": 10970, "v2": 4232, "v3": 7932}
    for name, rows in SEED_TABLES.items():
        assert sum(p for _, _, p in rows) == seed_tables.TOTALS[name]


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_has_no_bias(name):
    convs = [m for m in create_model(name).modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)


def test_format_table_v0_equals_the_seed_text_block():
    ours = [line.rstrip() for line in format_table(create_model("v0")).splitlines()]
    seed = [line.rstrip() for line in seed_tables.V0_TEXT.splitlines()]
    assert ours == seed


@pytest.mark.parametrize("name", sorted(seed_tables.SIZES_MB))
def test_format_table_size_estimate_matches_the_seed_logs(name):
    lines = format_table(name, sizes=True).splitlines()
    labels = ["Input size (MB)", "Forward/backward pass size (MB)", "Params size (MB)", "Estimated Total Size (MB)"]
    expected = [f"{label}: {value}" for label, value in zip(labels, seed_tables.SIZES_MB[name])]
    assert lines[-5:-1] == expected
    assert lines[-1] == "-" * 64


def test_format_table_accepts_rows_and_names():
    model = create_model("v2")
    rows = layer_table(model)
    assert format_table(rows) == format_table(model) == format_table("v2")
    assert isinstance(rows[0], LayerRow) and rows[0].trainable_params == 36


def test_seed_tables_transcription_matches_seed_document():
    """tests/seed_tables.py is a faithful copy of shared/seed-models.md (when it is around)."""
    doc = Path(__file__).resolve().parents[2] / "shared" / "seed-models.md"
    if not doc.is_file():
        pytest.skip(f"{doc} not present")
    text = doc.read_text(encoding="utf-8")
    for name, rows in SEED_TABLES.items():
        block = "\n".join(
            "{:>20}  {:>25} {:>15}".format(n, str(list(s)), f"{p:,}") for n, s, p in rows
        )
        assert block in text, name
    assert seed_tables.V0_TEXT.rstrip("\n") in text


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_forward_gives_log_probabilities(name, train):
    torch.manual_seed(0)
    model = create_model(name).train(train)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(3), atol=1e-5)
    assert (out <= 0).all()


def test_backward_reaches_every_parameter():
    model = create_model("v3")
    out = model(torch.randn(4, 1, 28, 28))
    nn.functional.nll_loss(out, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- dropout option


def _dropout_rates(model):
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout2d)]


@pytest.mark.parametrize("name,n", [("v1", 2), ("v2", 1), ("v3", 1)])
def test_dropout_option_sets_every_dropout2d(name, n):
    assert _dropout_rates(create_model(name)) == [0.05] * n  # the default
    assert _dropout_rates(create_model(name, dropout=0.2)) == [0.2] * n
    assert _dropout_rates(create_model(name, dropout=None)) == [0.05] * n
    assert _dropout_rates(create_model(name, dropout=0.0)) == [0.0] * n
    # the option never changes the architecture
    assert layer_table(create_model(name, dropout=0.3)) == layer_table(create_model(name))


def test_v0_accepts_and_ignores_dropout():
    model = create_model("v0", dropout=0.3)
    assert _dropout_rates(model) == []
    assert layer_table(model) == layer_table(create_model("v0"))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_dropout_rate_is_rejected(bad):
    with pytest.raises(ValueError, match="dropout"):
        create_model("v1", dropout=bad)


# ----------------------------------------------------------------------------- architecture checks

# Receptive fields by hand, r += (k-1)*j, j *= stride, starting from r=1, j=1:
#   v0: conv3 r=3, conv3 r=5, pool2 r=6 j=2, conv3 r=10, conv3 r=14, pool2 r=16 j=4,
#       conv3 r=24 (7x7 map), global avg pool over 7x7: r += (7-1)*4 -> 48, Linear on 1x1: 48
#   v1: conv3 3, conv3 5, conv3 7, pool2 8 j=2, 1x1 8, conv3 12, conv3 16, 1x1 16,
#       conv7: 16 + 6*2 = 28
#   v2: conv3 3, conv3 5, pool2 6 j=2, conv3 10, conv3 14, pool2 16 j=4, 1x1 16, conv3 24,
#       1x1 24, conv3 (no pad, 7->5) 32, AvgPool2d(5): 32 + 4*4 = 48
#   v3: conv3 3, conv3 5, pool2 6 j=2, conv3 10, conv3 14, pool2 16 j=4, 1x1 16, conv3 24,
#       conv3 32, conv3 40 (3x3 map), AvgPool2d(3): 40 + 2*4 = 48, 1x1 48
EXPECTED_CHECKS = {
    "v0": {"batchnorm": 5, "dropout": 0, "linear": 1, "global_pooling": 1, "receptive_field": 48, "params": 18214},
    "v1": {"batchnorm": 7, "dropout": 2, "linear": 0, "global_pooling": 0, "receptive_field": 28, "params": 10970},
    # the seed's checker printed "Dropout layers used: 0" for v2: it missed the Dropout2d
    "v2": {"batchnorm": 7, "dropout": 1, "linear": 0, "global_pooling": 1, "receptive_field": 48, "params": 4232},
    "v3": {"batchnorm": 7, "dropout": 1, "linear": 0, "global_pooling": 1, "receptive_field": 48, "params": 7932},
}


@pytest.mark.parametrize("name", MODELS)
def test_architecture_checks(name):
    assert architecture_checks(create_model(name)) == EXPECTED_CHECKS[name]


@pytest.mark.parametrize("name", MODELS)
def test_format_checks_is_readable(name):
    text = format_checks(create_model(name))
    expected = EXPECTED_CHECKS[name]
    assert f"Architecture checks: {name}" in text
    assert f"{expected['params']:,}" in text
    assert f"Receptive field:                    {expected['receptive_field']} px" in text
    assert "Dropout layers (incl. Dropout2d):   %d" % expected["dropout"] in text


def test_avgpool_that_leaves_part_of_the_map_is_not_global():
    # AvgPool2d(5) on a 7x7 map: one 5x5 window, output 1x1, but 2 rows/cols never seen
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.AvgPool2d(5), nn.Flatten())
    checks = architecture_checks(model, input_size=(1, 7, 7))
    assert checks["global_pooling"] == 0
    assert checks["receptive_field"] == 3 + 4  # conv3: 3, pool5: +4*1
    assert architecture_checks(nn.Sequential(nn.AvgPool2d(7)), (1, 7, 7))["global_pooling"] == 1
    assert architecture_checks(nn.Sequential(nn.AdaptiveMaxPool2d(1)), (1, 7, 7))["global_pooling"] == 1


def test_receptive_field_uses_dilation_and_dense_layers():
    # dilated conv3 (d=2): effective kernel 5 -> r = 5; stride-2 conv3: r = 7, j = 2
    model = nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2), nn.Conv2d(1, 1, 3, stride=2))
    assert architecture_checks(model, (1, 28, 28))["receptive_field"] == 7
    # a Linear on a flattened map sees all of it: conv3 stride 2 on 28x28 -> 13x13
    dense = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Flatten(), nn.Linear(13 * 13, 10))
    # conv3 s2: r=3, j=2 (13x13 map); Linear covers 13 positions: r = 3 + 12*2 = 27
    assert architecture_checks(dense, (1, 28, 28)) == {
        "batchnorm": 0, "dropout": 0, "linear": 1, "global_pooling": 0, "receptive_field": 27, "params": 9 + 1 + 169 * 10 + 10,
    }


def test_dropout_counts_plain_dropout_too():
    model = nn.Sequential(nn.Dropout2d(0.1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(784, 10))
    checks = architecture_checks(model)
    assert checks["dropout"] == 2 and checks["linear"] == 1


# ----------------------------------------------------------------------------- table mechanics


@pytest.mark.parametrize("train", [True, False])
def test_layer_table_restores_the_mode_and_leaves_state_alone(train):
    model = create_model("v1").train(train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_table(model)
    architecture_checks(model)
    assert model.training is train
    assert all(m.training is train for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mixed_modes_are_restored_per_module():
    model = create_model("v2").train()
    model.input_conv[1].eval()  # e.g. a frozen BatchNorm
    layer_table(model)
    assert model.training and not model.input_conv[1].training and model.input_conv[4].training


def test_a_module_called_twice_gives_two_rows():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(self.act(self.conv(x))))

    rows = layer_table(Twice())
    assert [r.name for r in rows] == ["Conv2d-1", "ReLU-2", "Conv2d-3", "ReLU-4"]
    assert architecture_checks(Twice())["receptive_field"] == 5
