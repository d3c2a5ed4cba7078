"""Perplexity (LLM-Pruner protocol), throughput and greedy generation (layerprune.evaluate)."""

from __future__ import annotations

import math

import pytest
import torch

from layerprune.errors import DataError, InvalidInputError
from layerprune.evaluation import generate_greedy, perplexity, throughput


def _random_tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _manual_perplexity(model, tokens: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Independent reference: one window at a time, log-softmax by hand in float64, gather each target."""
    total, count = 0.0, 0
    windows = tokens.numel() // seq_len
    with torch.no_grad():
        for w in range(windows):
            window = tokens[w * seq_len : (w + 1) * seq_len]
            logits = model(window.unsqueeze(0)).logits[0].double()
            for t in range(1, seq_len):
                row = logits[t - 1]
                peak = row.max()
                log_z = peak + torch.log(torch.exp(row - peak).sum())
                total += float(log_z - row[window[t]])
                count += 1
    return math.exp(total / count), count


def test_perplexity_matches_manual_computation(tiny_llama):
    model = tiny_llama(num_heads=6, num_kv_heads=2, vocab=97)
    tokens = _random_tokens(5 * 16, 97)
    result = perplexity(model, tokens, seq_len=16, progress=False)
    expected, count = _manual_perplexity(model, tokens, 16)
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    assert result["predicted_tokens"] == count == 5 * 15
    assert result["windows"] == 5 and result["tokens"] == 80 and result["seq_len"] == 16


def test_gemma_windows_start_with_bos_as_context_only():
    """A family that needs BOS at the start of a sequence (Gemma) gets it before every window: the same tokens are
    predicted (HF's loss over each window with BOS prepended and the first label masked), Llama's windows stay plain."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from families import CASES, make_model

    model = make_model(next(c for c in CASES if c.name == "gemma2-caps"))
    bos = model.config.bos_token_id
    tokens = _random_tokens(3 * 16, 320, seed=5)
    with torch.no_grad():
        losses = []
        for w in tokens.view(3, 16):
            inputs = torch.cat([torch.tensor([bos]), w])[None]
            labels = inputs.clone()
            labels[0, :2] = -100  # BOS is not predicted, nor is the window's first token
            losses.append(float(model(inputs, labels=labels).loss))
    result = perplexity(model, tokens, seq_len=16, progress=False)
    assert result["window_prefix"] == bos and result["predicted_tokens"] == 3 * 15
    assert result["nll"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    plain = perplexity(model, tokens, seq_len=16, progress=False, prefix_token=None)
    assert plain["window_prefix"] is None and abs(plain["nll"] - result["nll"]) > 1e-3
    llama = make_model(CASES[0])
    assert perplexity(llama, tokens, seq_len=16, progress=False)["window_prefix"] is None


def test_perplexity_matches_transformers_loss(tiny_llama):
    # Every window predicts seq_len - 1 tokens, so the mean of the per-window HF losses is the mean NLL.
    model = tiny_llama(vocab=128, seed=4)
    tokens = _random_tokens(4 * 32, 128, seed=1)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in tokens.view(4, 32)]
    result = perplexity(model, tokens, seq_len=32, progress=False)
    assert result["nll"] == pytest.approx(sum(losses) / 4, rel=1e-5)


def test_tail_is_dropped(tiny_llama):
    model = tiny_llama(vocab=128)
    tokens = _random_tokens(3 * 16 + 11, 128)
    result = perplexity(model, tokens, seq_len=16, progress=False)
    assert (result["windows"], result["tokens"], result["predicted_tokens"]) == (3, 48, 45)
    changed_tail = tokens.clone()
    changed_tail[48:] = (changed_tail[48:] + 1) % 128
    assert perplexity(model, changed_tail, seq_len=16, progress=False)["ppl"] == result["ppl"]
    assert perplexity(model, tokens[:48], seq_len=16, progress=False)["ppl"] == result["ppl"]
    changed_body = tokens.clone()
    changed_body[5] = (changed_body[5] + 1) % 128
    assert perplexity(model, changed_body, seq_len=16, progress=False)["ppl"] != result["ppl"]


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_batch_size_does_not_change_the_result(tiny_llama, batch_size):
    model = tiny_llama(num_heads=4, num_kv_heads=4, vocab=128, seed=2)
    tokens = _random_tokens(7 * 12, 128, seed=5).unsqueeze(0)  # [1, N] is accepted too
    one = perplexity(model, tokens, seq_len=12, batch_size=1, progress=False)
    many = perplexity(model, tokens, seq_len=12, batch_size=batch_size, progress=False)
    assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert many["predicted_tokens"] == one["predicted_tokens"] == 7 * 11


def test_bfloat16_model_is_close(tiny_llama):
    model = tiny_llama(vocab=128, seed=6)
    tokens = _random_tokens(4 * 16, 128)
    full = perplexity(model, tokens, seq_len=16, progress=False)["ppl"]
    half = perplexity(model.to(torch.bfloat16), tokens, seq_len=16, progress=False)["ppl"]
    assert half == pytest.approx(full, rel=0.05)


def test_bad_arguments(tiny_llama):
    model = tiny_llama(vocab=128)
    tokens = _random_tokens(40, 128)
    with pytest.raises(DataError, match="one window"):
        perplexity(model, tokens[:10], seq_len=16, progress=False)
    with pytest.raises(InvalidInputError, match="seq_len"):
        perplexity(model, tokens, seq_len=1, progress=False)
    with pytest.raises(InvalidInputError, match="batch_size"):
        perplexity(model, tokens, seq_len=8, batch_size=0, progress=False)
    with pytest.raises(InvalidInputError, match="1-D"):
        perplexity(model, tokens.view(4, 10), seq_len=8, progress=False)
    assert model.training is False


def test_throughput_is_positive(tiny_llama):
    model = tiny_llama(vocab=128)
    rate = throughput(model, seq_len=16, batch_size=2, repeats=2)
    assert math.isfinite(rate) and rate > 0
    with pytest.raises(InvalidInputError):
        throughput(model, repeats=0)


def test_generate_greedy_matches_transformers_generate(tiny_llama):
    from transformers import AutoTokenizer

    from layerprune.models import ensure_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    model = tiny_llama(vocab=len(tokenizer), hidden=32, num_heads=4, num_kv_heads=2, layers=2, seed=7)
    prompts = ["The capital of France is", "Robert Boulter is an English"]
    ours = generate_greedy(model, tokenizer, prompts, max_new_tokens=6)
    assert all(ours)
    for prompt, text in zip(prompts, ours):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
