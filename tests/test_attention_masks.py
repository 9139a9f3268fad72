"""Attention masks at capture: causal masks become ``is_causal=True`` and never cross a layer boundary;
masks that carry information (padding, sliding windows, relative bias) are kept, and the program still
computes what the model computes."""

import pytest
import torch

import galvatron_fx
from galvatron_fx.models import _transformers, build_model

SEQ, BATCH = 12, 2  # a sequence length unlike every head_dim and hidden size below
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _decoder(name: str, **extra):
    T = _transformers()
    shape = dict(
        vocab_size=96,
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=72,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )
    config, model = {"mistral": (T.MistralConfig, T.MistralForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[
        name
    ]
    return model(config(**shape, **extra))


def _built(name: str, **extra):
    torch.manual_seed(0)
    if name in ("mistral", "qwen2"):
        model = _decoder(name, **extra)
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
        return model, {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "use_cache": False}
    return build_model(name, batch=BATCH, seq=SEQ)


def _attentions(program):
    return list(program.graph_module.graph.find_nodes(op="call_function", target=SDPA))


def _mask_and_causal(node):
    args = list(node.args) + [None, 0.0, False][len(node.args) - 3 :]
    return node.kwargs.get("attn_mask", args[3]), node.kwargs.get("is_causal", args[5])


def _square_boundaries(program):
    """Every (seq, seq) tensor live at a layer boundary (a mask crossing a pipeline cut)."""
    return [
        (layer.index, spec.name, spec.shape)
        for layer in program.layers
        for spec in layer.boundary_out
        if len(spec.shape) >= 2 and tuple(spec.shape[-2:]) == (SEQ, SEQ)
    ]


def _same_loss_and_grads(model, batch, program):
    eager = model(**batch).loss
    eager.backward()
    ours = program.run_layers(**batch)
    ours = ours if isinstance(ours, torch.Tensor) else ours.loss
    ours.backward()
    assert abs(ours.item() - eager.item()) <= 1e-5
    for name, param in program.named_parameters():
        assert torch.allclose(param.grad, model.get_parameter(name).grad, atol=1e-5), name


@pytest.mark.parametrize("name", ["llama", "gpt2", "mistral", "qwen2"])
def test_causal_decoders_send_hidden_states_only(name):
    model, batch = _built(name)
    program = galvatron_fx.capture(model, example_kwargs=batch)
    attentions = _attentions(program)
    assert len(attentions) == model.config.num_hidden_layers
    for node in attentions:
        mask, causal = _mask_and_causal(node)
        assert mask is None and causal is True, node.format_node()
    assert _square_boundaries(program) == []
    for layer in program.body[:-1]:  # between blocks: the residual stream, nothing else batched by seq
        batched = [spec for spec in layer.boundary_out if spec.batched]
        assert len(batched) == 1 and batched[0].shape[-2] == SEQ, layer.boundary_out
    _same_loss_and_grads(model, batch, program)


def test_sliding_window_shorter_than_the_sequence_keeps_its_mask():
    model, batch = _built("mistral", sliding_window=5)  # not causal: keys further back than 5 are hidden
    program = galvatron_fx.capture(model, example_kwargs=batch)
    masks = [_mask_and_causal(node)[0] for node in _attentions(program)]
    assert all(mask is not None for mask in masks)
    _same_loss_and_grads(model, batch, program)


def test_padding_mask_from_the_batch_is_kept():
    model, batch = _built("bert")
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, SEQ - 4 :] = 0  # the second sequence is padded
    batch = {**batch, "attention_mask": attention_mask}
    program = galvatron_fx.capture(model, example_kwargs=batch)
    for node in _attentions(program):
        mask, causal = _mask_and_causal(node)
        assert mask is not None and causal is False
    _same_loss_and_grads(model, batch, program)
    # the padding changes the result: a program that dropped the mask would differ
    unpadded = {**batch, "attention_mask": torch.ones_like(attention_mask)}
    assert (model(**unpadded).logits - model(**batch).logits).abs().max() > 1e-3


def test_bert_without_padding_drops_the_mask():
    model, batch = _built("bert")
    program = galvatron_fx.capture(model, example_kwargs=batch)
    for node in _attentions(program):
        mask, causal = _mask_and_causal(node)
        assert mask is None and causal is False
    _same_loss_and_grads(model, batch, program)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_models_captured_on_the_meta_device_run_causal_attention(name):
    """As ``galvatron-fx search`` captures them: built and captured under ``torch.device("meta")``."""
    with torch.device("meta"):
        model, batch = build_model(name, batch=BATCH, seq=SEQ)
        program = galvatron_fx.capture(model, example_kwargs=batch)
    assert all(_mask_and_causal(node) == (None, True) for node in _attentions(program))
    assert _square_boundaries(program) == []


class _BufferMaskAttention(torch.nn.Module):
    """Attention whose causal mask is a buffer, as older decoders keep it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.register_buffer("keep", torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # 2 heads
        keep = self.keep[: x.shape[1], : x.shape[1]]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).sum()


def test_a_causal_buffer_is_read_unless_it_is_on_the_meta_device():
    x = torch.randn(BATCH, SEQ, 16)
    real = galvatron_fx.capture(_BufferMaskAttention(), (x,))
    assert [_mask_and_causal(node) for node in _attentions(real)] == [(None, True)]
    with torch.device("meta"):  # the buffer's values are unknown: the mask is kept, not guessed
        on_meta = galvatron_fx.capture(_BufferMaskAttention(), (torch.empty(BATCH, SEQ, 16),))
    ((mask, causal),) = [_mask_and_causal(node) for node in _attentions(on_meta)]
    assert mask is not None and causal is False


@pytest.fixture
def fake_world():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from galvatron_fx.runtime import groups

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    yield
    dist.destroy_process_group()
    groups.clear_cache()


@pytest.mark.parametrize("sp", ["none", "megatron", "ulysses"])
def test_lowered_attention_stays_causal_under_tensor_parallelism(fake_world, sp):
    """Lowered for 4 ranks (pp2 × tp2; sequence parallel too): every stage's attention still runs with
    is_causal=True and no mask, and the cut between the stages carries the hidden state alone."""
    from galvatron_fx.passes.lower.pipeline import lower
    from galvatron_fx.passes.lower.stage import unwrap
    from galvatron_fx.plan import LayerStrategy, Plan

    model, batch = _built("llama")
    program = galvatron_fx.capture(model, example_kwargs=batch)
    layers = tuple(LayerStrategy(tp=2, sp=sp) for _ in program.body)
    plan = Plan(world_size=4, layers=layers, pp=2, global_batch=BATCH)
    for rank in (0, 2):
        stage = lower(program, plan, rank)
        attentions = [
            node
            for layer in stage.stage_layers
            for node in unwrap(stage.layers[layer.name]).graph.find_nodes(op="call_function", target=SDPA)
        ]
        assert attentions and all(_mask_and_causal(node) == (None, True) for node in attentions)
    first = lower(program, plan, 0)
    assert len(first.send_specs) == 1 and first.send_specs[0].shape[-1] == model.config.hidden_size
