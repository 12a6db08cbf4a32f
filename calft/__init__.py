"""calft: calibration fine-tuning of language models (arXiv 2605.11845)."""

__version__ = "0.1.0"
