"""Training transcoders: `config` (TrainConfig, recipes), `objective` (the loss, its schedules,
target-L0 steering, initialisation and scales), `kernels` (the step's sparse-or-dense contractions),
`activations` (the activation stream), `store` and `store_writer` (activation stores), `metrics`
(reconstruction and replacement model), `checkpoint` (save and resume), `parallel` (torchrun), and
`loop` (train)."""
