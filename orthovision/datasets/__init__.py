"""Datasets: source adapters, cleaning and the pixel cache, grouped splits, loaders."""
