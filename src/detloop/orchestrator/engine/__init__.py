"""What every loop runs on: the journal and the ``JournaledLoop`` base, the workers protocol and
the plain worker classes, the Ray actors (the only ``ray.remote``), MLflow tracking, run creation
and the progress a person sees. Imports nothing from ``loops`` or ``evaluation``."""
