"""Weights as users bring them: an effdet detector checkpoint and a timm ImageNet classifier,
made here by effdet's and timm's own constructors (nothing downloaded), loaded into the d0
uncertainty model; another architecture is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detloop.config import ExperimentConfig, ModelConfig
from detloop.data.errors import DataError
from detloop.learners.checkpoint import load_weights
from detloop.learners.foreign_weights import load_foreign, unwrap
from detloop.learners.model import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coco_d0() -> dict[str, torch.Tensor]:
    """A COCO-shaped (90 classes) tf_efficientdet_d0, as effdet builds it."""
    from effdet import create_model

    torch.manual_seed(1)
    det = create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False)
    return {k: v.clone() for k, v in det.state_dict().items()}


def _d0() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="d0", uncertainty="mcdropout_lossatt"), 10)


def test_an_effdet_detector_loads_where_it_fits(
    coco_d0: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    fresh = _d0().state_dict()
    model = _d0()
    file = tmp_path / "d0_coco.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in coco_d0.items()}}, file)  # DetBench
    load_weights(model, file, "detector")
    after = model.state_dict()
    same_shape = [k for k in after if k in coco_d0 and coco_d0[k].shape == after[k].shape]
    for key in same_shape:  # backbone, BiFPN, both towers, the depthwise predict convs
        assert torch.equal(after[key], coco_d0[key]), key
    parts = {k.split(".")[0] for k in same_shape}
    assert parts == {"backbone", "fpn", "class_net", "box_net"}
    assert all(k in same_shape for k in after if k.startswith(("backbone.", "fpn.")))
    # 10 classes, not 90: the class predict layer keeps its initialisation
    for key in ("class_net.predict.conv_pw.weight", "class_net.predict.conv_pw.bias"):
        assert torch.equal(after[key], fresh[key])
    # loss attenuation: 8 channels per anchor, effdet has 4 — means loaded, variances kept
    for key in ("box_net.predict.conv_pw.weight", "box_net.predict.conv_pw.bias"):
        means = coco_d0[key].shape[0]
        assert torch.equal(after[key][:means], coco_d0[key])
        assert torch.equal(after[key][means:], fresh[key][means:])


def test_the_report_counts_each_part(coco_d0: dict[str, torch.Tensor]) -> None:
    model = _d0()
    report = load_foreign(model, coco_d0, "detector", "d0_coco.pth")
    own = model.state_dict()
    assert sum(report.loaded.values()) + sum(report.kept.values()) == len(own)
    assert report.kept["backbone"] == report.kept["fpn"] == 0
    assert report.kept["class_net"] == 2 and report.kept["box_net"] == 0  # class pw w + b
    assert sorted(report.partial) == [
        "box_net.predict.conv_pw.bias",
        "box_net.predict.conv_pw.weight",
    ]
    assert report.skipped == {
        "class_net.predict.conv_pw.weight": "shape differs",
        "class_net.predict.conv_pw.bias": "shape differs",
    }
    table = report.table()
    assert "backbone" in table and "skipped (shape differs)" in table and "partly" in table


def test_a_timm_imagenet_classifier_loads_as_the_backbone(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(2)
    classifier = timm.create_model("tf_efficientnet_b0", pretrained=False).state_dict()
    fresh = _d0().state_dict()
    model = _d0()
    file = tmp_path / "b0_imagenet.pth"
    torch.save(classifier, file)
    load_weights(model, file, "backbone")
    after = model.state_dict()
    backbone = [k for k in after if k.startswith("backbone.")]
    for key in backbone:
        assert torch.equal(after[key], classifier[key.removeprefix("backbone.")]), key
    assert all(torch.equal(after[k], fresh[k]) for k in after if not k.startswith("backbone."))
    report = load_foreign(_d0(), classifier, "backbone", str(file))
    assert report.loaded["backbone"] == len(backbone) and report.kept["backbone"] == 0
    assert {"classifier.weight", "conv_head.weight"} <= set(report.skipped)  # the file's names
    assert set(report.skipped.values()) == {"not in the model"}


def test_another_architecture_is_refused(tmp_path: Path, coco_d0: dict[str, torch.Tensor]) -> None:
    import timm

    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    for kind in ("backbone", "detector"):
        with pytest.raises(DataError, match="another architecture"):
            load_foreign(_d0(), resnet, kind, "resnet18.pth")
    tiny = build_model(ModelConfig(preset="tiny"), 10)  # MobileNetV3 backbone, narrower BiFPN
    with pytest.raises(DataError, match=r"tensors fit \(\d+%\)"):
        load_foreign(tiny, coco_d0, "detector", "d0_coco.pth")


def test_wrappers_are_unwrapped_and_the_kind_is_a_config_value() -> None:
    t = torch.zeros(1)
    assert unwrap({"module.model.a": t, "module.model.b": t}) == {"a": t, "b": t}
    assert unwrap({"model.a": t, "b": t}) == {"model.a": t, "b": t}  # not every key: kept
    cfg = ExperimentConfig.model_validate({"model": {"weights_kind": "detector"}})
    assert cfg.model.weights_kind == "detector"
