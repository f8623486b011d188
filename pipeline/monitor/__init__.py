"""Figures, alerts, the metrics endpoint and the live status of a running pipeline."""
