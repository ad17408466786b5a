"""Concept traces: logit lens, paths, patching, trajectories, figures, the report and its page.

Categories (named groups of words) and counterfactuals are the caller's inputs; the demo passes its own.
"""
