"""Pipeline schedules as action lists: every micro-batch runs forward then backward once per stage, in
an order that lets neighbouring stages meet; 1F1B bounds the micro-batches in flight."""

import pytest

from galvatron_fx.runtime.schedules import SCHEDULES, Post, Run, WaitAll, WaitSends, gpipe, one_f_one_b, transfer_plan


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
    from galvatron_fx.runtime.executor import pack, packed_bytes, unpack

    model, _ = build_model("llama")
    program = galvatron_fx.capture(model, example_kwargs=example_batch("llama", model, batch=2))
    plan = Plan(world_size=2, layers=(LayerStrategy(),) * len(program.body), pp=2, chunks=1, global_batch=2)
    first, second = lower(program, plan, 0), lower(program, plan, 1)
    assert first.send_specs == second.recv_specs and first.grad_names == second.grad_names
    floating = [spec for spec in first.send_specs if spec.dtype.is_floating_point]
    # the hidden state alone crosses the cut (each layer rebuilds its rotary tables; attention is causal)
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


def _replay(pp: int, chunks: int, schedule: str) -> int:
    """Every stage's transfer plan run against a model of NCCL's point-to-point semantics: on each directed
    link the k-th send matches the k-th receive (tags are ignored), a group completes once every transfer in
    it is matched, a stage waits for a group that receives at once and for lone sends when its plan says.
    Asserts that messages match (same kind and micro-batch), that a stage never has a send and a receive with
    the same peer outstanding in two groups, and that every stage finishes (no deadlock). Returns the
    number of groups posted."""
    plans = [transfer_plan(SCHEDULES[schedule](pp, s, chunks), s == 0, s == pp - 1) for s in range(pp)]
    sends, recvs = {}, {}  # link (src, dst) → the transfers posted on it, in order
    groups, outstanding = [], [[] for _ in range(pp)]  # per stage: groups posted and not yet waited
    position, waiting = [0] * pp, [None] * pp

    def link(stage, transfer):
        other = stage + 1 if transfer.peer == "next" else stage - 1
        return ((stage, other) if transfer.send else (other, stage)), other

    def matched(group) -> bool:
        return all(len((recvs if send else sends).get(key, ())) > index for key, index, send in group)

    progress = True
    while progress:
        progress = False
        for stage in range(pp):
            while position[stage] < len(plans[stage]):
                if waiting[stage] is not None:
                    if not all(matched(g) for g in waiting[stage]):
                        break
                    outstanding[stage] = [g for g in outstanding[stage] if g not in waiting[stage]]
                    waiting[stage] = None
                event = plans[stage][position[stage]]
                position[stage] += 1
                progress = True
                if isinstance(event, Post):
                    group = []
                    for transfer in event.transfers:
                        key, other = link(stage, transfer)
                        for earlier in outstanding[stage]:
                            assert not any(
                                k == key[::-1] or (k == key and s != transfer.send) for k, _, s in earlier
                            ), (schedule, pp, stage, event)
                        queue = (sends if transfer.send else recvs).setdefault(key, [])
                        group.append((key, len(queue), transfer.send))
                        queue.append((transfer.kind, transfer.micro_batch))
                    groups.append(group)
                    outstanding[stage].append(group)
                    if event.blocking:
                        waiting[stage] = [group]
                elif isinstance(event, WaitSends):
                    peer = stage + 1 if event.peer == "next" else stage - 1
                    waiting[stage] = [g for g in outstanding[stage] if any(peer in key for key, _, _ in g)]
                elif isinstance(event, WaitAll):
                    waiting[stage] = list(outstanding[stage])
            if (
                waiting[stage] is not None
                and position[stage] == len(plans[stage])
                and all(matched(g) for g in waiting[stage])
            ):
                waiting[stage] = None
    assert all(p == len(plan) and w is None for p, plan, w in zip(position, plans, waiting)), ("deadlock", schedule, pp)
    assert sends == recvs  # every message matched, in order
    return len(groups)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,chunks", [(2, 1), (2, 4), (4, 4), (4, 8), (8, 3)])
def test_transfers_are_grouped_and_cannot_deadlock_under_nccl_semantics(schedule, pp, chunks):
    assert _replay(pp, chunks, schedule) > 0


def test_a_send_and_the_next_receive_with_the_same_peer_form_one_group():
    # stage 1 of 2 under 1F1B: after F0 it sends micro-batch 0's activations and next receives their gradient
    plan = transfer_plan(one_f_one_b(2, 0, 2), first=True, last=False)
    posts = [event for event in plan if isinstance(event, Post)]
    assert [(t.kind, t.micro_batch, t.send) for t in posts[0].transfers] == [("act", 0, True)]  # F1 follows: alone
    assert [(t.kind, t.micro_batch, t.send) for t in posts[1].transfers] == [("act", 1, True), ("grad", 0, False)]
    assert isinstance(plan[plan.index(posts[1]) - 1], WaitSends)  # the lone send first
    assert [e.action for e in plan if isinstance(e, Run)] == list(one_f_one_b(2, 0, 2))


def _instrumented_worker(rank: int, world_size: int, schedule: str) -> dict:
    """Train a GPT-2 pipeline of 2 stages while counting the point-to-point calls made outside a group."""
    import torch.distributed as dist
    from distributed import _config, _program

    from galvatron_fx.plan import LayerStrategy, Plan
    from galvatron_fx.runtime import Trainer

    counts = {"grouped": 0, "lone": 0}
    isend, irecv, batch = dist.isend, dist.irecv, dist.batch_isend_irecv

    def lone(op):
        def call(*args, **kwargs):
            counts["lone"] += 1
            return op(*args, **kwargs)

        return call

    def grouped(ops):
        counts["grouped"] += len(ops)
        return batch(ops)

    dist.isend, dist.irecv, dist.batch_isend_irecv = lone(isend), lone(irecv), grouped
    try:
        program, batches = _program("gpt2")
        plan = Plan(
            world_size=2,
            layers=(LayerStrategy(),) * len(program.body),
            pp=2,
            chunks=4,
            pipeline=schedule,
            global_batch=8,
        )
        trainer = Trainer(program, plan, config=_config())
        losses = [float(trainer.step(b)) for b in batches[:2]]
    finally:
        dist.isend, dist.irecv, dist.batch_isend_irecv = isend, irecv, batch
    return {"counts": counts, "losses": losses}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_the_executor_only_sends_and_receives_in_groups(schedule):
    from galvatron_fx.runtime import spawn

    for result in spawn(_instrumented_worker, 2, schedule, timeout_s=300):
        assert result["counts"]["lone"] == 0 and result["counts"]["grouped"] == 2 * 2 * 4  # steps × directions × chunks
