"""llfarm: one YAML strategy, many fine-tuning backends, one run directory."""

__version__ = "0.1.0"
