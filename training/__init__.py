"""Training stage: spec parsing, data, models, losses and the train/evaluate/inference jobs."""
