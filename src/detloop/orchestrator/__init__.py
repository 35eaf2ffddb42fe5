"""The loops, Ray actors and pools, MLflow tracking and resume.

Depends on ``learners``, ``selectors`` and ``data``; nothing depends on it.
"""
