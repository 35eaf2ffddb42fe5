"""What the decoding bounds of a prediction run changed (ALGORITHMS §2.1, §3): counted so that
none of it is silent. Plain Python (no torch), so the driver can sum and log the counts the
prediction workers send back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields


@dataclass
class PredictStats:
    """Counts of one prediction run (or a sum of runs).

    Attributes:
        capped_al_std: aleatoric corner-std values of the table limited by the image bound
            (any MC sample's std at the cap counts).
        capped_mc_std: epistemic corner-std values limited by the image bound.
        dropped_boxes: candidate boxes (score ≥ ``score_thresh``) dropped before NMS because
            their width or height in the image is below ``min_box_size``.
    """

    capped_al_std: int = 0
    capped_mc_std: int = 0
    dropped_boxes: int = 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The counters' names (the metric names, after a phase prefix)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def total(cls, parts: Iterable[Mapping[str, int]]) -> PredictStats:
        """The sum of counts given as mappings (e.g. read back from JSON)."""
        out = cls()
        for part in parts:
            out.add(cls(**{k: int(v) for k, v in part.items()}))
        return out

    def add(self, other: PredictStats) -> None:
        for name in self.names():
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __bool__(self) -> bool:
        return any(self.as_dict().values())

    def describe(self) -> str:
        return (
            f"{self.capped_al_std} aleatoric and {self.capped_mc_std} epistemic std values "
            f"capped at the image's larger side, {self.dropped_boxes} degenerate boxes dropped "
            "before NMS"
        )
