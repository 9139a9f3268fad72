"""galvatron_fx.data.samples: GPT-style samples cut from an indexed dataset, and the kwargs each built-in model
family trains on (the Hugging Face causal loss checked against a hand-computed cross entropy)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from galvatron_fx.data import (
    ByteTokenizer,
    IndexedDataset,
    IndexedDatasetWriter,
    TokenSamples,
    hf_causal,
    masked_lm,
    plain_causal,
    prefix_lm_seq2seq,
    samples_for_model,
)
from galvatron_fx.errors import ConfigError
from galvatron_fx.models import build_model


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(1)
    # lengths include 1-token and empty documents, so samples cross several sequences and skip empty ones
    lengths = [5, 1, 0, 13, 2, 40, 0, 7, 3, 29]
    with IndexedDatasetWriter(tmp_path / "t", np.uint16) as writer:
        for n in lengths:
            tokens = rng.integers(1, 256, n).tolist()
            writer.add_document(tokens + [0] if tokens else [])
    return IndexedDataset(tmp_path / "t")


def _stream(dataset):
    return np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)


@pytest.mark.parametrize("seq", [1, 4, 7, 16])
def test_token_samples_cover_the_stream(dataset, seq):
    samples = TokenSamples(dataset, seq)
    stream = _stream(dataset)
    assert len(samples) == (len(stream) - 1) // seq
    covered = []
    for i in range(len(samples)):
        sample = samples[i]
        assert sample.dtype == torch.int64 and sample.shape == (seq + 1,)
        np.testing.assert_array_equal(sample.numpy(), stream[i * seq : i * seq + seq + 1])
        if i + 1 < len(samples):
            assert sample[-1] == samples[i + 1][0], "contiguous: one token of overlap"
        covered.extend(sample[:-1].tolist())
    # every token is some position's input, but for the last few that do not fill a sample
    assert covered == stream[: len(samples) * seq].tolist()
    assert len(stream) - len(covered) <= seq
    assert torch.equal(samples[-1], samples[len(samples) - 1])
    with pytest.raises(IndexError):
        samples[len(samples)]


def test_token_samples_errors(dataset):
    with pytest.raises(ConfigError, match="fewer than one sample"):
        TokenSamples(dataset, dataset.num_tokens)
    with pytest.raises(ConfigError, match="not positive"):
        TokenSamples(dataset, 0)


def _hand_loss(model, input_ids, targets):
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    # float32, as transformers computes its loss: the comparison tests which targets are scored, not rounding
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_causal_loss_predicts_the_next_tokens(dataset, name):
    model, _ = build_model(name)
    model.eval()
    samples = samples_for_model(name, dataset, seq=16)
    batch = torch.utils.data.default_collate([samples[0], samples[2]])
    tokens = torch.stack([TokenSamples(dataset, 16)[i] for i in (0, 2)])
    assert batch.keys() == {"input_ids", "labels"}, "no **kwargs input: capture keeps a symbolic batch"
    assert torch.equal(batch["input_ids"], tokens[:, :-1]) and torch.equal(batch["labels"], tokens[:, :-1])
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss.item()
    # the model shifts the labels: inputs 0..14 predict tokens 1..15 of each row
    assert abs(loss - _hand_loss(model, tokens[:, :-2], tokens[:, 1:-1])) < 1e-5


def test_plain_causal_nanogpt(dataset):
    model, _ = build_model("nanogpt")
    sample = samples_for_model("nanogpt", dataset, seq=8)[1]
    tokens = TokenSamples(dataset, 8)[1]
    assert torch.equal(sample["idx"], tokens[:-1]) and torch.equal(sample["targets"], tokens[1:])
    assert plain_causal(tokens).keys() == {"idx", "targets"}
    loss = model(**torch.utils.data.default_collate([sample]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert samples_for_model(model, dataset, seq=8)[1].keys() == {"idx", "targets"}


def test_masked_lm_is_deterministic_and_masks_15_percent():
    tokens = torch.arange(1, 202) % 250 + 1  # 201 tokens: seq 200
    first = masked_lm(tokens, index=3, vocab_size=256, mask_token_id=255, seed=7)
    again = masked_lm(tokens, index=3, vocab_size=256, mask_token_id=255, seed=7)
    other = masked_lm(tokens, index=4, vocab_size=256, mask_token_id=255, seed=7)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["labels"], other["labels"])
    chosen = first["labels"] != -100
    assert chosen.sum() == 30  # 15 % of 200
    assert torch.equal(first["labels"][chosen], tokens[:-1][chosen])
    assert torch.equal(first["input_ids"][~chosen], tokens[:-1][~chosen]), "only chosen positions change"
    masked = (first["input_ids"] == 255).sum().item()
    assert 15 <= masked <= 30  # about 80 % of the chosen read the mask token
    assert first["input_ids"].shape == (200,)
    assert hf_causal(tokens)["input_ids"].shape == (200,)


def test_masked_lm_trains_bert(dataset):
    model, _ = build_model("bert")
    samples = samples_for_model("bert", dataset, seq=16, seed=3)
    batch = torch.utils.data.default_collate([samples[i] for i in range(4)])
    assert (batch["input_ids"] == ByteTokenizer.mask).any()
    assert torch.isfinite(model(**batch).loss)
    assert torch.equal(samples[2]["labels"], samples_for_model("bert", dataset, seq=16, seed=3)[2]["labels"])


def test_prefix_lm_t5(dataset):
    tokens = torch.arange(10, 27)  # seq 16
    sample = prefix_lm_seq2seq(tokens, decoder_start_token_id=0)
    assert sample["input_ids"].tolist() == list(range(10, 18))
    assert sample["labels"].tolist() == list(range(18, 26))
    assert sample["decoder_input_ids"].tolist() == [0] + list(range(18, 25))
    assert not set(sample["labels"].tolist()) & set(sample["input_ids"].tolist()), "targets are not in the input"
    model, _ = build_model("t5")
    samples = samples_for_model(model, dataset, seq=16)
    batch = torch.utils.data.default_collate([samples[0], samples[1]])
    assert batch["input_ids"].shape == (2, 8) and batch["decoder_input_ids"].shape == batch["labels"].shape == (2, 8)
    assert torch.isfinite(model(**batch, use_cache=False).loss)


def test_samples_for_model_images_and_errors(dataset):
    images = [{"pixel_values": torch.zeros(3, 32, 32), "labels": 1}]
    assert samples_for_model("vit", images, seq=0) is images
    with pytest.raises(ConfigError, match="cannot train on a token dataset"):
        samples_for_model("swin", dataset, seq=16)
    with pytest.raises(ConfigError, match="no token-sample adapter"):
        samples_for_model("resnet", dataset, seq=16)
    with pytest.raises(ConfigError, match="needs an IndexedDataset"):
        samples_for_model("gpt2", [1, 2, 3], seq=16)


def test_samples_pickle_for_dataloader_workers(dataset):
    for name in ("gpt2", "bert", "t5", "nanogpt"):
        samples = samples_for_model(name, dataset, seq=8, seed=1)
        copy = pickle.loads(pickle.dumps(samples))
        assert all(torch.equal(copy[5][k], samples[5][k]) for k in samples[5])
    by_path = samples_for_model("gpt2", Path(dataset.prefix), seq=8)
    assert torch.equal(by_path[5]["input_ids"], samples_for_model("gpt2", dataset, seq=8)[5]["input_ids"])
    loader = torch.utils.data.DataLoader(samples_for_model("gpt2", dataset, seq=8), batch_size=4)
    assert next(iter(loader))["input_ids"].shape == (4, 8)
