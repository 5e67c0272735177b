"""Explainable defect detection: data, model, training, evaluation and metrics."""
