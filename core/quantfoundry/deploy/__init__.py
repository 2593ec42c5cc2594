"""Deployment helpers: how much GPU memory a model needs to serve (``qf plan``)."""
