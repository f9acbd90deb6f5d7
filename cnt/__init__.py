"""Cross-Model Neuron Transfer (arXiv 2603.18449): a reproducible research kit."""

__version__ = "0.1.0"

from . import zoo as _zoo  # noqa: E402,F401  (registers the zoo's names with cnt.models.load_model)
from .transfer import NeuronPatch  # noqa: E402,F401

__all__ = ["NeuronPatch", "__version__"]
