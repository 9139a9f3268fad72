"""A cost model that follows the search's cost contract with random but deterministic terms
(``ToyCostModel``): nothing in the search may rely on more than the contract, so the search must equal brute
force on it (tests/test_search.py)."""

import functools
import hashlib

import numpy as np

from galvatron_fx.cost.layer_cost import LayerCost
from galvatron_fx.cost.memory import InFlight
from galvatron_fx.parallel_dims import activation_strategy, end_layout
from galvatron_fx.plan import Plan, Prediction


@functools.lru_cache(maxsize=None)
def _rand_values(key: str) -> tuple:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    return tuple(rng.random(8))


class _Draws:
    """Deterministic pseudo-random draws per key (cached: brute force asks for the same terms often)."""

    def __init__(self, *key):
        self.values, self.i = _rand_values(repr(key)), 0

    def random(self) -> float:
        self.i += 1
        return self.values[self.i - 1]

    def integers(self, lo, hi=None):
        lo, hi = (0, lo) if hi is None else (lo, hi)
        return lo + int(self.random() * (hi - lo))


def _rand(*key) -> _Draws:
    return _Draws(*key)


class ToyCostModel:
    """The cost contract with random terms: nothing in the search may rely on more than the contract."""

    def __init__(self, layer_types, seed=0, heads=None, peak_values=(0, 0, 3_000, 7_000)):
        self.layer_types = list(layer_types)
        self.seed, self.heads, self.peak_values = seed, heads or {}, peak_values

    def busy_share(self, pp, chunks):
        return chunks / (chunks + pp - 1)

    @functools.lru_cache(maxsize=None)  # noqa: B019 (a few toy models per test run)
    def layer_cost(self, layer_type, s, mb, busy_share=1.0, deferred_sync=False):
        r = _rand(self.seed, layer_type, s, mb)
        work = mb * (1.0 + r.random()) / s.tp * (0.5 + busy_share)  # contention grows with the busy share
        ckpt = 1.3 if s.ckpt else 1.0
        state = int(r.integers(20_000, 60_000) * (1 / s.dp if s.dp_type == "zero3" else 1) / s.tp)
        act = int(mb * r.integers(1_000, 8_000) * (0.3 if s.ckpt else 1.0) / s.tp)
        sync = 0.0 if s.dp == 1 else float(r.random()) * (0.5 if s.dp_type == "ddp" else 1.0)
        peak = int(self.peak_values[int(r.integers(len(self.peak_values)))]) if (s.ckpt or s.dp_type == "zero3") else 0
        grad = int(state * r.random() * 0.5)
        return LayerCost(work, work * ckpt * 2, sync, state, act, peak, grad, int(grad * r.random()))

    def embedding_cost(self, e, devices, mb, *, first_stage, last_stage, busy_share=1.0, deferred_sync=False):
        if not (first_stage or last_stage):
            return LayerCost(0.0, 0.0, 0.0, 0, 0, 0)
        r = _rand(self.seed, "emb", e, devices, mb, first_stage, last_stage)
        state = int(r.integers(5_000, 30_000) / e.vtp / (devices // e.vtp if e.embed_sdp else 1))
        work = mb / e.vtp * (0.5 + busy_share)
        return LayerCost(
            float(r.random()) * work,
            float(r.random()) * work,
            float(r.random()) * 0.3,
            state,
            int(mb * r.integers(100, 900) / (e.vtp if e.vsp else 1)),
            2_000 if e.embed_sdp else 0,
            state // 4,
            state // 8,
        )

    def redistribution_s(self, before, after, boundary_index, mb):
        # the contract: a strategy's layout is its activation_strategy's (a grid layer's: a 1D layer's on its rows)
        before, after = activation_strategy(before), activation_strategy(after)
        a, b = (before.tp, before.sp, before.tp_consecutive), (after.tp, after.sp, after.tp_consecutive)
        if a == b:
            return 0.0
        i, j = boundary_index, boundary_index - 1  # boundary 0: from the embedding; L: into the head
        left = self.layer_types[j] if j >= 0 else "embedding"
        right = self.layer_types[i] if i < len(self.layer_types) else "head"
        return float(_rand(self.seed, "redis", a, b, left, right, mb).random()) * 0.4 * mb

    def p2p_s(self, stage, plan_pp, devices_per_stage, mb, cut_after_body_index):
        return 0.05 * mb * (1 + (cut_after_body_index % 3)) / devices_per_stage

    def in_flight(self, pipeline, pp, stage, chunks):
        return InFlight.of(pipeline, pp, stage, chunks)

    def unsupported_reason(self, layer_type, s):
        heads = self.heads.get(layer_type)
        if heads and s.tp > 1 and heads % s.tp:
            return f"tp {s.tp} does not divide {heads} heads"
        return None

    def evaluate(self, plan: Plan) -> Prediction:
        mb, c, pp = plan.micro_batch, plan.chunks, plan.pp
        share = self.busy_share(pp, c)
        xs, gs, mems = [], [], []
        for s in range(pp):
            idx = list(plan.stage_layers(s))
            costs = [self.layer_cost(self.layer_types[i], plan.layers[i], mb, share) for i in idx]
            emb = self.embedding_cost(
                plan.embedding, plan.devices_per_stage, mb, first_stage=s == 0, last_stage=s == pp - 1, busy_share=share
            )
            k = self.in_flight(plan.pipeline, pp, s, c)
            x = sum(q.fwd_s + q.bwd_s for q in costs) + emb.fwd_s + emb.bwd_s
            x += sum(self.redistribution_s(plan.layers[i - 1], plan.layers[i], i, mb) for i in idx[1:])
            ends = end_layout(plan.embedding, plan.devices_per_stage)  # the data split, or vsp's layout
            x += self.redistribution_s(ends, plan.layers[0], 0, mb) if s == 0 else 0.0
            x += self.redistribution_s(plan.layers[-1], ends, len(plan.layers), mb) if s == pp - 1 else 0.0
            if s < pp - 1:
                x += self.p2p_s(s, pp, plan.devices_per_stage, mb, idx[-1])
            g = (sum(q.grad_sync_s for q in costs) + emb.grad_sync_s) * (c if plan.grad_sync_every_micro_batch else 1)
            mem = sum(
                int(k.layer_bytes(q.model_state_bytes, q.activation_bytes, q.grad_bytes, q.optimizer_temp_bytes))
                for q in costs + [emb]
            )
            mem += max(q.peak_extra_bytes for q in costs + [emb])
            xs.append(x), gs.append(g), mems.append(mem)
        t = sum(xs) + (c - 1) * max(xs) + max(gs)
        return Prediction(t, plan.global_batch / t, tuple(mems))
