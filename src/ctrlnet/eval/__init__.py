"""Metrics: how well images follow their prompts and conditions (ShapesWorld scores exactly)."""
