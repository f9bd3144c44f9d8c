"""Batched per-example LoRA gradients against batch-size-1 autograd; the Adam feature against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g2is_graph.config import DataConfig, LoraSettings
from g2is_graph.data.records import collate, encode_all, read_jsonl
from g2is_graph.grads.gradients import AdamState, PerExampleGradients, adam_feature, reference_gradient
from g2is_graph.model.loading import add_lora, load_base_model, load_tokenizer, lora_parameters


def lora_model(tiny_model, dtype="float32"):
    torch.manual_seed(0)
    model = add_lora(load_base_model(tiny_model, dtype), LoraSettings(r=4, alpha=16, dropout=0.1))
    for name, p in lora_parameters(model):
        if "lora_B" in name:  # peft initialises B to zero; give the adapter a non-trivial state
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def encoded(tiny_model, tmp_path_factory):
    from conftest import write_pool

    pool = write_pool(tmp_path_factory.mktemp("g") / "pool.jsonl", 9)
    tokenizer = load_tokenizer(tiny_model)
    _, encoded, _ = encode_all(read_jsonl(pool).records, tokenizer, DataConfig())
    assert len({e.n_tokens for e in encoded}) > 3  # lengths differ, so batches are padded
    return encoded, tokenizer.pad_token_id


@pytest.mark.parametrize("batch_size", [1, 2, 4, 9])
def test_batched_equals_batch_size_one_whatever_the_padding(tiny_model, encoded, batch_size):
    examples, pad_id = encoded
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    reference = torch.stack([reference_gradient(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
                             for e in examples])
    assert extractor.spec.dim == reference.shape[1]
    order = list(reversed(range(len(examples))))  # different batch compositions than the natural order
    rows = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        grads, losses = extractor.compute(*collate([examples[i] for i in idx], pad_id))
        rows.update(zip(idx, grads))
    batched = torch.stack([rows[i] for i in range(len(examples))])
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6)


def test_extra_padding_does_not_change_a_gradient(tiny_model, encoded):
    examples, pad_id = encoded
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    alone, _ = extractor.compute(*collate(examples[:1], pad_id))
    ids, labels, attention = collate(examples[:1], pad_id)
    pad = 17
    ids = torch.cat([ids, torch.full((1, pad), pad_id)], 1)
    labels = torch.cat([labels, torch.full((1, pad), -100)], 1)
    attention = torch.cat([attention, torch.zeros((1, pad), dtype=torch.long)], 1)
    padded, _ = extractor.compute(ids, labels, attention)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_accumulate_in_float32(tiny_model, encoded, dtype):
    examples, pad_id = encoded
    model = lora_model(tiny_model, dtype)
    extractor = PerExampleGradients(model)
    grads, _ = extractor.compute(*collate(examples[:4], pad_id))
    assert grads.dtype == torch.float32 and torch.isfinite(grads).all()
    reference = torch.stack([reference_gradient(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
                             for e in examples[:4]])
    cos = torch.nn.functional.cosine_similarity(grads, reference, dim=1)
    assert cos.min() > 0.99


def test_eval_mode_required(tiny_model, encoded):
    examples, pad_id = encoded
    model = lora_model(tiny_model).train()
    with pytest.raises(Exception, match="eval"):
        PerExampleGradients(model).compute(*collate(examples[:2], pad_id))


def test_adam_feature_matches_the_formula():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 50)).astype(np.float32)
    m = rng.standard_normal(50).astype(np.float32) * 0.1
    v = rng.random(50).astype(np.float32) * 0.01
    state = AdamState(torch.tensor(m), torch.tensor(v), step=7, beta1=0.9, beta2=0.999, eps=1e-8)
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * g * g
    less = m1 / np.sqrt(v1 + 1e-8)
    corrected = (m1 / (1 - 0.9 ** 8)) / (np.sqrt(v1 / (1 - 0.999 ** 8)) + 1e-8)
    np.testing.assert_allclose(adam_feature(torch.tensor(g), state, "less").numpy(), less, rtol=1e-5)
    np.testing.assert_allclose(adam_feature(torch.tensor(g), state, "corrected").numpy(), corrected, rtol=1e-5)
    # the two forms differ (bias correction is not a no-op at step 8)
    assert np.abs(less - corrected).max() > 1e-2


def test_loss_on_loss_positions_equals_the_full_logits_loss(tiny_model, encoded):
    from g2is_graph.grads.gradients import loss_token_losses, per_example_loss

    model = lora_model(tiny_model)
    examples, pad = encoded
    ids, labels, attention = collate(examples[:5], pad)
    full = per_example_loss(model(input_ids=ids, attention_mask=attention).logits, labels)
    torch.testing.assert_close(loss_token_losses(model, ids, labels, attention), full, rtol=1e-5, atol=1e-6)
