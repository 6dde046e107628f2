"""tensorq: asynchronous training and inference jobs for PyTorch models."""

__version__ = "0.1.0"
