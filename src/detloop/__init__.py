"""detloop: active learning, semi-supervised learning and uncertainty-based auto-labeling for
object detectors, distributed on Ray."""

__version__ = "0.1.0"
