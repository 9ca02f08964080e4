"""Experiment tracking: MLflow, which nothing else in the library imports."""
