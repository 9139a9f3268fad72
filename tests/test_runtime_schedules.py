"""Pipeline schedules as action lists: every micro-batch runs forward then backward once per stage, in
an order that lets neighbouring stages meet; 1F1B bounds the micro-batches in flight."""

import pytest

from galvatron_fx.runtime.schedules import SCHEDULES, _backwards_before_forwards, _Sends, gpipe, one_f_one_b


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("pp,chunks", [(1, 1), (2, 4), (4, 4), (4, 2), (3, 7)])
def test_every_micro_batch_forward_then_backward_in_order(name, pp, chunks):
    for stage in range(pp):
        actions = SCHEDULES[name](pp, stage, chunks)
        forwards = [a.micro_batch for a in actions if a.kind == "F"]
        backwards = [a.micro_batch for a in actions if a.kind == "B"]
        assert forwards == list(range(chunks)) and backwards == list(range(chunks))
        for mb in range(chunks):
            assert actions.index(next(a for a in actions if a.kind == "F" and a.micro_batch == mb)) < actions.index(
                next(a for a in actions if a.kind == "B" and a.micro_batch == mb)
            )


def _simulate(schedule, pp, chunks):
    """Run all stages' action lists with blocking receives; returns True when every stage finishes."""
    lists = [list(schedule(pp, s, chunks)) for s in range(pp)]
    done_f = [set() for _ in range(pp)]
    done_b = [set() for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for s in range(pp):
            while lists[s]:
                action = lists[s][0]
                ready = (action.kind == "F" and (s == 0 or action.micro_batch in done_f[s - 1])) or (
                    action.kind == "B" and (s == pp - 1 or action.micro_batch in done_b[s + 1])
                )
                if not ready:
                    break
                (done_f if action.kind == "F" else done_b)[s].add(lists[s].pop(0).micro_batch)
                progress = True
    return all(not rest for rest in lists)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("pp,chunks", [(2, 4), (4, 4), (4, 8), (4, 2), (8, 3)])
def test_schedules_cannot_deadlock(name, pp, chunks):
    assert _simulate(SCHEDULES[name], pp, chunks)


def test_one_f_one_b_limits_micro_batches_in_flight():
    pp, chunks = 4, 8
    for stage in range(pp):
        in_flight = peak = 0
        for action in one_f_one_b(pp, stage, chunks):
            in_flight += 1 if action.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == pp - stage
    assert [repr(a) for a in one_f_one_b(2, 0, 3)] == ["F0", "F1", "B0", "F2", "B1", "B2"]
    assert [repr(a) for a in gpipe(2, 0, 2)] == ["F0", "F1", "B0", "B1"]


def test_pipeline_cuts_pack_values_and_send_gradients_only_where_they_flow():
    import torch

    import galvatron_fx
    from galvatron_fx.models import build_model, example_batch
    from galvatron_fx.passes.lower.pipeline import lower
    from galvatron_fx.plan import LayerStrategy, Plan
    from galvatron_fx.runtime.schedules import pack, packed_bytes, unpack

    model, _ = build_model("llama")
    program = galvatron_fx.capture(model, example_kwargs=example_batch("llama", model, batch=2))
    plan = Plan(world_size=2, layers=(LayerStrategy(),) * len(program.body), pp=2, chunks=1, global_batch=2)
    first, second = lower(program, plan, 0), lower(program, plan, 1)
    assert first.send_specs == second.recv_specs and first.grad_names == second.grad_names
    floating = [spec for spec in first.send_specs if spec.dtype.is_floating_point]
    # the hidden state carries a gradient; the rotary tables (from a buffer) and the mask do not
    assert any(spec.shape[-1] == model.config.hidden_size for spec in floating)
    assert first.grad_names == {spec.name for spec in floating if spec.shape[-1] == model.config.hidden_size}
    values = [
        torch.randn(spec.shape).to(spec.dtype) if spec.dtype.is_floating_point else torch.rand(spec.shape) > 0.5
        for spec in first.send_specs
    ]
    buffer = pack(values)
    assert buffer.dtype == torch.uint8 and buffer.numel() == packed_bytes(first.send_specs)
    for value, back in zip(values, unpack(buffer, first.send_specs)):
        assert back.dtype == value.dtype and torch.equal(back, value)


def test_tied_parameters_under_every_name_carry_gradients():
    import galvatron_fx
    from galvatron_fx.models import build_model, example_batch

    model, _ = build_model("t5")  # the shared embedding is also reached as lm_head.weight
    program = galvatron_fx.capture(model, example_kwargs=example_batch("t5", model, batch=2))
    graph_module = program.graph_module
    params = dict(graph_module.named_parameters(remove_duplicate=False))
    fetched = [n for n in graph_module.graph.nodes if n.op == "get_attr" and n.target in params]
    assert "lm_head.weight" in {n.target for n in fetched}
    names = program.differentiable_names()
    for node in fetched:  # every fetch of a parameter, and every floating value computed from it directly
        assert node.name in names
        assert all(user.name in names for user in node.users if user.meta["val"].dtype.is_floating_point)


def test_sends_are_waited_on_once_the_peer_has_received_them():
    """Gloo reports a send complete only when waited on: the executor waits (freeing the buffer) as soon as
    the peer is known to have the message, so sent buffers do not pile up over a step."""
    # stage 1 of 4 under 1F1B: F0 F1 F2 B0 F3 B1 B2 B3; a gradient sent to it for micro-batch 0 has
    # arrived once it sends forward micro-batch 3
    upstream = one_f_one_b(4, 1, 4)
    assert _backwards_before_forwards(upstream) == {0: (), 1: (), 2: (), 3: (0,)}
    assert _backwards_before_forwards(gpipe(4, 1, 4)) == {0: (), 1: (), 2: (), 3: ()}

    class Work:
        def __init__(self):
            self.waited = False

        def wait(self):
            self.waited = True

    sends = _Sends(_backwards_before_forwards(upstream))
    forward, grad0, grad1 = Work(), Work(), Work()
    sends.add("F", 0, forward), sends.add("B", 0, grad0), sends.add("B", 1, grad1)
    sends.complete("F", 0)  # its gradient came back
    sends.upstream_sent_forward(2)
    assert forward.waited and not grad0.waited
    sends.upstream_sent_forward(3)
    assert grad0.waited and not grad1.waited and set(sends.works) == {("B", 1)}
    sends.wait_all()
    assert grad1.waited and not sends.works
