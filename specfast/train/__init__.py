"""The trainer: config, batches, schedule, checkpoints, metrics, and the loop that ties them."""
