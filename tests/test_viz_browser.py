"""The HTML page in a real headless browser (Debian's chromium at /usr/bin/chromium): a screenshot whose pixels
are checked against the plan, and the rendered DOM. The page must be self-contained (no network)."""

import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest

from galvatron_fx import capture
from galvatron_fx.cluster import Cluster
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile
from galvatron_fx.models import build_model
from galvatron_fx.plan import EmbeddingStrategy, Plan
from galvatron_fx.plan import LayerStrategy as S
from galvatron_fx.viz import build_layer_graph, render_html
from galvatron_fx.viz.html import ACTIVATIONS_FILL, BACKWARD_FILL, FORWARD_FILL, PEAK_FILL, STATES_FILL

WINDOW = (1280, 2400)
PLANS = {
    "gpt2": Plan(
        world_size=4,
        pp=2,
        pp_division=(2, 2),
        pipeline="1f1b",
        chunks=4,
        global_batch=8,
        layers=(S(tp=2), S(dp=2, dp_type="zero3", ckpt=True), S(tp=2, sp="megatron"), S(dp=2, dp_type="zero2")),
        embedding=EmbeddingStrategy(vtp=2),
    ),
    "t5": Plan(
        world_size=4,
        pp=2,
        pp_division=(3, 4),
        pipeline="gpipe",
        chunks=2,
        global_batch=8,
        layers=(
            S(dp=2),
            S(dp=2, ckpt=True),
            S(tp=2, sp="ulysses"),
            S(tp=2),
            S(tp=2, tp_consecutive=False),
            S(dp=2, dp_type="zero3"),
            S(tp=2, ckpt=True),
        ),
    ),
}


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert os.path.exists(path), (
        "Debian's chromium is needed for this test: apt-get install -y chromium fonts-dejavu-core"
    )
    return path


def run_chromium(tmp_path, page, *args) -> subprocess.CompletedProcess:
    command = [
        chromium_path(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
        page.as_uri(),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def read_png(path) -> np.ndarray:
    """RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what chromium writes), as (height, width, 3)."""
    data, pos, chunks = path.read_bytes(), 8, []
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(b"".join(chunks)), width * bpp
    image = np.zeros((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind, row = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 1:  # Sub: a running sum along the row, per channel
            out = np.cumsum(row.reshape(width, bpp), axis=0).reshape(-1) & 255
        elif kind == 2:
            out = (row + prior) & 255
        elif kind in (3, 4):
            out, up = [0] * stride, prior.tolist()
            for i, value in enumerate(row.tolist()):
                a = out[i - bpp] if i >= bpp else 0
                c = up[i - bpp] if i >= bpp else 0
                if kind == 3:
                    predictor = (a + up[i]) >> 1
                else:
                    p = a + up[i] - c
                    pa, pb, pc = abs(p - a), abs(p - up[i]), abs(p - c)
                    predictor = a if pa <= pb and pa <= pc else (up[i] if pb <= pc else c)
                out[i] = (value + predictor) & 255
            out = np.array(out, dtype=np.int64)
        else:
            out = row
        image[y], prior = out, out
    return image.reshape(height, width, bpp)[:, :, :3]


def mask(image, hex_color) -> np.ndarray:
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return np.all(image == rgb, axis=2)


class Elements(HTMLParser):
    """Every start tag of a document with its attributes."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))

    def having(self, *classes):
        return [a for _, a in self.found if set(classes) <= set((a.get("class") or "").split())]


@pytest.fixture(scope="module")
def graphs():
    built = {}
    for name, plan in PLANS.items():
        model, kwargs = build_model(name, batch=4, seq=32)
        program = capture(model, example_kwargs=kwargs)
        cluster = Cluster.preset("A100-80GB", nodes=1, devices_per_node=4)
        cost_model = CostModel(
            ModelProfile.from_program(program, flops_per_s=cluster.sustained_flops["fp32"]), cluster.hardware_profile()
        )
        graph = build_layer_graph(program, plan, cost_model)
        # a budget between the two stages' peaks: one stage fits, the other is flagged
        budget = sum(s.memory_bytes for s in graph.stages) // 2
        built[name] = build_layer_graph(program, plan, cost_model, memory_budget_bytes=budget)
    return built


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_page_is_self_contained(graphs, name):
    page = render_html(graphs[name])
    assert not re.search(r"(?<![-\w])(src|href)\s*=", page)
    assert "@import" not in page and "https://" not in page
    assert set(re.findall(r"http://[^\"' ]+", page)) <= {
        "http://www.w3.org/2000/svg"
    }  # the SVG namespace, never fetched
    assert set(re.findall(r"url\(([^)]*)\)", page)) <= {"#arrow"}


def test_screenshot_shows_strategies_memory_and_timeline(graphs, tmp_path):
    graph = graphs["gpt2"]
    page = tmp_path / "plan.html"
    page.write_text(render_html(graph), encoding="utf-8")
    shot = tmp_path / "plan.png"
    run_chromium(tmp_path, page, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    image = read_png(shot)
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    assert (image < 245).any(axis=2).mean() > 0.1, "the page looks blank"

    # every strategy colour fills its layers' boxes: pixels in proportion to its number of layers
    layers_of = {label: [n for n in graph.layers if n.strategy_label == label] for label, _ in graph.legend}
    per_layer = {label: mask(image, color).sum() / len(layers_of[label]) for label, color in graph.legend}
    typical = np.median(list(per_layer.values()))
    assert typical > 5000
    for label, count in per_layer.items():
        assert 0.7 * typical < count < 1.3 * typical, (label, count, typical)
    # ... at the layers' places: boxes of single-layer strategies top to bottom in execution order
    centres = [
        (n.index, np.median(np.nonzero(mask(image, n.color))[0]))
        for label, nodes in layers_of.items()
        if len(nodes) == 1
        for n in nodes
    ]
    ordered = [y for _, y in sorted(centres)]
    assert ordered == sorted(ordered) and len(ordered) == 4
    embed_rows = np.nonzero(mask(image, graph.layers[0].color))[0]
    assert embed_rows.min() < ordered[0] and embed_rows.max() > ordered[-1]  # prologue above, epilogue below
    box_rows = np.nonzero(np.any([mask(image, color).sum(axis=1) > 200 for _, color in graph.legend], axis=0))[0]
    graph_bottom = box_rows.max()  # the lowest row wide enough for a layer box (legend and table swatches are narrow)

    # memory bars below the graph, one per stage, model-state widths in proportion to the stages' figures
    states = mask(image, STATES_FILL)
    bar_rows = [r for r in np.nonzero(states.sum(axis=1) > 20)[0]]  # the legend square below is narrower
    assert min(bar_rows) > graph_bottom
    tops = [r for r in bar_rows if r - 1 not in bar_rows]
    assert len(tops) == graph.pp
    bars = states | mask(image, ACTIVATIONS_FILL) | mask(image, PEAK_FILL)
    for top, stage in zip(tops, graph.stages):  # model states' share of each stage's bar, and bar lengths across stages
        assert states[top + 5].sum() / bars[top + 5].sum() == pytest.approx(
            stage.model_state_bytes / stage.memory_bytes, abs=0.02
        )
    lengths = [bars[top + 5].sum() for top in tops]
    assert lengths[0] / lengths[1] == pytest.approx(
        graph.stages[0].memory_bytes / graph.stages[1].memory_bytes, rel=0.03
    )

    # the timeline below: forward and backward boxes in proportion to the stages' forward and backward times
    forward, backward = mask(image, FORWARD_FILL), mask(image, BACKWARD_FILL)
    assert np.nonzero(forward)[0].min() > max(bar_rows) and np.nonzero(backward)[0].min() > max(bar_rows)
    share = forward.sum() / (forward.sum() + backward.sum())
    fwd_s, bwd_s = sum(s.fwd_s for s in graph.stages), sum(s.bwd_s for s in graph.stages)
    assert share == pytest.approx(fwd_s / (fwd_s + bwd_s), abs=0.06)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_rendered_dom_has_layers_stages_and_timeline(graphs, name, tmp_path):
    graph = graphs[name]
    page = tmp_path / "plan.html"
    page.write_text(render_html(graph), encoding="utf-8")
    dom = run_chromium(tmp_path, page, "--dump-dom").stdout
    elements = Elements()
    elements.feed(dom)
    layers = elements.having("layer")
    assert [(int(a["data-layer"]), int(a["data-stage"]), a["data-strategy"]) for a in layers] == [
        (n.index, n.stage, n.strategy_label) for n in graph.layers
    ]
    assert [int(a["data-stage"]) for a in elements.having("stage")] == list(range(graph.pp))
    for phase in ("forward", "backward"):
        boxes = {(int(a["data-stage"]), int(a["data-micro-batch"])) for a in elements.having("op", phase)}
        assert boxes == {(s, m) for s in range(graph.pp) for m in range(graph.chunks)}
    memory = elements.having("stage-memory")
    assert [int(a["data-over"]) for a in memory] == [
        int(s.memory_bytes > graph.memory_budget_bytes) for s in graph.stages
    ]
    assert sorted(int(a["data-over"]) for a in memory) == [0, 1]
    assert len(elements.having("redistribution")) == len(graph.redistributions) > 0
    assert len(elements.having("transfer")) == len(graph.transfers) == graph.pp - 1
    assert len(elements.having("collective")) == sum(len(n.collectives) for n in graph.layers)
    assert [a["data-strategy"] for a in elements.having("legend-item")] == [label for label, _ in graph.legend]
    assert len([a for t, a in elements.found if t == "tr" and "data-layer" in a]) == len(graph.layers)
    assert graph.pipeline.upper() in dom and "OVER BUDGET" in dom
