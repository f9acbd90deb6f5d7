"""Token log-probabilities without vocabulary-sized logits (:mod:`cnt.logprobs`), and every reader of them — the
task loss, the evaluation's sentence scores (perplexity, StereoSet, CrowS-Pairs), the SFT reference's losses — equal
to the whole softmax at once."""

import pytest
import torch

from cnt import logprobs
from cnt.evaluate import sequence_logprobs
from cnt.tiny import tiny_model, tiny_tokenizer
from cnt.train import TrainConfig, _batch, _loss, _mean_logprob, _sides


def reference_logprobs(model, inp, lab, mask):
    """The plain computation: every position's logits, one float32 log-softmax over the labelled ones."""
    logits = model(input_ids=inp, attention_mask=mask, use_cache=False).logits[:, :-1]
    tgt = lab[:, 1:]
    keep = tgt != -100
    picked = torch.log_softmax(logits[keep].float(), -1).gather(-1, tgt[keep][:, None]).squeeze(-1)
    return torch.zeros(tgt.shape, device=picked.device).index_put((keep,), picked), keep


@pytest.mark.parametrize("head_here", [True, False], ids=["head-in-vocabulary-slices", "model-logits"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_token_logprobs_keeps_only_labelled_positions_and_equals_the_whole_softmax(model_type, head_here,
                                                                                    monkeypatch):
    """Both ways of reading the labelled positions' log-probabilities — the output head applied to the decoder's
    states a slice of the vocabulary at a time (a slice boundary inside the vocabulary), or the model asked for those
    positions' logits (logits_to_keep) with the log-softmax in checkpointed chunks (a chunk boundary inside a row) —
    give the same values and the same gradients, every weight's including the head's, as the whole softmax at once
    (right padding, a row with one label)."""
    monkeypatch.setattr(logprobs, "LOGSOFTMAX_ROWS", 3)
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 7)
    model = tiny_model(model_type, seed=0)
    assert (logprobs.output_head(model) is not None) and model.config.vocab_size % 7
    if not head_here:
        monkeypatch.setattr(logprobs, "output_head", lambda m: None)
    gen = torch.Generator().manual_seed(0)
    inp = torch.randint(3, 100, (3, 9), generator=gen)
    mask = torch.ones_like(inp)
    mask[1, 7:], mask[2, 4:] = 0, 0
    lab = inp.clone()
    lab[mask == 0] = -100
    lab[0, :3] = -100  # a prompt
    lab[2, :3] = -100  # one labelled token
    values, grads = [], []
    for fn in (logprobs.token_logprobs, reference_logprobs):
        model.zero_grad()
        lp, keep = fn(model, inp, lab, mask)
        (-lp.sum()).backward()
        values.append((lp.detach(), keep))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(values[0][1], values[1][1])
    torch.testing.assert_close(values[0][0], values[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_head_logprobs_under_bf16_autocast_equals_the_model_precision_softmax(monkeypatch):
    """Under bf16 autocast the head's products run in bf16, as the model's own head would: the values and the
    hidden states' gradient equal the whole bf16 logits' float32 log-softmax (vocabulary slices of 7 rows)."""
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 16, generator=gen)
    labels = torch.tensor([0, 6, 7, 39, 20])
    grads, values = [], []
    for fn in (lambda h: logprobs.head_logprobs(h, weight, labels),
               lambda h: logprobs._label_logprob(torch.nn.functional.linear(h, weight), labels)):
        hidden = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = fn(hidden)
        assert lp.dtype == torch.float32
        (lp * torch.arange(1.0, 6.0)).sum().backward()
        values.append(lp.detach())
        grads.append(hidden.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-2)  # bf16 products of the gradient


def _whole_sequence_logprobs(model, tok, texts):
    """Each text's BOS-conditioned log-probability from the model's whole logits, one text at a time."""
    out = []
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        out.append((float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum()), ids.shape[1] - 1))
    return out


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_sequence_scores_equal_the_whole_softmax_without_the_logits(model_type, monkeypatch):
    """Perplexity's and StereoSet's sentence log-probabilities, read in right-padded batches through vocabulary
    slices, equal the model's own whole logits text by text (an empty text scores 0 on 0 tokens); and the batch never
    asks the model for its logits where the head can be applied outside it."""
    monkeypatch.setattr(logprobs, "VOCAB_CHUNK", 50)
    tok = tiny_tokenizer()
    model = tiny_model(model_type, seed=0, vocab_size=len(tok))
    texts = ["A short one.", "", "A longer sentence, padded beside the short one.", "Hi"]  # ≤ 64 positions
    with torch.no_grad():
        expected = _whole_sequence_logprobs(model, tok, texts)
        calls = []
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda *a: calls.append(1))
        got = sequence_logprobs(model, tok, texts, batch_size=3)
        hook.remove()
    assert not calls  # the model's own head never ran: no [positions, vocabulary] logits
    assert [n for _, n in got] == [n for _, n in expected]
    for (a, _), (b, _) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)


def test_the_sft_losses_equal_the_models_own():
    """The SFT reference's plain-text loss equals the model's own (transformers' shifted cross-entropy over every
    labelled token of the batch) and its preference scores the mean of the whole log-softmax per sequence — values and
    gradients — for a full model and for a LoRA model read through its base model (adapters active)."""
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    plain = [{"text": "The quick brown fox."}, {"text": "A longer line of plain text to pad the batch with."}]
    prefs = [{"chosen": "The nurse was kind.", "rejected": "The nurse was cruel to all."}]
    cfg = TrainConfig(max_tokens=64)
    for lora in (False, True):
        model = tiny_model("llama", seed=0, vocab_size=len(tok))
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                     init_lora_weights=False)).get_base_model()
        params = [p for p in model.parameters() if p.requires_grad]
        batch = _batch(tok, plain, 64, "cpu")
        own = model(**batch).loss
        mine = _loss(model, tok, plain, cfg, "cpu")
        torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-6)
        g_own = torch.autograd.grad(own, params)
        g_mine = torch.autograd.grad(_loss(model, tok, plain, cfg, "cpu"), params)
        for a, b in zip(g_mine, g_own):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        sides = _batch(tok, _sides(prefs), 64, "cpu")
        logits = model(input_ids=sides["input_ids"], attention_mask=sides["attention_mask"]).logits[:, :-1].float()
        labels = sides["labels"][:, 1:]
        keep = labels != -100
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        whole = (lp * keep).sum(-1) / keep.sum(-1)
        torch.testing.assert_close(_mean_logprob(model, sides), whole, rtol=1e-5, atol=1e-5)
