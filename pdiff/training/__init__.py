"""The pieces the training script (`pdiff/train.py`) shares: losses, the step loop's bookkeeping, checkpoints."""
