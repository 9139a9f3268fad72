"""Bad input to capture() gets a GalvatronError naming the cause and a remedy."""

import pytest
import torch
import torch.nn as nn

import galvatron_fx
from galvatron_fx import CaptureError
from galvatron_fx.models import build_model


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: export cannot capture it
            return self.proj(x).sum()
        return x.sum()


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean()


def test_export_failure_names_gist_and_remedy():
    with pytest.raises(CaptureError) as error:
        galvatron_fx.capture(DataDependent(), (torch.ones(2, 4),))
    message = str(error.value)
    assert "torch.export could not capture DataDependent" in message
    assert "control flow" in message  # the remedy


def test_inputs_not_fitting_forward():
    model, batch = build_model("nanogpt")
    with pytest.raises(CaptureError, match=r"do not fit GPT.forward\(idx, targets\)"):
        galvatron_fx.capture(model, example_kwargs={**batch, "mask": batch["idx"]})
    hf_model, hf_batch = build_model("gpt2")
    too_many = tuple(range(20))
    with pytest.raises(CaptureError, match="do not fit GPT2LMHeadModel.forward"):
        galvatron_fx.capture(hf_model, too_many, hf_batch)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_decoder_cache_left_on(name):
    model, batch = build_model(name)
    batch.pop("use_cache")
    with pytest.raises(CaptureError, match="use_cache=False"):
        galvatron_fx.capture(model, example_kwargs=batch)


def test_model_without_repeated_blocks_is_one_layer():
    model, x = NoBlocks(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="no repeated blocks"):
        program = galvatron_fx.capture(model, (x,))
    assert len(program.body) == 1 and program.body[0].stats.param_count == 8 * 16 + 16 + 16 + 1
    assert torch.allclose(program.run_layers(x), model(x))
