"""The one inference path (ALGORITHMS §3): network → decoded, NMS-ed detections with every
uncertainty gathered by index → the predictions table.

Per image: merge levels; drop anchors whose score sigmoid(max_c m_c) is below
``score_thresh`` and keep the ``max_nms_inputs`` highest-scoring (0: all); decode every
remaining anchor of every MC sample at once (§2, bounded: sizes clipped, corner stds capped at
the image's larger side); reduce the T samples (§1.3); drop
boxes that are degenerate in the image (narrower or lower than ``min_box_size`` original
pixels after clipping); NMS returns kept indices; gather; divide by the letterbox scale; clip
boxes (not stds) to the image. Capped stds and dropped boxes are counted (``PredictStats``),
never silent. Head-mode MC masks are drawn per image from ``(seed, crc32(image_id))``, so
results do not depend on batching or sharding. With ``predict.consistency_ssl`` each batch is
predicted again under three views for the ``cons_iou``/``cons_cls`` columns (§11.6,
``learners/consistency.py``); the ordinary columns stay exactly what they are without it.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from detloop.config import ExperimentConfig
from detloop.console import Progress, progress_bar
from detloop.data import schema
from detloop.data.dataset import DetectionDataset, collate
from detloop.learners import checkpoint as ckpt
from detloop.learners.consistency import Content, Detect, ViewDetections, view_signals
from detloop.learners.decode import decode_boxes
from detloop.learners.device import memory_format, resolve_device
from detloop.learners.loss import make_anchors
from detloop.learners.model import (
    TH,
    TW,
    TX,
    TY,
    UncertainEfficientDet,
    flatten_levels,
    resolve_spec,
    sigma_squared,
    split_box_maps,
)
from detloop.learners.nms import select_detections
from detloop.learners.predict_stats import PredictStats

log = logging.getLogger(__name__)
_XYWH = [TX, TY, TW, TH]  # head order → decode order (t_x, t_y, t_w, t_h)


def sample_mean_std(x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Mean and population std over ``dim``, centred on the first sample.

    Identical samples give exactly that sample as mean and exactly 0 as std.
    """
    ref = x.select(dim, 0).unsqueeze(dim)
    d = x - ref
    mean_d = d.mean(dim, keepdim=True)
    std = ((d - mean_d) ** 2).mean(dim).sqrt()
    return (ref + mean_d).squeeze(dim), std


def entropy_bits(logits: Tensor) -> Tensor:
    """Softmax entropy in bits over the last dim (ALGORITHMS §1.4)."""
    p = torch.softmax(logits.float(), dim=-1)
    return -(p * torch.log2(p.clamp(min=1e-7))).sum(-1)


class Predictor:
    """Runs a trained model over images and returns the predictions table."""

    def __init__(
        self, model: UncertainEfficientDet, cfg: ExperimentConfig, device: str | None = None
    ) -> None:
        self.device = resolve_device(device or cfg.train.device)
        self.memory_format = memory_format(cfg.model.channels_last)
        self.model = model.to(self.device).to(memory_format=self.memory_format).eval()
        self.cfg = cfg
        self.anchors_xyxy = make_anchors(model.spec).boxes[:, [1, 0, 3, 2]].to(self.device)
        self.seconds = 0.0
        self.stats = PredictStats()  # every call so far
        self.last_stats = PredictStats()  # the latest ``predict`` call

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: Path,
        cfg: ExperimentConfig,
        device: str | None = None,
        class_names: list[str] | None = None,
    ) -> Predictor:
        """Load the network stored in ``ckpt_dir`` (its own architecture and MC/LA heads).

        With ``class_names`` (the run's categories) and a model bundle whose classes differ,
        the model is adapted to predict the run's classes (``model.class_map`` for names that
        differ; learners/bundle.py).

        Raises:
            DataError: a run class that no model class matches.
        """
        from detloop.learners.bundle import adapt_classes, bundle_classes, class_permutation

        model, _ = ckpt.model_from_checkpoint(Path(ckpt_dir))
        source = bundle_classes(Path(ckpt_dir))
        if class_names is not None and source is not None and source != class_names:
            perm = class_permutation(source, class_names, cfg.model.class_map)
            model = adapt_classes(model, perm)
        return cls(model, cfg, device)

    @classmethod
    def from_state(
        cls,
        state: bytes | dict[str, Any],
        cfg: ExperimentConfig,
        num_classes: int,
        device: str | None = None,
    ) -> Predictor:
        """Build from weights passed around in memory (e.g. through the Ray object store)."""
        model = UncertainEfficientDet(resolve_spec(cfg.model, num_classes))
        model.load_state_dict(ckpt.load_state_dict(state))
        return cls(model, cfg, device)

    def with_decoding(self, method: str) -> Predictor:
        """This network decoding with ``method`` instead (the §2 comparison); shares the model,
        counts its own time and statistics, and leaves this predictor as it is."""
        predict = self.cfg.predict.model_copy(update={"uncert_adjust_method": method})
        cfg = self.cfg.model_copy(update={"predict": predict})
        return Predictor(self.model, cfg, str(self.device))

    def log_stats(self, stage: str) -> None:
        """Log what the decoding bounds changed over every call so far, when anything did."""
        if self.stats:
            log.info("%s: %s", stage, self.stats.describe())

    @property
    def mc_samples(self) -> int:
        return self.cfg.model.mc_dropoutsamp if self.model.spec.mc_dropout else 1

    def predict(
        self,
        images: pa.Table,
        *,
        seed: int,
        batch_size: int | None = None,
        progress: Progress = None,
        root: Path | None = None,
    ) -> pa.Table:
        """Predictions table (validated) for the ``images`` rows; what the bounds changed in
        this call is in ``last_stats`` (and added to the predictor's running ``stats``)."""
        self.last_stats = PredictStats()
        data = DetectionDataset(images, None, self.model.spec.image_size, root=root)
        loader = DataLoader(
            data, batch_size=batch_size or self.cfg.predict.batch_size, collate_fn=collate
        )
        widths = images.column("width").to_numpy()
        heights = images.column("height").to_numpy()
        rows: list[dict[str, Any]] = []
        # images/s; progress None is the process default: none, unless a predict worker set one
        bar = progress_bar(progress, total=images.num_rows, desc="predict", unit="img")
        for batch in loader:
            t0 = time.perf_counter()
            ids = [data.image_ids[i] for i in batch["index"].tolist()]
            outputs = self.forward(batch["image"], ids, seed)
            scales = [float(s) for s in batch["scale"].tolist()]
            sizes = [(float(widths[i]), float(heights[i])) for i in batch["index"].tolist()]
            dets = []
            for b in range(len(ids)):
                det = self.postprocess(outputs, b, scales[b], sizes[b], seed)
                det = _to_original(det, scales[b], sizes[b])
                det["image_id"] = ids[b]
                dets.append(det)
            if self.cfg.predict.consistency_ssl:
                content = Content.of_batch(scales, sizes, ids, self.model.spec.image_size)
                self._add_consistency(batch["image"], content, seed, dets)
            rows += dets
            self.seconds += time.perf_counter() - t0
            bar.update(len(ids))
        bar.close()
        # epistemic columns only from T > 1 samples: an MC model predicted with
        # mc_dropoutsamp 1 (deterministic) has no MC estimate, so they are null
        return build_table(
            rows,
            self.model.spec.loss_attenuation,
            self.mc_samples > 1,
            consistency=self.cfg.predict.consistency_ssl,
        )

    def _add_consistency(
        self, images: Tensor, content: Content, seed: int, dets: list[dict[str, Any]]
    ) -> None:
        """``cons_iou`` and ``cons_cls`` of each image's kept detections ``dets`` (original
        pixels), from one more pass per view (learners/consistency.py, ALGORITHMS §11.6)."""
        x = images.to(self.device)
        kept = [(d["box"], d["class_id"]) for d in dets]
        mode = self.cfg.predict.cons_cls_mode
        found = view_signals(self._view_detections(content, seed), x, content, seed, kept, mode)
        for det, (cons_iou, cons_cls) in zip(dets, found, strict=True):
            det["cons_iou"], det["cons_cls"] = cons_iou, cons_cls

    def _view_detections(self, content: Content, seed: int) -> Detect:
        """The view pass: each image's kept boxes (network pixels) and classes, decoded and
        NMS-ed as the ordinary pass (same seeds); the bound statistics of views are not
        counted (they describe the table)."""

        def detect(x: Tensor) -> ViewDetections:
            saved = self.stats, self.last_stats
            self.stats, self.last_stats = PredictStats(), PredictStats()
            try:
                out = self.forward(x, content.image_ids, seed)
                found = [
                    self.postprocess(out, b, content.scales[b], content.sizes[b], seed)
                    for b in range(len(content.image_ids))
                ]
            finally:
                self.stats, self.last_stats = saved
            return [(d["box"], d["class_id"]) for d in found]

        return detect

    @torch.no_grad()
    def forward(self, images: Tensor, image_ids: list[str], seed: int) -> dict[str, Tensor | None]:
        """Raw outputs [T, B, N, ...]: class logits, box means and uncertainty parameters s
        (head order)."""
        model, samples = self.model, self.mc_samples
        x = images.to(self.device, memory_format=self.memory_format)
        autocast = (
            torch.autocast("cuda")
            if self.device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with autocast:
            if samples > 1 and model.spec.mc_mode == "head":
                chunk = max(1, self.cfg.predict.mc_head_batch // x.shape[0])
                masks = self._image_masks(image_ids, seed)
                cls, mu, s = model.sample_flat(model.features(x), masks, samples, chunk)
            elif samples > 1:
                cls, mu, s = self._full_samples(x, image_ids, seed)
            else:
                cls, mu, s = self._flat(*model(x))
        b = x.shape[0]
        return {
            "cls": cls.reshape(samples, b, *cls.shape[1:]),
            "mu": mu.reshape(samples, b, -1, 4),
            "s": None if s is None else s.reshape(samples, b, -1, 4),
        }

    def _full_samples(
        self, x: Tensor, image_ids: list[str], seed: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """`full` MC: T passes of each image with masks from its own seed (results do not
        depend on batching), stacked sample-major as [T·B, N, ...]."""
        parts = []
        for b, image_id in enumerate(image_ids):
            gen = torch.Generator(device=self.device).manual_seed(_image_seed(seed, image_id))
            parts.append(self._flat(*self.model.sample(x[b : b + 1], self.mc_samples, gen)))

        def stack(k: int) -> Tensor:  # per image [T, N, k] → [T, B, N, k] → [T·B, N, k]
            t = torch.stack([p[k] for p in parts], dim=1)  # type: ignore[misc]
            return t.flatten(0, 1)

        return stack(0), stack(1), stack(2) if parts[0][2] is not None else None

    def _flat(
        self, cls_maps: list[Tensor], box_maps: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        mu, s = split_box_maps(self.model, box_maps)
        return flatten_levels(cls_maps, self.model.spec.num_classes), mu, s

    def decode_inputs(
        self, out: dict[str, Tensor | None], b: int, idx: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Encoded means and variances [T, K, 4] of anchors ``idx`` of image ``b``, in decode
        order (t_x, t_y, t_w, t_h); σ² only for these anchors (the cost scales with K, not N).
        """
        mu, s = out["mu"], out["s"]
        assert mu is not None
        t = mu[:, b, idx][..., _XYWH].float()
        if s is None:
            return t, None
        spec = self.model.spec
        var = sigma_squared(
            s[:, b, idx][..., _XYWH].float(), spec.sigma_param, spec.clip_min, spec.clip_max
        )
        return t, var

    def _image_masks(self, image_ids: list[str], seed: int) -> tuple[Tensor, Tensor]:
        """Head masks [R, L, T·B, C, 1, 1], each image's drawn from its own seed."""
        per_image = []
        for image_id in image_ids:
            gen = torch.Generator(device=self.device).manual_seed(_image_seed(seed, image_id))
            per_image.append(self.model.head_masks(self.mc_samples, gen))
        out = []
        for k in range(2):
            stacked = torch.stack([m[k] for m in per_image], dim=3)  # [R, L, T, B, C, 1, 1]
            out.append(stacked.flatten(2, 3))
        return out[0], out[1]

    def postprocess(
        self,
        out: dict[str, Tensor | None],
        b: int,
        scale: float,
        size: tuple[float, float],
        seed: int,
    ) -> dict[str, Any]:
        """Detections of image ``b`` in network pixels, every column gathered by kept index.

        ``size`` is the original (width, height): its larger side, ``scale``·max(W, H) in
        network pixels, caps every corner std (§2.1), and degenerate boxes are judged in it.
        """
        pcfg = self.cfg.predict
        cls_all = out["cls"]
        assert cls_all is not None
        z = cls_all[:, b]  # [T, N, C]
        m = z.float().mean(0) if z.shape[0] > 1 else z[0].float()
        best, class_all = m.max(-1)
        score_all = torch.sigmoid(best)
        idx = torch.nonzero(score_all >= pcfg.score_thresh).squeeze(1)
        idx = _top_anchors(idx, score_all[idx], pcfg.max_nms_inputs)
        t, v = self.decode_inputs(out, b, idx)
        cap = max(size) * scale
        means, stds = decode_boxes(
            t,
            v,
            self.anchors_xyxy[idx],
            method=pcfg.uncert_adjust_method,
            n_samples=pcfg.decode_nsamples,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            std_cap=cap,
        )
        box = means.mean(0) if z.shape[0] > 1 else means[0]
        cand = torch.nonzero(_large_enough(box, scale, size, pcfg.min_box_size)).squeeze(1)
        keep, kept_scores = select_detections(
            box[cand],
            score_all[idx][cand],
            class_all[idx][cand],
            method=pcfg.nms_method,
            iou_threshold=pcfg.nms_iou,
            sigma=pcfg.sigma_nms,
            max_output=pcfg.max_output_size,
            score_thresh=pcfg.score_thresh,
        )
        order = torch.argsort(kept_scores, descending=True, stable=True)
        keep = cand[keep[order]]  # into idx; every column is gathered through it
        kept_stds = stds[:, keep] if v is not None else None
        det = self._gather(z, m, idx[keep], box[keep], means[:, keep], kept_stds, cap)
        det["score"] = _numpy(kept_scores[order])
        det["class_id"] = class_all[idx[keep]].cpu().numpy().astype(np.int32)
        self._count(PredictStats(dropped_boxes=len(idx) - len(cand)))
        return det

    def _gather(
        self,
        z: Tensor,
        m: Tensor,
        sel: Tensor,
        box: Tensor,
        means: Tensor,
        stds: Tensor | None,
        cap: float,
    ) -> dict[str, Any]:
        """Box, uncertainties and logits of the kept anchors ``sel`` (box [K, 4] and per-sample
        means/stds [T, K, 4] already gathered); MC reductions of §1.3; capped values counted."""
        mc = z.shape[0] > 1
        stats = PredictStats()
        al = mc_std = None
        if stds is not None:
            al = stds.mean(0)
            stats.capped_al_std = int((stds >= cap).any(0).sum())
        if mc:
            mc_std = sample_mean_std(means)[1]
            stats.capped_mc_std = int((mc_std >= cap).sum())
            mc_std = mc_std.clamp(max=cap)
        self._count(stats)
        logits = m[sel]
        return {
            "box": _numpy(box),
            "al": _numpy(al),
            "mc": _numpy(mc_std),
            "logits": _numpy(logits),
            "mc_class_vec": _numpy(sample_mean_std(z[:, sel].float())[1]) if mc else None,
            "entropy": _numpy(entropy_bits(logits)),
        }

    def _count(self, stats: PredictStats) -> None:
        self.stats.add(stats)
        self.last_stats.add(stats)


def _numpy(x: Tensor | None) -> np.ndarray | None:
    return None if x is None else x.detach().float().cpu().numpy().astype(np.float32)


def _top_anchors(idx: Tensor, scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring of the anchors ``idx`` (ties: the lower anchor index), in anchor
    order; all of them when ``k`` is 0 or not below their number (``max_nms_inputs``, §3)."""
    if k <= 0 or len(idx) <= k:
        return idx
    best = torch.argsort(scores, descending=True, stable=True)[:k]
    return idx[torch.sort(best).values]


def _large_enough(box: Tensor, scale: float, size: tuple[float, float], min_size: float) -> Tensor:
    """Boxes (network pixels) whose width and height in the image, after mapping to original
    pixels and clipping to [0, W]×[0, H], are at least ``min_size`` (``remove_small_boxes``)."""
    width, height = size
    x1, y1, x2, y2 = (box / scale).unbind(-1)
    w = x2.clamp(0, width) - x1.clamp(0, width)
    h = y2.clamp(0, height) - y1.clamp(0, height)
    return (w >= min_size) & (h >= min_size)


def _image_seed(seed: int, image_id: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(image_id.encode())]).generate_state(1)[0])


def _to_original(det: dict[str, Any], scale: float, size: tuple[float, float]) -> dict[str, Any]:
    """Network pixels → original pixels: divide by s; clip boxes to the image; stds (already
    capped at the larger side) stay at most max(W, H) exactly after the division."""
    width, height = size
    box = det["box"] / scale
    box[:, [0, 2]] = box[:, [0, 2]].clip(0, width)
    box[:, [1, 3]] = box[:, [1, 3]].clip(0, height)
    det["box"] = box.astype(np.float32)
    for key in ("al", "mc"):
        if det[key] is not None:
            det[key] = np.minimum(det[key] / scale, max(size)).astype(np.float32)
    return det


def _list_column(arrays: list[np.ndarray], width: int) -> pa.Array:
    values = np.concatenate(arrays).reshape(-1) if arrays else np.zeros(0, np.float32)
    n = sum(len(a) for a in arrays)
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))


def build_table(
    rows: list[dict[str, Any]], aleatoric: bool, epistemic: bool, *, consistency: bool = False
) -> pa.Table:
    """Assemble per-image detections into the validated predictions table; with
    ``consistency`` the rows carry ``cons_iou`` and ``cons_cls`` (§11.6), else the table has
    no such columns (an absent column reads as null)."""
    n_per = [len(r["score"]) for r in rows]
    n = sum(n_per)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([r[key] for r in rows]) if rows else np.zeros(0)

    width = next(
        (r["logits"].shape[1] for r in rows if r["logits"] is not None and len(r["logits"])), 0
    )
    cols: dict[str, pa.Array] = {
        "image_id": pa.array(
            [r["image_id"] for r in rows for _ in range(len(r["score"]))], pa.string()
        ),
        "det_id": pa.array(
            np.concatenate([np.arange(k) for k in n_per]) if rows else [], pa.int32()
        ),
        "class_id": pa.array(cat("class_id").astype(np.int32), pa.int32()),
        "score": pa.array(cat("score").astype(np.float32), pa.float32()),
    }
    boxes = cat("box").reshape(-1, 4).astype(np.float32)
    for k, c in enumerate(schema.COORDS):
        cols[c] = pa.array(boxes[:, k], pa.float32())
    cols["entropy"] = pa.array(cat("entropy").astype(np.float32), pa.float32())
    cols["mc_class"] = (
        pa.array(cat("mc_class_vec").reshape(n, width).mean(1).astype(np.float32), pa.float32())
        if epistemic
        else pa.nulls(n, pa.float32())
    )
    for key, names, on in (("al", schema.AL_COLS, aleatoric), ("mc", schema.MC_COLS, epistemic)):
        vals = cat(key).reshape(-1, 4).astype(np.float32) if on else None
        for k, c in enumerate(names):
            cols[c] = (
                pa.array(vals[:, k], pa.float32())
                if vals is not None
                else pa.nulls(n, pa.float32())
            )
    cols["logits"] = _list_column([r["logits"] for r in rows], width)
    cols["mc_class_vec"] = (
        _list_column([r["mc_class_vec"] for r in rows], width)
        if epistemic
        else pa.nulls(n, pa.list_(pa.float32()))
    )
    if consistency:
        cols["cons_iou"] = pa.array(cat("cons_iou").astype(np.float32), pa.float32())
        cols["cons_cls"] = pa.array(cat("cons_cls").astype(bool), pa.bool_())
    table = pa.table(cols)
    return schema.with_metadata(
        schema.validate_table(table, schema.PREDICTIONS), schema.PREDICTIONS
    )
