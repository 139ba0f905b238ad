"""The EDA stage (:mod:`pipeline.eda.stage`, ``python -m pipeline.eda``): the scan, statistics, duplicates,
plots, suggestions and the self-contained report page."""
