"""Layer discovery (``passes.analysis.discover_layers``) without per-model code: the repeated blocks are the
elements of the innermost module lists whose children share one class; what runs before the first block is
the prologue, after the last the epilogue, and between blocks a transition."""

import pytest
import torch
import torch.nn as nn

import galvatron_fx
from galvatron_fx.passes.analysis.discover_layers import find_block_paths


class _Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear(x)) + x


class _Stages(nn.Module):
    """Two stages of blocks with a merge between them (Swin's shape): lists nested in a list."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.stages = nn.ModuleList(
            [nn.ModuleList([_Block(), _Block()]), nn.ModuleList([_Block(), _Block(), _Block()])]
        )
        self.merge = nn.Linear(8, 8)
        self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])  # two classes: not a list of blocks
        self.head = nn.Linear(8, 1)

    def forward(self, x, y):
        x = self.embed(x)
        for block in self.stages[0]:
            x = block(x)
        x = self.merge(x)
        for block in self.stages[1]:
            x = block(x)
        for module in self.mixed:
            x = module(x)
        return nn.functional.mse_loss(self.head(x).squeeze(-1), y)


def test_blocks_are_the_elements_of_the_innermost_same_class_lists():
    assert find_block_paths(_Stages()) == ["stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1", "stages.1.2"]


def test_layers_in_order_with_prologue_transition_and_epilogue():
    x, y = torch.randn(3, 4), torch.randn(3)
    program = galvatron_fx.capture(_Stages(), (x, y))
    assert [layer.kind for layer in program.layers] == [
        "prologue",
        "block",
        "block",
        "transition",
        "block",
        "block",
        "block",
        "epilogue",
    ]
    assert [layer.module_path for layer in program.layers if layer.kind == "block"] == find_block_paths(_Stages())
    assert len({layer.layer_type for layer in program.layers if layer.kind == "block"}) == 1  # one structure, one type
    assert program.layers[3].module_path == "merge" and "head" in program.epilogue.module_path
    torch.manual_seed(0)
    model = _Stages()
    program = galvatron_fx.capture(model, (x, y))
    assert torch.allclose(program.run_layers(x, y), model(x, y))


def test_a_model_without_repeated_blocks_is_one_layer_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="no repeated blocks"):
        program = galvatron_fx.capture(_Loss(model), (torch.randn(2, 4), torch.randn(2, 4)))
    assert [layer.kind for layer in program.layers] == ["prologue", "block", "epilogue"]


class _Loss(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, y):
        return nn.functional.mse_loss(self.inner(x), y)
