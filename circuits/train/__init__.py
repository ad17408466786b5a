"""Training transcoders: the loop, the objective, the activation stream, parallelism."""
