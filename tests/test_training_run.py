"""The pieces of a training run, in one process: the figures (FLOPs per token by hand, rates, MFU), their
sinks (JSON lines appended across runs, TensorBoard through its writer, the progress line), the models a
run can name (Hugging Face config.json of each built-in family), image folders, and the options refused
before any process group is joined."""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from galvatron_fx import cli
from galvatron_fx.data import ImageFolder, samples_for_model
from galvatron_fx.errors import ConfigError
from galvatron_fx.models import build_model
from galvatron_fx.training.figures import (
    ConsoleProgress,
    JsonLinesLog,
    StepFigures,
    StepTimer,
    TensorBoardLog,
    flops_per_token,
)
from galvatron_fx.training.sources import BatchRows, load_model, split_eval


def _figures(**changes) -> StepFigures:
    values = dict(
        step=3,
        total_steps=10,
        loss=2.5,
        lr=1e-3,
        grad_norm=0.75,
        samples_per_s=40.0,
        tokens_per_s=1280.0,
        mfu=0.0123,
        step_time_s=0.5,
        elapsed_s=1.5,
        peak_memory_bytes=[3 * 2**20, 5 * 2**20],
        memory_source="max_rss",
    )
    return StepFigures(**{**values, **changes})


def test_flops_per_token_is_6n_plus_attention():
    model, _ = build_model("gpt2")  # 4 layers, width 64
    params = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, num_layers=4, seq=24) == 6 * params + 12 * 4 * 64 * 24
    plain = torch.nn.Linear(3, 5)  # no config: the attention term is left out
    assert flops_per_token(plain, num_layers=1, seq=8) == 6 * (3 * 5 + 5)


def test_rates_and_mfu_follow_from_the_step_size(monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("galvatron_fx.training.figures.time.perf_counter", lambda: next(clock))
    timer = StepTimer(global_batch=8, tokens_per_sample=32, flops_per_token=1e6, peak_flops=1e12)
    step_time_s, samples_per_s, tokens_per_s, mfu = timer.lap(steps=4)  # 4 steps in 2 s
    assert (step_time_s, samples_per_s, tokens_per_s) == (0.5, 16.0, 512.0)
    assert mfu == pytest.approx(512.0 * 1e6 / 1e12)
    clock = iter([0.0, 1.0])
    images = StepTimer(global_batch=8, tokens_per_sample=None, flops_per_token=1e6, peak_flops=1e12)
    assert images.lap(steps=1)[2:] == (None, None)


def test_json_lines_log_appends_a_header_per_run(tmp_path):
    path = tmp_path / "logs" / "run.jsonl"
    for start in (0, 3):
        log = JsonLinesLog(path, {"start_step": start})
        log(_figures(step=start + 1, loss=float("nan") if start else 2.0))
        log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("run", {}).get("start_step") for r in records] == [0, None, 3, None]
    assert records[1]["loss"] == 2.0 and records[3]["loss"] == "nan"
    assert records[3]["peak_memory_bytes"] == [3 * 2**20, 5 * 2**20]


def test_tensorboard_scalars_through_its_writer(tmp_path):
    class Writer:
        def __init__(self):
            self.scalars, self.flushed, self.closed = [], 0, False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            self.flushed += 1

        def close(self):
            self.closed = True

    writer = Writer()
    sink = TensorBoardLog(tmp_path, writer=writer)
    sink(_figures(eval_loss=2.75, tokens_per_s=None, mfu=None))
    sink.close()
    tags = {tag: (value, step) for tag, value, step in writer.scalars}
    assert tags["train/loss"] == (2.5, 3) and tags["eval/loss"] == (2.75, 3)
    assert tags["train/peak_memory_gib"][0] == pytest.approx(5 / 1024)
    assert "train/tokens_per_s" not in tags and "train/mfu" not in tags  # images: no token figures
    assert writer.flushed == 1 and writer.closed
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            TensorBoardLog(tmp_path)


def test_progress_line_shows_every_figure_and_the_time_left():
    stream = io.StringIO()
    ConsoleProgress(stream)(_figures(eval_loss=2.75))
    line = stream.getvalue()
    for text in ("step  3/10", "loss 2.5000", "eval 2.7500", "lr 1.00e-03", "gnorm 0.750", "40.0 samples/s"):
        assert text in line, (text, line)
    assert "1,280 tok/s" in line and "MFU 1.23%" in line and "mem 5.00 MiB" in line
    assert "0:01 < ETA 0:03" in line  # 7 steps left at 0.5 s


@pytest.mark.parametrize(
    "family,expected", [("gpt2", "GPT2LMHeadModel"), ("bert", "BertForMaskedLM"), ("t5", "T5ForConditionalGeneration")]
)
def test_a_config_json_of_each_family_builds_its_model(tmp_path, family, expected):
    model, _ = build_model(family)
    model.config.save_pretrained(tmp_path)
    run_model = load_model(str(tmp_path / "config.json"), "small", global_batch=4, seq=12)
    assert type(run_model.model).__name__ == expected
    assert sum(p.numel() for p in run_model.model.parameters()) == sum(p.numel() for p in model.parameters())
    output = run_model.model(**run_model.example)
    assert torch.isfinite(output.loss)


def test_synthetic_rows_and_held_out_samples():
    rows = BatchRows([{"x": torch.arange(4), "flag": False}, {"x": torch.arange(4, 8), "flag": False}])
    assert len(rows) == 8 and rows[5] == {"x": torch.tensor(5)}
    train, held_out = split_eval(rows, 4, global_batch=4)
    assert list(train.indices) == [0, 1, 2, 3] and list(held_out.indices) == [4, 5, 6, 7]
    assert split_eval(rows, 0, 4) == (rows, None)
    with pytest.raises(ConfigError, match="multiple of the global batch"):
        split_eval(rows, 3, 4)


def _ppm(path, pixels: np.ndarray) -> None:
    height, width, channels = pixels.shape
    magic = b"P6" if channels == 3 else b"P5"
    path.write_bytes(magic + b"\n# a comment\n%d %d\n255\n" % (width, height) + pixels.tobytes())


def test_image_folders_read_classes_and_scale(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    red = np.zeros((5, 7, 3), np.uint8)
    red[..., 0] = 255
    _ppm(tmp_path / "cat" / "a.ppm", red)
    _ppm(tmp_path / "cat" / "b.pgm", rng.integers(0, 256, (8, 8, 1), dtype=np.uint8))
    np.save(tmp_path / "dog" / "c.npy", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path, image_size=32)
    assert folder.classes == ["cat", "dog"] and len(folder) == 3
    first = folder[0]
    assert first["pixel_values"].shape == (3, 32, 32) and int(first["labels"]) == 0
    assert torch.allclose(first["pixel_values"][0], torch.ones(32, 32))  # red, scaled to [-1, 1]
    assert torch.allclose(first["pixel_values"][1], -torch.ones(32, 32))
    assert folder[1]["pixel_values"].shape == (3, 32, 32) and int(folder[2]["labels"]) == 1
    model, _ = build_model("vit")
    batch = torch.utils.data.default_collate([s for s in samples_for_model(model, str(tmp_path), seq=0)])
    assert torch.isfinite(model(**batch).loss)
    if importlib.util.find_spec("PIL") is None:
        (tmp_path / "dog" / "d.png").write_bytes(b"\x89PNG")
        with pytest.raises(ConfigError, match="pip install pillow"):
            ImageFolder(tmp_path, image_size=32)[3]


@pytest.mark.parametrize(
    "options,message",
    [
        (["--plan", "plan.json", "--pp", "2"], "both state the plan"),
        (["--resume", "auto"], "add --save DIR"),
        (["--steps", "0"], "--steps 0 is not positive"),
    ],
)
def test_contradictory_options_are_refused_before_any_process_group(options, message, capsys):
    assert cli.main(["train", "gpt2", *options]) == 2
    assert message in capsys.readouterr().err
