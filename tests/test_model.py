"""Model, heads and losses (ALGORITHMS §1): the "Tests that pin it" of §1 and the factory."""

from __future__ import annotations

import math

import pytest
import torch

from detloop.config import ConfigError, ModelConfig
from detloop.learners.loss import (
    LossSettings,
    Targets,
    box_monitors,
    detection_loss,
    la_level_loss,
    level_sizes,
    lognormal_shift,
    make_anchors,
)
from detloop.learners.model import (
    TH,
    TW,
    TX,
    TY,
    UncertainEfficientDet,
    build_model,
    flatten_levels,
    parse_image_size,
    resolve_spec,
    sigma_squared,
    split_box_maps,
)
from detloop.learners.predict import entropy_bits, sample_mean_std

torch.set_num_threads(1)


def tiny(**kw: object) -> UncertainEfficientDet:
    torch.manual_seed(0)
    return build_model(ModelConfig(**kw), num_classes=3).eval()  # type: ignore[arg-type]


# ---- (a) LA loss hand example ----------------------------------------------------------------
@pytest.mark.parametrize(("form", "expected"), [("reference", 0.0478929), ("nll", -0.0766434)])
def test_la_loss_hand_example(form: str, expected: float) -> None:
    ell = torch.full((1, 2, 4), 0.04)  # one positive anchor and one negative one
    var = torch.full((1, 2, 4), 0.25)
    mask = torch.tensor([[1.0, 0.0]])
    n_pos = torch.tensor(2.0)  # one positive + 1
    assert la_level_loss(ell, var, mask, n_pos, form).item() == pytest.approx(expected, abs=1e-7)


def test_la_loss_through_detection_loss_and_logvar() -> None:
    """Same example through the whole box loss: s = ln 0.25, residual 0.2 per entry."""
    n = 5
    var = 0.25
    s = torch.full((1, n, 4), math.log(var))
    target = torch.zeros(1, n, 4)
    mu = torch.full((1, n, 4), 0.2)  # MSE residual 0.04 after the shift is undone below
    mu[..., [TH, TW]] -= var / 2  # μ' = μ + σ²/2 on sizes → 0.2 everywhere
    cls = torch.full((1, n), -1, dtype=torch.long)
    cls[0, 0] = 1
    targets = Targets(cls, target, torch.ones(1, n), torch.tensor([1.0]))
    settings = LossSettings(0.25, 1.5, 1.0, "MSE", 0.1, "reference", True, "logvar", 0.01, 1024.0)
    _, _, l_box = detection_loss(torch.zeros(1, n, 3), mu, s, targets, [n], settings)
    assert l_box.item() == pytest.approx(0.0478929, abs=1e-6)
    assert sigma_squared(torch.tensor(math.log(var)), "logvar", 0.01, 1024).item() == pytest.approx(
        var
    )


# ---- (b) shift only on sizes -----------------------------------------------------------------
def test_lognormal_shift_only_moves_sizes_for_every_anchor() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 9, 4, generator=gen)
    var = torch.rand(2, 9, 4, generator=gen)
    base = lognormal_shift(mu, var)
    for a in range(9):
        for k in (TX, TY):
            v2 = var.clone()
            v2[:, a, k] += 0.7
            assert torch.equal(lognormal_shift(mu, v2), base)
        for k in (TW, TH):
            v2 = var.clone()
            v2[:, a, k] += 0.7
            diff = lognormal_shift(mu, v2) - base
            expected = torch.zeros_like(diff)
            expected[:, a, k] = 0.35
            assert torch.allclose(diff, expected, atol=1e-6)


def test_variance_channels_map_to_their_anchor_and_component() -> None:
    model = tiny(uncertainty="lossatt")
    maps = [torch.zeros(1, 8 * model.num_anchors, 2, 2)]
    a, k = 4, TH
    maps[0][0, 4 * model.num_anchors + 4 * a + k, 1, 0] = 1.0  # s of anchor a, component k
    mu, s = split_box_maps(model, maps)
    assert s is not None and mu.abs().sum() == 0
    loc = (1 * 2 + 0) * model.num_anchors + a  # (row, col, anchor) flattening
    assert s[0, loc, k] == 1.0 and s.sum() == 1.0


# ---- (c) finite gradients at extreme s ----------------------------------------------------------
@pytest.mark.parametrize("param", ["logvar", "softplus"])
@pytest.mark.parametrize("form", ["reference", "nll"])
@pytest.mark.parametrize("value", [50.0, -50.0])
def test_gradients_finite_at_extreme_s(param: str, form: str, value: float) -> None:
    n = 6
    s = torch.full((1, n, 4), value, requires_grad=True)
    mu = torch.zeros(1, n, 4, requires_grad=True)
    cls = torch.tensor([[0, -1, 2, -1, -1, -1]])
    targets = Targets(cls, torch.full((1, n, 4), 0.3), torch.ones(1, n), torch.tensor([2.0]))
    settings = LossSettings(0.25, 1.5, 100.0, "MSE", 0.1, form, True, param, 0.01, 1024.0)
    logits = torch.zeros(1, n, 3, requires_grad=True)
    loss, _, _ = detection_loss(logits, mu, s, targets, [n], settings)
    loss.backward()
    assert torch.isfinite(loss)
    for t in (s, mu, logits):
        assert t.grad is not None and torch.isfinite(t.grad).all()


# ---- (d) head mode runs the backbone once, equals a loop over T head calls ---------------------
def test_head_mode_single_backbone_call_and_equals_naive_loop() -> None:
    model = tiny(mc_classheadrate=0.3, mc_boxheadrate=0.3)
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    samples = 4
    with torch.no_grad():
        cls_v, box_v = model.sample(x, samples, torch.Generator().manual_seed(5))
        assert len(calls) == 1
        masks = model.head_masks(samples * 2, torch.Generator().manual_seed(5))
        feats = model.features(x)
        for t in range(samples):
            sl = slice(2 * t, 2 * t + 2)
            cls_t, box_t = model.heads(feats, (masks[0][:, :, sl], masks[1][:, :, sl]))
            for lv in range(len(cls_t)):
                assert torch.allclose(cls_v[lv][sl], cls_t[lv], atol=1e-5)
                assert torch.allclose(box_v[lv][sl], box_t[lv], atol=1e-5)
    # different samples do differ (dropout is active)
    assert not torch.allclose(cls_v[0][0:2], cls_v[0][2:4])


@pytest.mark.parametrize("repeats", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_sample_flat_equals_flattened_head_maps(
    repeats: int, channels_last: bool, chunk: int | None
) -> None:
    """The shared-prefix, block-written head path equals a naive loop of masked head calls
    (which runs the first layer and its depthwise conv on every sample)."""
    model = tiny(mc_classheadrate=0.3, mc_boxheadrate=0.3, box_class_repeats=repeats)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    samples = 4
    with torch.no_grad():
        feats = model.features(x.contiguous(memory_format=fmt))
        masks = model.head_masks(samples * 2, torch.Generator().manual_seed(5))
        cls, mu, s = model.sample_flat(feats, masks, samples, chunk)
        for t in range(samples):
            sl = slice(2 * t, 2 * t + 2)
            cls_maps, box_maps = model.heads(feats, (masks[0][:, :, sl], masks[1][:, :, sl]))
            mu_t, s_t = split_box_maps(model, box_maps)
            assert s is not None and s_t is not None
            assert torch.allclose(cls[sl], flatten_levels(cls_maps, 3), atol=1e-5)
            assert torch.allclose(mu[sl], mu_t, atol=1e-5)
            assert torch.allclose(s[sl], s_t, atol=1e-5)


def test_full_mode_runs_dropout_in_backbone_blocks() -> None:
    model = tiny(mc_mode="full", mc_dropoutrate=0.2, mc_classheadrate=0.0, mc_boxheadrate=0.0)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats_a = model.features(x)
        cls, _ = model.sample(x, 3, torch.Generator().manual_seed(0))
        feats_b = model.features(x)  # hooks are inert without a generator
    assert torch.equal(feats_a[0], feats_b[0])
    assert cls[0].shape[0] == 3
    assert not torch.allclose(cls[0][0], cls[0][1])


# ---- (e) rate 0: MC samples equal the deterministic pass ---------------------------------------
def test_rate_zero_samples_equal_deterministic_output() -> None:
    model = tiny(mc_classheadrate=0.0, mc_boxheadrate=0.0)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_d, box_d = model(x)
        cls_s, box_s = model.sample(x, 5, torch.Generator().manual_seed(0))
    for lv in range(len(cls_d)):
        stacked = cls_s[lv].reshape(5, *cls_d[lv].shape)
        mean, std = sample_mean_std(stacked)
        assert torch.allclose(mean, cls_d[lv], atol=1e-6) and float(std.max()) == 0.0
        mean_b, std_b = sample_mean_std(box_s[lv].reshape(5, *box_d[lv].shape))
        assert torch.allclose(mean_b, box_d[lv], atol=1e-6) and float(std_b.max()) == 0.0


# ---- (f) entropy ------------------------------------------------------------------------------
def test_entropy_bounds() -> None:
    assert entropy_bits(torch.zeros(7)).item() == pytest.approx(math.log2(7), rel=1e-6)
    assert entropy_bits(torch.tensor([30.0, 0.0, 0.0, 0.0])).item() < 1e-3


# ---- factory -----------------------------------------------------------------------------------
def test_tiny_preset_and_overrides() -> None:
    spec = resolve_spec(ModelConfig(), 10)
    assert spec.backbone == "mobilenetv3_small_100" and spec.image_size == (128, 128)
    assert (spec.fpn_channels, spec.fpn_cell_repeats, spec.box_class_repeats) == (32, 1, 1)
    assert (spec.min_level, spec.max_level, spec.num_levels) == (3, 5, 3)
    assert spec.loss_attenuation and spec.mc_dropout and spec.class_rate == 0.05
    spec = resolve_spec(
        ModelConfig(image_size="256x128", fpn_channels=24, uncertainty="baseline"), 4
    )
    assert spec.image_size == (128, 256) and spec.fpn_channels == 24
    assert not spec.loss_attenuation and not spec.mc_dropout and spec.class_rate == 0.0
    d0 = resolve_spec(ModelConfig(preset="d0"), 7)
    assert (
        d0.image_size == (512, 1024) and d0.backbone == "tf_efficientnet_b0" and d0.num_levels == 5
    )
    for k in range(1, 8):
        assert resolve_spec(ModelConfig(preset=f"d{k}"), 7).fpn_channels >= 64  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multiples of 32"):
        resolve_spec(ModelConfig(image_size=100), 3)
    assert parse_image_size("1024x512", (1, 1)) == (512, 1024)


@pytest.mark.parametrize(
    ("setup", "box_channels"),
    [("baseline", 4), ("lossatt", 8), ("mcdropout", 4), ("mcdropout_lossatt", 8)],
)
def test_setups_build_with_head_widths(setup: str, box_channels: int) -> None:
    model = tiny(uncertainty=setup)
    with torch.no_grad():
        cls, box = model(torch.zeros(1, 3, 128, 128))
    assert box[0].shape[1] == box_channels * 9 and cls[0].shape[1] == 3 * 9
    assert [c.shape[-1] for c in cls] == [16, 8, 4]
    anchors = make_anchors(model.spec)
    assert sum(level_sizes(anchors)) == anchors.boxes.shape[0] == sum(c[0, :9].numel() for c in cls)


def test_zero_loss_weight_image_contributes_nothing() -> None:
    from effdet.anchors import AnchorLabeler

    from detloop.learners.loss import label_batch

    model = tiny()
    labeler = AnchorLabeler(make_anchors(model.spec), 3, match_threshold=0.5)
    boxes = torch.tensor([[[10.0, 10.0, 40.0, 30.0]], [[50.0, 60.0, 90.0, 80.0]]])
    classes = torch.tensor([[1], [2]])
    weights = torch.tensor([[0.0], [2.0]])
    targets = label_batch(labeler, boxes, classes, weights)
    assert targets.weight[0].max() == 0 and targets.weight[1].min() == 2.0
    assert int(targets.num_pos.min()) >= 1  # forced match per GT
    box_mode = label_batch(labeler, boxes, classes, torch.tensor([[3.0], [1.0]]), mode="box")
    assert set(box_mode.weight[0].unique().tolist()) == {3.0}
    empty = label_batch(labeler, boxes[:1], torch.tensor([[-1]]), weights[:1], empty_weight=0.5)
    assert float(empty.weight.min()) == 0.5 and int(empty.num_pos[0]) == 0


# ---- training monitors (§1.2) ----------------------------------------------------------------
@pytest.mark.parametrize("la", [True, False])
def test_box_monitors_equal_a_loop_over_positive_anchors(la: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    b, n = 2, 50
    mu, box = torch.randn(b, n, 4, generator=gen), torch.randn(b, n, 4, generator=gen)
    s = torch.randn(b, n, 4, generator=gen)
    cls = torch.randint(-2, 3, (b, n), generator=gen)
    weight = (torch.rand(b, n, generator=gen) > 0.2).float()
    targets = Targets(cls, box, weight, torch.ones(b))
    settings = LossSettings(0.25, 1.5, 100.0, "MSE", 0.1, "reference", la, "logvar", 0.01, 1024.0)
    rmse, sig_mean, sig_std = box_monitors(mu, s, targets, settings)
    errs, sigmas = [], []
    for i in range(b):
        for j in range(n):
            if cls[i, j] >= 0 and weight[i, j] > 0:
                errs += [float(mu[i, j, k] - box[i, j, k]) ** 2 for k in range(4)]
                sigmas += [math.exp(0.5 * float(s[i, j, k])) for k in range(4)]
    assert rmse == pytest.approx(math.sqrt(sum(errs) / len(errs)), rel=1e-5)
    if la:
        mean = sum(sigmas) / len(sigmas)
        std = math.sqrt(sum((x - mean) ** 2 for x in sigmas) / len(sigmas))
        assert sig_mean == pytest.approx(mean, rel=1e-5) and sig_std == pytest.approx(std, rel=1e-4)
    else:
        assert math.isnan(sig_mean) and math.isnan(sig_std)


def test_every_configurable_preset_is_defined_once() -> None:
    """The config's preset names and the presets module agree, and each preset's training
    defaults are real TrainConfig fields (one table, not two that drift apart)."""
    from typing import get_args

    from detloop.config import ModelPreset, TrainConfig
    from detloop.learners.presets import PRESETS

    assert set(PRESETS) == set(get_args(ModelPreset))
    for preset in PRESETS.values():
        assert set(preset.train) <= set(TrainConfig.model_fields)
