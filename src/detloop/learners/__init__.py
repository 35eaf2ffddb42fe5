"""Detector, uncertainty heads, training, prediction, decoding, NMS, evaluation, calibration.

Import the modules themselves (``detloop.learners.train.train_model``,
``detloop.learners.predict.Predictor``, ...); this package imports nothing at import time,
so ``import detloop.learners`` stays cheap and torch-free.
"""
