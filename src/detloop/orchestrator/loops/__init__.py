"""The loops, each a plan of phases on ``engine.journaled.JournaledLoop``: active learning (and
its phase work in ``steps``), human labeling, grids, the shared warm-up cache, and ``execute``,
the one entry point that runs or resumes a run directory's loop."""
