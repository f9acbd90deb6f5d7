"""Small model helpers the test modules share."""

from cnt.tiny import tiny_model


def state_copy(model) -> dict:
    """A detached copy of every tensor of ``model``'s state dict (to compare against after a change)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gqa_model(seed: int, device="cpu", **overrides):
    """A tiny Llama whose two k/v heads are shared by its query heads (grouped-query attention), on ``device``."""
    return tiny_model("llama", seed=seed, num_key_value_heads=2, **overrides).to(device)
