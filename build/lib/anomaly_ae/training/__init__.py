"""Training loop, device selection and checkpoints (plain PyTorch, no Kedro)."""
