"""Dash head explorer over a runs directory (installed as `headlab.app`). Not built yet."""
