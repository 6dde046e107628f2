"""Job kinds: pure PyTorch/transformers code, callable without Celery. One module per kind."""
