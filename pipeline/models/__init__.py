"""Models: the factory and its registry, architecture specs, pretrained weights, whitening."""
