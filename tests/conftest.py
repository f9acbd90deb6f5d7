import os

import pytest

# Tests never touch the network: everything comes from pip packages or is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smol():
    """The real embedded SmolLM2-135M-Instruct (float32, CPU), converted once into the cache."""
    from cnt.models import load_model

    return load_model(SMOL, dtype="float32", device="cpu")


def embedded_installed(name: str) -> bool:
    from cnt.models import is_installed

    return is_installed(name)
