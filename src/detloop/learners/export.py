"""Serving formats of a trained detector: ONNX and TorchScript.

What is exported is the deterministic network (no MC dropout): a preprocessed image batch in,
the raw maps of every anchor out, flattened in effdet's anchor order —

    image        [B, 3, H, W]  float32, as detloop's loader makes it (resized to the model's
                               size, letterboxed, ImageNet mean/std normalised)
    class_logits [B, N, C]     one logit per class (sigmoid → score)
    box_deltas   [B, N, 4]     encoded box (t_y, t_x, t_h, t_w) relative to the anchors
    box_log_var  [B, N, 4]     raw aleatoric parameters s (σ² per §1.2); zeros without LA

Post-processing (decoding against ``anchors.npy``, NMS, the predictions table) is detloop's own:
:func:`predictions_from_outputs` turns these arrays into the same table ``detloop predict``
writes (deterministic mode), so a server can run the ONNX graph and keep detloop's decoding.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from detloop.learners.model import UncertainEfficientDet, flatten_levels, split_box_maps

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OUTPUTS = ("class_logits", "box_deltas", "box_log_var")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


class ServingDetector(nn.Module):
    """The deterministic forward pass with flat outputs (see the module docstring)."""

    def __init__(self, model: UncertainEfficientDet) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls_maps, box_maps = self.model(image)
        mu, s = split_box_maps(self.model, box_maps)
        logits = flatten_levels(cls_maps, self.model.spec.num_classes)
        return logits, mu, s if s is not None else torch.zeros_like(mu)


def export(model: UncertainEfficientDet, fmt: str, out_dir: Path, batch: int = 1) -> Path:
    """Write the serving file of ``model`` in ``fmt`` into ``out_dir``; returns its path."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    net = ServingDetector(model.float().eval().to(memory_format=torch.contiguous_format))
    h, w = model.spec.image_size
    example = torch.zeros(batch, 3, h, w)
    path = out_dir / FILES[fmt]
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(
                net,
                (example,),
                str(path),
                input_names=["image"],
                output_names=list(OUTPUTS),
                dynamic_axes={n: {0: "batch"} for n in ("image", *OUTPUTS)},
                opset_version=18,
                dynamo=False,
            )
        else:
            traced: Any = torch.jit.trace(net, example, check_trace=False)  # type: ignore[no-untyped-call]
            traced.save(str(path))
    return path


def write_manifest(out_dir: Path, info: dict[str, Any]) -> Path:
    """``manifest.json``: ``info`` plus the size and sha256 of every file in ``out_dir``."""
    from detloop.data.io import file_digests

    target = out_dir / "manifest.json"
    target.write_text(
        json.dumps({**info, "files": file_digests(out_dir)}, indent=1, sort_keys=True)
    )
    return target


def run_onnx(path: Path, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """The ONNX file's outputs for a preprocessed batch, with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(list(OUTPUTS), {"image": image.astype(np.float32)}))


def run_torchscript(path: Path, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """The TorchScript file's outputs for a preprocessed batch."""
    module: Any = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return tuple(o.numpy() for o in module(torch.from_numpy(image.astype(np.float32))))


def torch_outputs(model: UncertainEfficientDet, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same outputs computed by torch (the reference of the parity check)."""
    with torch.no_grad():
        out = ServingDetector(model.float().eval())(torch.from_numpy(image.astype(np.float32)))
    return tuple(o.numpy() for o in out)


def timed(fn: Any, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def predictions_from_outputs(
    predictor: Any,
    outputs: tuple[np.ndarray, ...],
    image_ids: list[str],
    scales: list[float],
    sizes: list[tuple[float, float]],
    seed: int = 0,
) -> pa.Table:
    """detloop's post-processing of served outputs: the predictions table ``predictor``
    (deterministic, ``mc_dropoutsamp`` 1) would write for these images."""
    from detloop.learners.predict import _to_original, build_table

    cls, mu, s = (torch.from_numpy(np.asarray(o)) for o in outputs)
    spec = predictor.model.spec
    out = {
        "cls": cls[None],
        "mu": mu[None],
        "s": s[None] if spec.loss_attenuation else None,
    }
    rows = []
    for b, image_id in enumerate(image_ids):
        det = _to_original(predictor.postprocess(out, b, scales[b], sizes[b], seed), scales[b],
                           sizes[b])  # fmt: skip
        det["image_id"] = image_id
        rows.append(det)
    return build_table(rows, spec.loss_attenuation, False)  # one deterministic pass: no MC
