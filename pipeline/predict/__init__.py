"""Predicting a new test set with a finished run, offline: what a code competition re-runs on its hidden test set.

``python -m pipeline.predict RUN_DIR DATA --out FILE`` (``./run.sh predict …``) reads the run folder (one
experiment, a plan's or an ensemble config's) and never writes to it: it may be read-only, as a Kaggle dataset is.

* :mod:`pipeline.predict.recipe`: what the run's submission was made with (each member's fold and refit models,
  the TTA views each kept, the ensemble's weights fitted on the OOF, its temperature), as plain data;
* :mod:`pipeline.predict.images`: the new images (a folder, or a test folder with its sample submission), decoded
  as the run's preprocess stage decoded its test set, into a work folder; every unreadable image in one report;
* :mod:`pipeline.predict.models`: the networks through each training mode's predictor, or an export's ONNX graphs;
* :mod:`pipeline.predict.stage`: the stage itself (``run`` and ``main``): the submission checked against the sample
  submission (or the probabilities with ``--probs``), its images/s, and ``--time-limit``, which measures the rate
  on the first images and refuses at once, naming it, when the rest cannot finish in time.
"""
