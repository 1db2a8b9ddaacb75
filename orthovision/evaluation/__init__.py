"""Evaluation: metrics, plots, markdown summaries and the evaluate-a-checkpoint run."""
