"""EfficientDet with an aleatoric box-variance head and MC-dropout heads (ALGORITHMS §1).

The model is a pure ``nn.Module`` returning raw per-level maps, as effdet's ``EfficientDet``;
anchors, losses, decoding and NMS live in ``loss.py`` and ``predict.py`` (effdet's "bench"
split). Submodules keep effdet's names (``backbone``, ``fpn``, ``class_net``, ``box_net``) so
effdet and detloop checkpoints load into each other.

Box head layout: ``[B, 4A, H, W]`` means, followed by ``[B, 4A, H, W]`` uncertainty
parameters s under loss attenuation (8·A channels). Within an anchor the four components keep
effdet's order (t_y, t_x, t_h, t_w); code indexes them by the names below.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from effdet import get_efficientdet_config
from effdet.efficientdet import EfficientDet, HeadNet, SeparableConv2d, _init_weight
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import Tensor, nn

from detloop.config import ConfigError, ModelConfig
from detloop.learners.presets import PRESETS

TY, TX, TH, TW = 0, 1, 2, 3  # component order inside the box head (effdet's coder)
_SETUPS = {  # uncertainty setup -> (loss attenuation, MC dropout)
    "baseline": (False, False),
    "lossatt": (True, False),
    "mcdropout": (False, True),
    "mcdropout_lossatt": (True, True),
}
SIGMA_BIAS_INIT = 0.0  # s of a fresh head: σ² = 1 (logvar), so the first steps are plain MSE


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines the network; stored in checkpoint metadata."""

    preset: str
    effdet_name: str
    backbone: str
    image_size: tuple[int, int]  # (H, W) network input
    fpn_channels: int
    fpn_cell_repeats: int
    box_class_repeats: int
    min_level: int
    max_level: int
    anchor_scale: float
    num_classes: int
    loss_attenuation: bool
    mc_dropout: bool
    mc_mode: str
    class_rate: float
    box_rate: float
    backbone_rate: float
    sigma_param: str
    clip_min: float
    clip_max: float

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)


def parse_image_size(value: str | int | None, default: tuple[int, int]) -> tuple[int, int]:
    """``"WxH"`` (ALGORITHMS §1.1: width first) or one side → (H, W)."""
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value)
    w, sep, h = value.lower().partition("x")
    try:
        return (int(h), int(w)) if sep else (int(w), int(w))
    except ValueError:
        raise ValueError(f"model.image_size {value!r}: expected 'WxH' or an integer") from None


def resolve_spec(mcfg: ModelConfig, num_classes: int) -> ModelSpec:
    """Merge a preset with the overrides of ``mcfg`` into a ``ModelSpec``.

    Raises:
        ConfigError: an image size the network cannot take.
    """
    base = get_efficientdet_config(PRESETS[mcfg.preset].base)
    preset: dict[str, Any] = dict(PRESETS[mcfg.preset].model)
    la, mc = _SETUPS[mcfg.uncertainty]

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(mcfg, name, None)
        return value if value is not None else preset.get(name, fallback)

    try:
        size = parse_image_size(mcfg.image_size, tuple(preset.get("image_size", base.image_size)))
    except ValueError as exc:
        raise ConfigError("model", [("model.image_size", str(exc))]) from None
    max_level = int(pick("max_level", base.max_level))
    stride = 2**max_level
    if size[0] % stride or size[1] % stride:
        msg = f"{size[1]}x{size[0]}: both sides must be multiples of {stride} (2^max_level)"
        raise ConfigError("model", [("model.image_size", msg)])
    return ModelSpec(
        preset=mcfg.preset,
        effdet_name=PRESETS[mcfg.preset].base,
        backbone=pick("backbone", base.backbone_name),
        image_size=size,
        fpn_channels=int(pick("fpn_channels", base.fpn_channels)),
        fpn_cell_repeats=int(pick("fpn_cell_repeats", base.fpn_cell_repeats)),
        box_class_repeats=int(pick("box_class_repeats", base.box_class_repeats)),
        min_level=int(pick("min_level", base.min_level)),
        max_level=max_level,
        anchor_scale=float(pick("anchor_scale", base.anchor_scale)),
        num_classes=num_classes,
        loss_attenuation=la,
        mc_dropout=mc,
        mc_mode=mcfg.mc_mode,
        class_rate=mcfg.mc_classheadrate if mc else 0.0,
        box_rate=mcfg.mc_boxheadrate if mc else 0.0,
        backbone_rate=mcfg.mc_dropoutrate if mc and mcfg.mc_mode == "full" else 0.0,
        sigma_param=mcfg.sigma_param,
        clip_min=mcfg.clip_min_uncert,
        clip_max=mcfg.clip_max_uncert,
    )


def effdet_config(spec: ModelSpec) -> Any:
    """The effdet (OmegaConf) config of ``spec``."""
    config = get_efficientdet_config(spec.effdet_name)
    config.update(
        {
            "backbone_name": spec.backbone,
            "image_size": spec.image_size,
            "fpn_channels": spec.fpn_channels,
            "fpn_cell_repeats": spec.fpn_cell_repeats,
            "box_class_repeats": spec.box_class_repeats,
            "min_level": spec.min_level,
            "max_level": spec.max_level,
            "num_levels": spec.num_levels,
            "anchor_scale": spec.anchor_scale,
            "num_classes": spec.num_classes,
        }
    )
    if spec.preset == "tiny":
        config.backbone_args = {"drop_path_rate": 0.0}
        config.norm_kwargs = {"eps": 1e-3, "momentum": 0.1}  # short CPU runs: faster BN stats
    return config


def sigma_squared(s: Tensor, param: str, clip_min: float, clip_max: float) -> Tensor:
    """σ² from the raw head output s (decision 1: σ > 0 always, finite gradients)."""
    if param == "logvar":
        return torch.exp(torch.clamp(s, 2.0 * math.log(clip_min), 2.0 * math.log(clip_max)))
    sigma = torch.clamp(clip_min + F.softplus(s), max=clip_max)
    return sigma * sigma


def draw_masks(shape: tuple[int, ...], rate: float, generator: torch.Generator) -> Tensor:
    """Channel-dropout masks (survivors scaled by 1/(1 − p)) drawn on the generator's device."""
    keep = torch.full(shape, 1.0 - rate, device=generator.device)
    return torch.bernoulli(keep, generator=generator) / (1.0 - rate)


def _predict_conv(head: HeadNet) -> nn.Conv2d:
    pred = head.predict
    conv = pred.conv_pw if hasattr(pred, "conv_pw") else pred.conv
    assert isinstance(conv, nn.Conv2d)
    return conv


class UncertainEfficientDet(nn.Module):
    """EfficientDet plus a variance head (LA) and channel dropout in the heads (MC)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        config = effdet_config(spec)
        det = EfficientDet(config, pretrained_backbone=False)  # never downloads
        self.backbone = det.backbone
        self.fpn = det.fpn
        self.class_net = det.class_net
        self.num_anchors = len(config.aspect_ratios) * config.num_scales
        if spec.loss_attenuation:
            self.box_net = HeadNet(config, num_outputs=8)
            for name, module in self.box_net.named_modules(prefix="box_net"):
                _init_weight(module, name)
            bias = _predict_conv(self.box_net).bias
            assert bias is not None
            with torch.no_grad():
                bias[4 * self.num_anchors :] = SIGMA_BIAS_INIT
        else:
            self.box_net = det.box_net
        self._generator: torch.Generator | None = None
        if spec.backbone_rate > 0:
            self._install_backbone_dropout()

    # ---- dropout sites ------------------------------------------------------------------
    def _install_backbone_dropout(self) -> None:
        """`full` mode: dropout after the expansion and depthwise conv+BN+act of every block."""
        for block in self.backbone.modules():
            if isinstance(block, InvertedResidual):
                sites = [block.bn1, block.bn2]
            elif isinstance(block, DepthwiseSeparableConv):
                sites = [block.bn1]
            else:
                continue
            for site in sites:
                site.register_forward_hook(self._backbone_dropout_hook)

    def _backbone_dropout_hook(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self._generator is None:
            return output
        mask = draw_masks(
            (output.shape[0], output.shape[1], 1, 1), self.spec.backbone_rate, self._generator
        )
        return output * mask.to(output.device, output.dtype)

    def head_masks(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Masks [repeats, levels, n, C, 1, 1] for the class and the box head."""
        shape = (self.spec.box_class_repeats, self.spec.num_levels, n, self.spec.fpn_channels, 1, 1)
        return (
            draw_masks(shape, self.spec.class_rate, generator),
            draw_masks(shape, self.spec.box_rate, generator),
        )

    # ---- forward ------------------------------------------------------------------------
    def features(self, x: Tensor) -> list[Tensor]:
        """Backbone + BiFPN."""
        return list(self.fpn(self.backbone(x)))

    def heads(
        self,
        feats: list[Tensor],
        masks: tuple[Tensor, Tensor] | None = None,
        samples: int = 1,
        chunk: int | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Class and box heads; ``masks`` from :meth:`head_masks` apply channel dropout.

        With ``samples`` T > 1 the features are those of B images and the outputs are [T·B, ...]
        (sample-major). Work identical in every sample runs once on B: the first conv+BN+act
        layer and the depthwise conv after it (a channel mask commutes with a depthwise conv);
        the rest runs on at most ``chunk`` samples at a time (on CPUs one huge batch falls out
        of cache).
        """
        cls_masks, box_masks = masks if masks is not None else (None, None)
        return (
            _run_head(self.class_net, feats, cls_masks, samples, chunk),
            _run_head(self.box_net, feats, box_masks, samples, chunk),
        )

    def sample_flat(
        self, feats: list[Tensor], masks: tuple[Tensor, Tensor], samples: int, chunk: int | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Head-mode MC straight into the flat layout of :func:`flatten_levels` and
        :func:`split_box_maps`: class logits [T·B, N, C], box means and uncertainty parameters
        [T·B, N, 4] (None without LA). Each block of every level is written once, without the
        concatenations of :meth:`heads` (the T-fold outputs are the largest tensors of a
        prediction)."""
        a = self.num_anchors
        sizes = [f.shape[2] * f.shape[3] * a for f in feats]
        total, rows_all = sum(sizes), samples * feats[0].shape[0]
        outs: dict[str, Tensor] = {}

        def block(key: str, rows: slice, start: int, value: Tensor) -> None:
            """value [n, H, W, A·k] → outs[key][rows, start : start + H·W·A] ([n, H·W·A, k])."""
            n, h, w, ak = value.shape
            if key not in outs:
                outs[key] = value.new_empty(rows_all, total, ak // a)
            dest = outs[key][rows, start : start + h * w * a]
            dest.view(n, h, w, a, ak // a).copy_(value.view(n, h, w, a, ak // a))

        start = 0
        for level, x in enumerate(feats):
            for rows, out in _sampled_chunks(self.class_net, level, x, masks[0], samples, chunk):
                block("cls", rows, start, out.permute(0, 2, 3, 1))
            for rows, out in _sampled_chunks(self.box_net, level, x, masks[1], samples, chunk):
                nhwc = out.permute(0, 2, 3, 1)
                block("mu", rows, start, nhwc[..., : 4 * a])
                if self.spec.loss_attenuation:
                    block("s", rows, start, nhwc[..., 4 * a :])
            start += sizes[level]
        return outs["cls"], outs["mu"], outs.get("s")

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One pass; dropout (all MC sites) is applied when ``generator`` is given."""
        self._generator = generator if self.spec.mc_dropout else None
        try:
            feats = self.features(x)
        finally:
            self._generator = None
        masks = None
        if generator is not None and self.spec.mc_dropout:
            masks = self.head_masks(x.shape[0], generator)
        return self.heads(feats, masks)

    def sample(
        self, x: Tensor, samples: int, generator: torch.Generator, chunk: int | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """T stochastic passes stacked along the batch as [T·B, ...] (sample-major).

        `head` mode runs the backbone and BiFPN once and the heads once, vectorised over the T
        samples; `full` mode runs T·B images through the whole network.
        """
        if self.spec.mc_mode == "full":
            return self.forward(x.repeat(samples, 1, 1, 1), generator)
        masks = self.head_masks(samples * x.shape[0], generator)
        return self.heads(self.features(x), masks, samples, chunk)


def _bn(head: HeadNet, rep: int, level: int) -> nn.BatchNorm2d:
    bn = head.bn_rep[rep][level]
    bn = bn[0] if isinstance(bn, nn.Sequential) else bn
    assert isinstance(bn, nn.BatchNorm2d)
    return bn


def _separable(conv: nn.Module) -> bool:
    """A depthwise conv without bias leads ``conv``: it commutes with a channel mask."""
    return isinstance(conv, SeparableConv2d) and conv.conv_dw.bias is None


def _layer(head: HeadNet, rep: int, level: int, x: Tensor, dw_done: bool = False) -> Tensor:
    """conv → BN → act of one head layer; in eval mode BN is folded into the pointwise conv.

    ``dw_done``: ``x`` already went through this layer's depthwise conv.
    """
    conv, bn = head.conv_rep[rep], _bn(head, rep, level)
    if head.training or not isinstance(conv, SeparableConv2d):
        assert not dw_done
        out: Tensor = head.act(bn(conv(x)))
        return out
    assert bn.running_var is not None and bn.running_mean is not None
    assert bn.weight is not None and bn.bias is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    pw = conv.conv_pw
    bias = pw.bias if pw.bias is not None else torch.zeros_like(bn.running_mean)
    weight = pw.weight * scale.view(-1, 1, 1, 1)
    fused = (bias - bn.running_mean) * scale + bn.bias
    x = x if dw_done else conv.conv_dw(x)
    out = head.act(F.conv2d(x, weight.to(x.dtype), fused.to(x.dtype)))
    return out


def _predict(head: HeadNet, x: Tensor, dw_done: bool = False) -> Tensor:
    if not dw_done:
        out: Tensor = head.predict(x)
        return out
    return head.predict.conv_pw(x)  # type: ignore[no-any-return]


def _masked(x: Tensor, mask: Tensor, samples: int) -> Tensor:
    """[B, C, H, W] times masks [T·B, C, 1, 1] (sample-major) → [T·B, C, H, W], channels-last.

    One broadcast multiply; the copies of ``x`` are never materialised unmasked.
    """
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1).unsqueeze(0)  # [1, B, H, W, C]
    m = mask.to(x.device, x.dtype).reshape(samples, b, 1, 1, c)
    return (nhwc * m).reshape(samples * b, h, w, c).permute(0, 3, 1, 2)


def _run_head(
    head: HeadNet,
    feats: list[Tensor],
    masks: Tensor | None,
    samples: int = 1,
    chunk: int | None = None,
) -> list[Tensor]:
    """effdet's ``HeadNet._forward`` with a mask after each conv+BN+act layer."""
    if samples > 1:
        assert masks is not None
        return [
            torch.cat([out for _, out in _sampled_chunks(head, level, x, masks, samples, chunk)])
            for level, x in enumerate(feats)
        ]
    outputs = []
    inplace = not torch.is_grad_enabled()
    for level, x in enumerate(feats):
        for rep in range(len(head.conv_rep)):
            x = _layer(head, rep, level, x)
            if masks is not None:
                mask = masks[rep, level].to(x.device, x.dtype)
                x = x.mul_(mask) if inplace else x * mask
        outputs.append(head.predict(x))
    return outputs


def _sampled_chunks(
    head: HeadNet, level: int, x: Tensor, masks: Tensor, samples: int, chunk: int | None
) -> Iterator[tuple[slice, Tensor]]:
    """One level of a head for T samples, as (rows of [T·B], output) per chunk of samples.

    ``masks`` [R, L, T·B, C, 1, 1] (sample-major). The first conv+BN+act layer sees the same
    input in every sample and runs once on B, and so does the depthwise conv after it:
    dw(x ⊙ m) = dw(x) ⊙ m for a per-channel mask m.
    """
    b, reps, chunk = x.shape[0], len(head.conv_rep), chunk or samples
    x = _layer(head, 0, level, x)
    after = head.conv_rep[1] if reps > 1 else head.predict
    factor = not head.training and _separable(after)
    if factor:
        x = after.conv_dw(x)
    for t0 in range(0, samples, chunk):
        rows = slice(t0 * b, min(samples, t0 + chunk) * b)
        y = _masked(x, masks[0, level, rows], rows.stop // b - t0)
        for rep in range(1, reps):
            y = _layer(head, rep, level, y, dw_done=factor and rep == 1)
            mask = masks[rep, level, rows].to(y.device, y.dtype)
            y = y.mul_(mask) if not torch.is_grad_enabled() else y * mask
        yield rows, _predict(head, y, dw_done=factor and reps == 1)


def flatten_levels(maps: list[Tensor], per_anchor: int) -> Tensor:
    """Per-level maps [B, A·k, H, W] → [B, N, k] in effdet's anchor order."""
    b = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, per_anchor) for m in maps], dim=1)


def split_box_maps(
    model: UncertainEfficientDet, box_maps: list[Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Box head maps → means [B, N, 4] and raw uncertainty parameters s [B, N, 4] (or None)."""
    a4 = 4 * model.num_anchors
    means = flatten_levels([m[:, :a4] for m in box_maps], 4)
    if not model.spec.loss_attenuation:
        return means, None
    return means, flatten_levels([m[:, a4:] for m in box_maps], 4)


def build_model(mcfg: ModelConfig, num_classes: int) -> UncertainEfficientDet:
    """Factory: the configured network with fresh weights (nothing downloaded)."""
    return UncertainEfficientDet(resolve_spec(mcfg, num_classes))
