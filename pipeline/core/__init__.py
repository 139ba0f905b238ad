"""The foundation every layer uses: typed config, registries, small utilities, random streams, training jobs."""
