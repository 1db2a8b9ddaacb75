"""Shared test builders: synthetic inputs, tiny checkpoints, the hostile corpus, the live app."""
