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


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the tiny configs' pad, bos and eos
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level tokenizer built in memory (no files, no packages, no network): the three special tokens, then one
    token per byte (259 in all; ``decode(encode(text)) == text`` for any text), with a chat template, left padding.
    For tiny models (``tiny_model(..., vocab_size=len(tok))``) where no embedded tokenizer is installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(sorted(pre_tokenizers.ByteLevel.alphabet())))}
    bytes_only = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bytes_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bytes_only.decoder = decoders.ByteLevel()
    bytes_only.add_special_tokens(list(SPECIAL_TOKENS))
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=bytes_only, pad_token=pad, bos_token=bos, eos_token=eos,
                                   chat_template=CHAT_TEMPLATE, padding_side="left")
