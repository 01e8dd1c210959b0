"""One module per family of estimators."""
