"""Training: the recipe that builds a fold's training, the loop, checkpoints, frozen features, fine-tuning,
distillation, losses, schedulers and the distributed split of folds."""
