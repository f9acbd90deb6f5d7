"""Supervised fine-tuning: chat pairs, plain text and sentence preferences (the bias siblings' pairwise loss)."""

import torch

from cnt.models import load_tokenizer
from cnt.tiny import tiny_model
from cnt.train import TrainConfig, _batch, _mean_logprob, _sides, _tokenize, sft


def _margin(model, tok, pairs):
    with torch.no_grad():
        lp = _mean_logprob(model, _batch(tok, _sides(pairs), 64, "cpu"))
    return float((lp[:len(pairs)] - lp[len(pairs):]).mean())


def test_preference_pairs_move_the_margin_toward_chosen():
    tok = load_tokenizer("smollm2-135m-instruct")
    pairs = [{"chosen": "The nurse was kind to everyone.", "rejected": "The nurse was cruel to everyone."},
             {"chosen": "He fixed the old car quickly.", "rejected": "He broke the old car quickly."}]
    flipped = [{"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    cfg = TrainConfig(method="full", steps=8, lr=2e-3, batch_size=2, warmup=1)
    before = _margin(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, pairs)
    up, res = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, pairs, cfg, progress=False)
    down, _ = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, flipped, cfg, progress=False)
    assert _margin(up, tok, pairs) > before > _margin(down, tok, pairs)
    assert res.losses[-1] < res.losses[0]


def test_prompted_preferences_compare_responses_only():
    """A pair with a prompt compares two responses to it (SimPO-style): the prompt is context, not scored, and
    training moves the margin toward the chosen response."""
    tok = load_tokenizer("smollm2-135m-instruct")
    pairs = [{"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast, then bake it.",
              "rejected": "I'm sorry, but I can't help with that."},
             {"prompt": "Who wrote Hamlet?", "chosen": "William Shakespeare wrote it.",
              "rejected": "I'm sorry, but I can't help with that."}]
    sides = _sides(pairs)
    assert [s["response"] for s in sides] == [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    ids, labels = _tokenize(tok, sides[0], 96)
    n_prompt = sum(lab == -100 for lab in labels)
    assert n_prompt > 10 and all(lab == -100 for lab in labels[:n_prompt])  # the prompt is masked out
    assert labels[n_prompt:] == ids[n_prompt:]
    cfg = TrainConfig(method="full", steps=8, lr=2e-3, batch_size=2, warmup=1)
    before = _margin(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, pairs)
    up, res = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, pairs, cfg, progress=False)
    assert _margin(up, tok, pairs) > before and res.losses[-1] < res.losses[0]


def test_mixed_batches_train_and_are_seeded():
    tok = load_tokenizer("smollm2-135m-instruct")
    mixed = [{"prompt": "Say hi.", "response": "Hi!"}, {"text": "Plain text keeps the language model."},
             {"chosen": "A good day.", "rejected": "A bad day."}]
    cfg = TrainConfig(method="lora", steps=3, lr=1e-3, batch_size=3, warmup=1)
    a, ra = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, mixed, cfg, progress=False)
    b, rb = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, mixed, cfg, progress=False)
    assert ra.losses == rb.losses and all(torch.isfinite(torch.tensor(ra.losses)))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_autocast_trains_in_fp32_weights_and_is_seeded():
    """``autocast="bf16"``: forward passes in bfloat16, weights stay fp32; the loss falls, a rebuild with the same seed
    gives identical weights, and the result differs from fp32 training (a different computation, named in the key)."""
    import pytest
    from cnt import zoo

    tok = load_tokenizer("smollm2-135m-instruct")
    chat = [{"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast, then bake it."},
            {"prompt": "Who wrote Hamlet?", "response": "William Shakespeare wrote it."},
            {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "I'm sorry, I can't help."}]
    cfg = TrainConfig(method="lora", steps=6, lr=3e-3, batch_size=3, warmup=1, autocast="bf16")
    a, ra = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, chat, cfg, progress=False)
    b, rb = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, chat, cfg, progress=False)
    f, _ = sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, chat,
               TrainConfig(**{**cfg.to_dict(), "autocast": None}), progress=False)
    assert ra.losses == rb.losses and ra.losses[-1] < ra.losses[0]
    sa, sb, sf = a.state_dict(), b.state_dict(), f.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and all(v.dtype == torch.float32 for v in sa.values())
    assert any(not torch.equal(sa[k], sf[k]) for k in sa)
    # the option is part of a recipe's key only when set: recipes written without it keep their keys
    assert "autocast" not in TrainConfig().to_dict() and cfg.to_dict()["autocast"] == "bf16"
    assert zoo.variant("smol-safe", autocast="bf16").key() != zoo.recipe("smol-safe").key()
    with pytest.raises(ValueError, match="autocast"):
        sft(tiny_model("llama", seed=0, vocab_size=len(tok)), tok, chat, TrainConfig(autocast="fp16"), progress=False)
