"""pipeline: a Kaggle-style image-classification competition package.

The top of the package is what you run: the stages (``python -m pipeline.<stage>``: eda, preprocess, folds,
train, infer, ensemble, results, submit, search; ``full`` chains them) and the tools bench and compare. They talk
only through files in the run folder (``runs/<experiment>/``, owned by :mod:`pipeline.rundir`). The layers
below them are the folders: core, data, augment, models, training, evaluation, report.
"""
__version__ = "0.1.0"
