"""One fine-tune: its flags and config, batches, the training loop and step, checkpoints, mitigations."""
