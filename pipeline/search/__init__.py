"""The search stage (``python -m pipeline.search``): an Optuna study over compact architectures and any config
key, its search space, and its report."""
