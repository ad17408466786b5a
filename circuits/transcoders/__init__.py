"""Transcoders: the CrossLayerTranscoder module and its config, and every file format we read and write."""
