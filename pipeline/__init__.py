"""pipeline: a Kaggle-style image-classification competition package.

Stages (each ``python -m pipeline.<stage>``): eda, preprocess, folds, train, infer, ensemble, submit.
They talk only through files in the run folder (``runs/<experiment>/``).
"""
__version__ = "0.1.0"

STAGES = ("eda", "preprocess", "folds", "train", "infer", "ensemble", "submit")
