"""Stage two training: sampling, patient-grouped folds, losses, the in-memory cached dataset,
the training loop and checkpoints."""
