"""Concept traces: logit lens, paths, patching, trajectories, figures, the report."""
