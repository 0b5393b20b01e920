"""The coordinator: Flower ServerApp, round loop, checkpoints and metrics."""
