"""caio benchmark suite: ``python -m benchmark`` (see README.md)."""
