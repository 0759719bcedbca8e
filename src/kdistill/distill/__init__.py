"""The distillation core: the Distiller and its terms, taps, connectors, the objective mixer,
layer discovery, per-batch transforms, and (in `kdistill.distill.teacher`) the teacher sources.

It sits below the engine: it imports data, models, losses and the shared utilities, never the
engine, tasks, recipes or front ends (`tests/test_import_layers.py`). The package itself imports
nothing, so that any of its modules can be imported alone.
"""
