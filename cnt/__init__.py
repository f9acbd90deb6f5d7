"""Cross-Model Neuron Transfer (arXiv 2603.18449): a reproducible research kit."""

__version__ = "0.1.0"
