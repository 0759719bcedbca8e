"""kdistill inside other people's loops and trackers.

- `kdistill.integrations.transformers.DistillationTrainer`: a Hugging Face ``Trainer``
  (``pip install 'kdistill[transformers]'``).
- `kdistill.integrations.lightning.DistillationModule`: a ``LightningModule``
  (``pip install 'kdistill[lightning]'``).
- `kdistill.integrations.trackers`: TensorBoard and MLflow trackers, also reached by
  ``kd.fit(..., loggers=[...])`` and ``train.log`` (``kdistill[tensorboard]``,
  ``kdistill[mlflow]``).

Each submodule imports its host library on import; this package imports none of them.
"""
