"""DeepLab-v2 / ResNet: shapes, output stride, feature points, torchvision weights, frozen BN, groups."""

import logging

import pytest
import torch
from torch import nn

from cossim_fast.models import (
    MODEL_NAMES,
    DeepLabV2,
    ResNet,
    WeightsError,
    build_model,
    load_torchvision_weights,
)

K = 5


def _small(**kw) -> DeepLabV2:
    return build_model("deeplabv2_small", K, **kw)


def _randomize_bn_stats(module: nn.Module) -> None:
    # Fresh BN stats are 0/1 in every model; random ones make weight-loading checks meaningful.
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)


def _save_torchvision_format(backbone: ResNet, path) -> None:
    state = dict(backbone.state_dict())
    state["fc.weight"] = torch.randn(1000, backbone.out_channels)
    state["fc.bias"] = torch.randn(1000)
    torch.save(state, path)


@pytest.mark.parametrize("feature_point", ["backbone", "pre_activation"])
@pytest.mark.parametrize(("h", "w"), [(128, 64), (33, 33), (64, 128)])
def test_small_model_shapes_output_stride_8(feature_point, h, w):
    model = _small(feature_point=feature_point)
    out = model(torch.randn(2, 3, h, w))
    fh, fw = -(-h // 8), -(-w // 8)
    assert model.output_stride == 8
    assert out.logits.shape == (2, K, fh, fw)
    assert out.features.shape == (2, model.feature_channels, fh, fw)


def test_configurable_output_stride():
    out = _small(output_stride=16)(torch.randn(1, 3, 128, 64))
    assert out.logits.shape[-2:] == (8, 4)


def test_resnet101_tiny_input_output_stride_8():
    model = build_model("deeplabv2_resnet101", K)
    out = model.eval()(torch.randn(1, 3, 33, 33))
    assert out.logits.shape == (1, K, 5, 5)
    assert out.features.shape == (1, 2048, 5, 5)
    # DeepLab-v2 dilation: every 3x3 conv of layer3 / layer4 at dilation 2 / 4, stride 1.
    assert {b.conv2.dilation for b in model.backbone.layer3} == {(2, 2)}
    assert {b.conv2.dilation for b in model.backbone.layer4} == {(4, 4)}
    assert {b.conv2.stride for b in [*model.backbone.layer3, *model.backbone.layer4]} == {(1, 1)}


@pytest.mark.parametrize(("depth", "numel_with_fc", "num_keys"), [(18, 11_689_512, 120), (50, 25_557_032, 318)])
def test_resnet_matches_torchvision_sizes(depth, numel_with_fc, num_keys):
    # Parameter totals of torchvision's resnet18/resnet50 (fc included); keys exclude fc.
    net = ResNet(depth)
    fc = net.out_channels * 1000 + 1000
    assert sum(p.numel() for p in net.parameters()) + fc == numel_with_fc
    assert len(net.state_dict()) == num_keys
    keys = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias"} <= keys
    if depth == 50:
        assert "layer4.2.conv3.weight" in keys and "layer4.2.bn3.num_batches_tracked" in keys


def test_feature_points():
    torch.manual_seed(1)
    post_model = _small(feature_point="backbone").eval()
    pre_model = _small(feature_point="pre_activation").eval()
    pre_model.load_state_dict(post_model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    post, pre = post_model(x), pre_model(x)
    assert (post.features >= 0).all()
    assert (pre.features < 0).any()
    assert not torch.equal(pre.features, post.features)
    torch.testing.assert_close(torch.relu(pre.features), post.features)
    torch.testing.assert_close(pre.logits, post.logits)


def test_pre_activation_features_get_gradient():
    model = _small(feature_point="pre_activation")
    model(torch.randn(1, 3, 64, 64)).features.sum().backward()
    assert model.backbone.layer4[-1].conv2.weight.grad.abs().sum() > 0


def test_aspp_sums_dilated_branches():
    model = _small()
    head = model.classifier
    assert [c.dilation[0] for c in head.convs] == [6, 12, 18, 24]
    assert all(c.out_channels == K and torch.all(c.bias == 0) for c in head.convs)
    feats = torch.randn(1, model.feature_channels, 9, 9)
    torch.testing.assert_close(head(feats), sum(c(feats) for c in head.convs))


def test_load_torchvision_format_weights(tmp_path):
    model_a = _small().eval()
    _randomize_bn_stats(model_a)
    path = tmp_path / "resnet_small.pth"
    _save_torchvision_format(model_a.backbone, path)

    model_b = _small(pretrained=path).eval()
    model_b.classifier.load_state_dict(model_a.classifier.state_dict())
    x = torch.randn(1, 3, 64, 64)
    out_a, out_b = model_a(x), model_b(x)
    torch.testing.assert_close(out_b.features, out_a.features, rtol=0, atol=0)
    torch.testing.assert_close(out_b.logits, out_a.logits, rtol=0, atol=0)
    assert model_b.backbone.freeze_bn  # pretrained => frozen BN by default


def test_load_report_and_old_files_without_num_batches_tracked(tmp_path):
    net = ResNet(18, width=8)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 64), torch.zeros(10)
    path = tmp_path / "old.pth"
    torch.save(state, path)
    report = load_torchvision_weights(ResNet(18, width=8), path)
    assert report.ignored == ("fc.bias", "fc.weight")
    assert report.missing == () and report.unexpected == ()
    assert len(report.loaded) == len(state) - 2


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "resnet101.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_model("deeplabv2_resnet18", K, pretrained=path)


def test_shape_mismatch_names_path_and_key(tmp_path):
    path = tmp_path / "width8.pth"
    _save_torchvision_format(ResNet(18, width=8), path)
    with pytest.raises(WeightsError, match=r"width8\.pth.*conv1\.weight"):
        _small(pretrained=path)  # width 16


def test_missing_and_unexpected_keys(tmp_path, caplog):
    state = {k: v for k, v in ResNet(18, width=8).state_dict().items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"partial\.pth.*missing keys.*layer4\..*unexpected keys.*extra\.weight"):
        load_torchvision_weights(ResNet(18, width=8), path)
    with caplog.at_level(logging.WARNING):
        report = load_torchvision_weights(ResNet(18, width=8), path, strict=False)
    assert report.unexpected == ("extra.weight",)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    assert "missing keys" in caplog.text


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="list.pth"):
        load_torchvision_weights(ResNet(18, width=8), path)


def test_frozen_bn_keeps_running_stats_in_train_mode():
    model = _small(freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    out = model(torch.randn(2, 3, 64, 64) * 3 + 1)
    out.logits.sum().backward()
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad and p.grad is None for m in bns for p in m.parameters())
    for m, (mean, var) in zip(bns, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def test_unfrozen_bn_updates_stats_by_default_without_weights():
    model = _small().train()
    bn = model.backbone.bn1
    model(torch.randn(2, 3, 32, 32) + 1)
    assert not model.backbone.freeze_bn and bn.running_mean.abs().sum() > 0



def test_explicit_freeze_bn_overrides_the_pretrained_default(tmp_path):
    # None follows the weights (frozen exactly when pretrained); an explicit value wins either way.
    path = tmp_path / "resnet_small.pth"
    _save_torchvision_format(_small().backbone, path)
    assert not _small(pretrained=path, freeze_bn=False).backbone.freeze_bn
    assert _small(freeze_bn=True).backbone.freeze_bn

@pytest.mark.parametrize("freeze_bn", [False, True])
def test_parameter_groups_cover_trainable_params_once(freeze_bn):
    model = _small(freeze_bn=freeze_bn)
    groups = model.parameter_groups(2.5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    backbone, head = groups
    assert backbone["name"] == "backbone" and head["name"] == "head"
    assert head["lr"] == pytest.approx(10 * backbone["lr"]) and head["lr_mult"] == 10.0
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9, weight_decay=5e-4)


def test_random_init_notice_and_bad_arguments(caplog):
    with caplog.at_level(logging.WARNING):
        _small()
    assert "randomly initialized" in caplog.text
    assert "deeplabv2_resnet101" in MODEL_NAMES and "deeplabv2_small" in MODEL_NAMES
    with pytest.raises(ValueError, match="unknown model"):
        build_model("deeplabv3", K)
    with pytest.raises(ValueError, match="feature_point"):
        _small(feature_point="logits")
    with pytest.raises(ValueError, match="output_stride"):
        _small(output_stride=4)
