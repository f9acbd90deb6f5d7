"""Tiny random-config models of every supported family: for tests, CUDA smoke tests and quick demos.

They are real ``transformers`` models (same classes and parameter layout as the large ones), just small and random.
"""

from __future__ import annotations

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 64, 96, 2, 4, 128

_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": HIDDEN // HEADS}),
    "gemma": ("GemmaConfig", {"head_dim": HIDDEN // HEADS}),
    "gemma2": ("Gemma2Config", {"head_dim": HIDDEN // HEADS}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": HIDDEN // HEADS}),
    "phi3": ("Phi3Config", {}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
                            "n_positions": 64}),
    "gptj": ("GPTJConfig", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
                            "n_positions": 64, "rotary_dim": 8}),
    "gpt_neox": ("GPTNeoXConfig", {"max_position_embeddings": 64}),
}

TINY_MODEL_TYPES = tuple(_CONFIGS)


def tiny_config(model_type: str, **overrides):
    import transformers

    cls_name, extra = _CONFIGS[model_type]
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
              "max_position_embeddings": 64}
    if model_type in ("gpt2", "gptj"):
        common = {"vocab_size": VOCAB}
    common.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return getattr(transformers, cls_name)(**{**common, **extra, **overrides})


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised ``*ForCausalLM`` of ``model_type`` (seeded, so two calls with one seed are identical)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    return model.eval()
