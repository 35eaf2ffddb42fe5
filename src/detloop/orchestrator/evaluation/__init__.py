"""Runs over a model and a split: validation, calibration and thresholding reports, the
auto-labeling pipeline and the OSS analysis. Uses ``engine`` (tracking, runs), never ``loops``."""
