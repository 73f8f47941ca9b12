"""Shared building blocks. Layers never import a model family."""
