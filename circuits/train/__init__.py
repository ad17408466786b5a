"""Training transcoders: `config` (TrainConfig, recipes), `objective` (the loss, its schedules,
initialisation and scales), `activations` (the activation stream), `metrics` (reconstruction and
replacement model), `checkpoint` (save and resume), `parallel` (torchrun), and `loop` (train)."""
