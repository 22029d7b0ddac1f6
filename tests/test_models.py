import pytest
import torch

from zokernels.models import (ShortcutA, build_model, count_parameters, resnet20, resnet32, resnet44, resnet56,
                              small_cnn)


@pytest.mark.parametrize("factory,expected", [(resnet20, 269_722), (resnet32, 464_154), (resnet44, 658_586),
                                              (resnet56, 853_018)])
def test_resnet_parameter_counts(factory, expected):
    assert count_parameters(factory()) == expected


@pytest.mark.parametrize("depth,expected", [(1, 730), (2, 3_700), (3, 6_670), (4, 9_640), (5, 12_610)])
def test_small_cnn_parameter_counts_match_paper(depth, expected):
    assert count_parameters(small_cnn(depth)) == expected


def test_output_shapes():
    torch.manual_seed(0)
    assert resnet20(num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert small_cnn(2, in_channels=1)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert build_model("small_cnn", depth=4)(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_resnet_uses_option_a_shortcuts_without_parameters():
    model = resnet20()
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # one at each stage transition 16->32 and 32->64
    assert all(sum(p.numel() for p in s.parameters()) == 0 for s in shortcuts)


def test_shortcut_a_subsamples_and_pads_channels():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    y = ShortcutA(4, 8, stride=2)(x)
    assert y.shape == (2, 8, 2, 2)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :2]) == 0 and torch.count_nonzero(y[:, 6:]) == 0


def test_kaiming_init_scale():
    torch.manual_seed(0)
    weight = resnet20().layer3[0].conv2.weight
    fan_in = weight[0].numel()
    # 36,864 draws: the sample std is within 1/√(2n) ≈ 0.4 % of the true one per standard error; 10 % is ~27 se
    assert abs(weight.std().item() - (2.0 / fan_in) ** 0.5) < 0.1 * (2.0 / fan_in) ** 0.5


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="depth"):
        small_cnn(6)
    with pytest.raises(TypeError, match="depth"):
        small_cnn(2.0)
    with pytest.raises(ValueError, match="model"):
        build_model("vgg")
    with pytest.raises(ValueError, match="num_classes"):
        resnet20(num_classes=0)


@pytest.mark.parametrize("pool", ["avg", "max", "none"])
def test_small_cnn_pooling_variants_keep_counts_and_handle_tiny_inputs(pool):
    model = small_cnn(5, pool=pool)
    assert count_parameters(model) == 12_610
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)  # 8x8 pooled 5 times stays >= 1x1 (ceil_mode)
    with pytest.raises(ValueError, match="pool"):
        small_cnn(1, pool="sum")
