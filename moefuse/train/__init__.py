"""Training: the recipe in named steps (`recipe`), its config (`config`, the `train:` section), the trainer state
(`state`), the optimiser and schedule (`optim`), the metrics log (`metrics_log`), start-up checks (`preflight`),
resumable checkpoints and the run's export (`checkpoint`), FSDP (`fsdp`) and expert-parallel shards
(`expert_checkpoint`), and the calibration fit after training (`calibrate`)."""
