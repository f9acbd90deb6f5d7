"""Cross-Model Neuron Transfer (arXiv 2603.18449): a reproducible research kit.

Importing ``cnt`` loads nothing else; import the module you need (``cnt.transfer``, ``cnt.zoo``, ``cnt.experiment``).
``cnt.NeuronPatch`` is :class:`cnt.transfer.NeuronPatch`, imported on first use."""

__version__ = "0.1.0"

__all__ = ["NeuronPatch", "__version__"]


def __getattr__(name: str):
    if name == "NeuronPatch":
        from .transfer import NeuronPatch

        return NeuronPatch
    raise AttributeError(f"module 'cnt' has no attribute {name!r}")
