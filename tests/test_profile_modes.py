"""Profile modes as Galvatron has them: static (one batch size, one sequence length), batch (several batch
sizes: time linear in the batch) and sequence (several lengths: time linear in the tokens plus attention's
quadratic term, memory fitted per figure). A sequence profile prices other lengths, with a warning outside
the profiled range; the other modes refuse them. Galvatron's sequence-mode files import too."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from galvatron_fx.capture import capture
from galvatron_fx.cli import main
from galvatron_fx.cluster import Cluster
from galvatron_fx.compile import build_cost_model
from galvatron_fx.cost.galvatron_import import load_hardware, load_model
from galvatron_fx.cost.layer_profiler import fit_profile, measure_layers
from galvatron_fx.cost.layer_type_profile import SEQ_FIELDS
from galvatron_fx.cost.model import CostModel
from galvatron_fx.cost.model_profile import ModelProfile, SequenceRangeWarning, analytic_sequence_profile
from galvatron_fx.cost.profile_checks import check_model_profile
from galvatron_fx.cost.time_formula import eval_seq_terms, fit_seq_terms, fit_time_formula, resolve_profile_mode
from galvatron_fx.errors import ConfigError, ProfileError
from galvatron_fx.models import _causal_batch, _transformers

FIXTURE = Path(__file__).parent / "fixtures" / "galvatron-llama2-7b"
MiB = 2**20


# -- fits on synthetic points: exact, deterministic -----------------------------------------------------
def test_time_fits_recover_known_coefficients():
    static = fit_time_formula([(4, 64, 8e-3)], "static")
    assert static.terms == ((1, 0, pytest.approx(2e-3)),)

    batch = fit_time_formula([(b, 64, 1e-3 + 2e-3 * b) for b in (2, 4, 8)], "batch")
    assert batch(16, 64) == pytest.approx(1e-3 + 2e-3 * 16) and batch(16, 999) == batch(16, 64)

    def truth(b, s):  # overhead, projections and MLP (b·s), attention's scores and values (b·s²)
        return 1e-3 + 3e-6 * b * s + 2e-8 * b * s * s

    three = fit_time_formula([(4, s, truth(4, s)) for s in (32, 64, 96)], "sequence")
    assert three(4, 256) == pytest.approx(truth(4, 256), rel=1e-6) and three(8, 256) == pytest.approx(truth(8, 256))
    two_by_two = fit_time_formula([(b, s, truth(b, s)) for b in (2, 8) for s in (32, 64)], "sequence")
    assert two_by_two(4, 256) == pytest.approx(truth(4, 256), rel=1e-6)

    # two lengths at one batch: the FLOPs per sample (3e-6·s + 2e-8·s², up to a factor) fix the shape
    shape = ((1, 3e6), (2, 2e4))
    two = fit_time_formula([(4, s, truth(4, s)) for s in (32, 64)], "sequence", seq_shape=shape)
    assert two(4, 512) == pytest.approx(truth(4, 512), rel=1e-6)
    assert {(i, j) for i, j, _ in two.terms} == {(0, 0), (1, 1), (1, 2)}
    # without a shape: overhead and a linear term
    plain = fit_time_formula([(4, s, 1e-3 + 3e-6 * 4 * s) for s in (32, 64)], "sequence")
    assert plain(4, 128) == pytest.approx(1e-3 + 3e-6 * 4 * 128)
    # a point below the overhead line does not give a negative term
    assert all(c >= 0 for *_, c in fit_time_formula([(4, 32, 2e-3), (4, 64, 1.5e-3)], "sequence").terms)


def test_memory_fits_take_the_shape_the_points_show():
    linear = fit_seq_terms([(32, 32 * 1000), (64, 64 * 1000)])
    assert linear == ((1, pytest.approx(1000.0)),)
    scores = fit_seq_terms([(s, 1000 * s + 48 * s * s) for s in (32, 64)])  # materialised s × s scores
    assert eval_seq_terms(scores, 128) == pytest.approx(1000 * 128 + 48 * 128 * 128)
    pooled = fit_seq_terms([(s, 5000 + 100 * s) for s in (32, 64)])  # a per-sample part that does not scale
    assert eval_seq_terms(pooled, 256) == pytest.approx(5000 + 100 * 256)
    three = fit_seq_terms([(s, 7 + 3 * s + 2 * s * s) for s in (16, 32, 64)])
    assert eval_seq_terms(three, 200) == pytest.approx(7 + 3 * 200 + 2 * 200 * 200)
    assert fit_seq_terms([(2048, 4096)]) == ((1, 2.0),) and fit_seq_terms([(32, 0), (64, 0)]) == ()


def test_profile_mode_follows_the_lists_or_is_refused():
    assert resolve_profile_mode(None, [4], [64]) == "static"
    assert resolve_profile_mode(None, [2, 4, 8], [64]) == "batch"
    assert resolve_profile_mode(None, [4], [32, 64]) == "sequence"
    for mode, batches, seqs in (("static", [2, 4], [64]), ("batch", [4], [64]), ("sequence", [2, 4], [64])):
        with pytest.raises(ConfigError, match=f"profile mode {mode} measures"):
            resolve_profile_mode(mode, batches, seqs)
    with pytest.raises(ConfigError, match="unknown"):
        resolve_profile_mode("tokens", [4], [64])


# -- memory against the graph's exact saved-activation bytes ------------------------------------------------
def _llama(hidden: int, attention: str = "sdpa"):
    """A two-layer LLaMA of ``hidden`` width (heads of 64), ``attention`` "sdpa" or "eager" (materialises the
    s × s scores)."""
    T = _transformers()

    def build(batch: int, seq: int):
        torch.manual_seed(0)
        config = T.LlamaConfig(
            vocab_size=256,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            intermediate_size=hidden * 8 // 3,
            max_position_embeddings=512,
            attention_dropout=0.0,
            attn_implementation=attention,
        )
        model = T.LlamaForCausalLM(config)
        return model, _causal_batch(model, batch, seq)

    return build


def _capture(build, batch: int, seq: int):
    model, kwargs = build(batch, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture(model, example_kwargs=kwargs)


def _graph_profiles(build, seqs) -> dict[int, ModelProfile]:
    """The model profiled from its graph (memory and FLOPs) at each of ``seqs``, batch 2."""
    return {seq: ModelProfile.from_program(_capture(build, 2, seq), flops_per_s=1.0) for seq in seqs}


def _sequence_profile(by_seq: dict[int, ModelProfile]) -> ModelProfile:
    """The sequence-mode profile of graph profiles at several lengths (memory figures only)."""
    profile = copy.deepcopy(by_seq[max(by_seq)])
    profile.record_seq_figures(by_seq)
    profile.profile_mode, profile.profiled_seqs = "sequence", sorted(by_seq)
    return profile


@pytest.fixture(scope="module")
def sdpa_graphs() -> dict[int, ModelProfile]:
    return _graph_profiles(_llama(128), (32, 48, 64, 128))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sequence_memory_fit_matches_the_graph_at_other_lengths(attention, sdpa_graphs):
    """Saved activations, their TP split, checkpointed inputs, boundaries, the backward's working set and the
    pipeline cut bytes at 32 and 64 predict those the graph counts at 48 and 128 (exact counts: the fit is
    exact, linear for SDPA and with an s² term where eager attention keeps its scores)."""
    graphs = sdpa_graphs if attention == "sdpa" else _graph_profiles(_llama(128, attention), (32, 64, 128))
    profile = _sequence_profile({32: graphs[32], 64: graphs[64]})
    for seq in sorted(set(graphs) - {32, 64}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SequenceRangeWarning)
            predicted, exact = profile.at_seq(seq), graphs[seq]
        assert predicted.seq_length == seq
        assert predicted.cut_bytes_per_sample == pytest.approx(exact.cut_bytes_per_sample, abs=2)
        for name, part in predicted.parts().items():
            for field in SEQ_FIELDS:
                if "flops" in field:
                    continue  # the graph's FLOPs leave out the CPU attention kernel's (profiled times do not)
                ours, theirs = getattr(part, field), getattr(exact.parts()[name], field)
                expected = pytest.approx(theirs, rel=1e-4, abs=2) if theirs is not None else None
                assert ours == expected, (attention, seq, name, field)
    block = profile.types[profile.layer_types[0]]
    points = [(s, figures["activation_bytes_per_sample"][1]) for s, figures in block.by_seq.items()]
    assert any(j == 2 for j, _ in fit_seq_terms(points)) == (attention == "eager")


def test_sequence_profiles_are_accepted_at_other_lengths_and_warn_outside_their_range(tmp_path, sdpa_graphs):
    profile = _sequence_profile({32: sdpa_graphs[32], 64: sdpa_graphs[64]})
    path = tmp_path / "sequence.json"
    profile.save(path)
    loaded = ModelProfile.load(path)
    data = json.loads(path.read_text())
    assert data["profile_mode"] == "sequence" and data["profiled"]["seqs"] == [32, 64]
    assert sorted(data["types"][profile.layer_types[0]]["by_seq"]) == ["32", "64"]
    assert loaded.at_seq(48).to_json_dict() == profile.at_seq(48).to_json_dict()
    hardware = Cluster.preset("A100-80GB", 1, 2).hardware_profile()
    check_model_profile(loaded, seq=48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the range: no warning
        assert CostModel(loaded, hardware, seq=48).seq == 48
    with pytest.warns(SequenceRangeWarning, match=r"32\.\.64.*sequence length 128"):
        assert CostModel(loaded, hardware, seq=128).model.seq_length == 128

    # a batch-mode profile (one length) is refused at another, naming the file and the key
    batch_path = tmp_path / "batch.json"
    sdpa_graphs[64].save(batch_path)
    batch = ModelProfile.load(batch_path)
    assert batch.profile_mode == "batch"
    for refuse in (lambda: check_model_profile(batch, seq=32), lambda: CostModel(batch, hardware, seq=32)):
        with pytest.raises(ProfileError) as error:
            refuse()
        assert str(batch_path) in str(error.value) and "key seq_length is 64" in str(error.value)
    # older files without the key are batch profiles, and are written back without it
    data = json.loads(batch_path.read_text())
    del data["profile_mode"], data["profiled"]
    batch_path.write_text(json.dumps(data))
    older = ModelProfile.load(batch_path)
    assert older.profile_mode == "batch" and "profile_mode" not in older.to_json_dict()


def test_analytic_sequence_profile_prices_the_flops_at_each_length(sdpa_graphs):
    """profile-model --mode analytic --profile-mode sequence: FLOPs ÷ throughput fitted against the length."""
    flops_per_s = 1e12
    analytic = analytic_sequence_profile({32: sdpa_graphs[32], 64: sdpa_graphs[64]}, flops_per_s)
    name = analytic.layer_types[0]
    assert analytic.profile_mode == "sequence" and analytic.profiled_seqs == [32, 64]
    for seq in (48, 128):
        expected = sdpa_graphs[seq].types[name].fwd_flops_per_sample * 2 / flops_per_s
        assert analytic.types[name].fwd(2, seq) == pytest.approx(expected, rel=1e-6)


def test_build_cost_model_prices_the_programs_length_from_a_sequence_profile(tmp_path, sdpa_graphs):
    profile = _sequence_profile({32: sdpa_graphs[32], 64: sdpa_graphs[64]})
    profile.mode, profile.device = "measured", "cpu"
    path = tmp_path / "profile.json"
    profile.save(path)
    cluster = Cluster.detect({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    program = _capture(_llama(128), 2, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SequenceRangeWarning)
        cost_model = build_cost_model(program, cluster, str(path), "fp32")
    assert cost_model.seq == 48 and cost_model.model.seq_length == 48
    block = cost_model.model.types[profile.layer_types[0]]
    assert block.activation_bytes_per_sample == pytest.approx(
        sdpa_graphs[48].types[profile.layer_types[0]].activation_bytes_per_sample, abs=2
    )


# -- Galvatron's sequence-mode files --------------------------------------------------------------------
def _galvatron_sequence_folder(folder: Path) -> dict:
    """Galvatron's files for a sequence-mode profile (its documented keys), from known figures: per-sample
    forward ms of a layer a·s² + b·s + c at 256..2048 step 256 (``layertype_0_bsz1_seq{s}``), of the
    embedding and head b·s + c; memory at the powers of two 256..2048 (``layertype_0_sp/{s}``,
    ``other_memory_pp_on_{first,last}_sp/{s}``, ``other_memory_pp_off_sp/{s}``), linear in the length.
    Hardware files are the fixture's."""
    folder.mkdir()
    for name in ("allreduce_bandwidth_1nodes_8gpus_per_node.json", "p2p_bandwidth_1nodes_8gpus_per_node.json"):
        shutil.copy(FIXTURE / name, folder / name)
    shutil.copy(FIXTURE / "overlap_coefficient.json", folder)
    shutil.copy(FIXTURE / "llama2-7b.yaml", folder / "tiny.yaml")
    truth = {"a": 2e-7, "b": 1.5e-3, "c": 0.4, "other_b": 1e-3, "other_c": 0.5}
    compute = {}
    for s in range(256, 2049, 256):
        compute[f"layertype_0_bsz1_seq{s}"] = truth["a"] * s * s + truth["b"] * s + truth["c"]
        compute[f"layertype_other_bsz1_seq{s}"] = truth["other_b"] * s + truth["other_c"]
    (folder / "computation_profiling_bf16_tiny_all.json").write_text(json.dumps(compute))
    memory = {"layertype_0_sp": {}, **{f"other_memory_pp_{k}_sp": {} for k in ("off", "on_first", "on_last")}}
    for s in (256, 512, 1024, 2048):
        act = s / 2048 * 400.0  # MB per sample at tp 1
        per_tp = {"1": act, "2": act / 2, "4": act / 4, "8": act / 8, "checkpoint": s / 2048 * 16.0}
        memory["layertype_0_sp"][str(s)] = {"parameter_size": 770.0, "tp_activation_per_bsz_dict": per_tp}
        for key in ("off", "on_first", "on_last"):
            memory[f"other_memory_pp_{key}_sp"][str(s)] = {
                "model_states": {"1": 4000.0, "2": 2000.0, "4": 1000.0, "8": 500.0},
                "activation": {
                    "1": s / 2048 * 300.0,
                    "2": s / 2048 * 150.0,
                    "4": s / 2048 * 75.0,
                    "8": s / 2048 * 37.5,
                },
            }
    (folder / "memory_profiling_bf16_tiny_all.json").write_text(json.dumps(memory))
    return truth


def test_galvatron_sequence_mode_files_import_and_price_other_lengths(tmp_path):
    folder = tmp_path / "galvatron"
    truth = _galvatron_sequence_folder(folder)
    profile = load_model(folder)
    assert profile.profile_mode == "sequence" and profile.seq_length == 2048
    assert profile.profiled_seqs == list(range(256, 2049, 256)) and profile.profiled_batches == [1]
    layer, head = profile.types["0"], profile.epilogue
    for s in (300, 1536):  # per-sample forward ms fitted as Galvatron's search fits it
        assert layer.fwd(1, s) * 1e3 == pytest.approx(truth["a"] * s * s + truth["b"] * s + truth["c"], rel=1e-6)
        assert layer.bwd(4, s) == pytest.approx(2 * 4 * layer.fwd(1, s))
        assert head.fwd(1, s) * 1e3 == pytest.approx(truth["other_b"] * s + truth["other_c"], rel=1e-6)
    at = profile.at_seq(1536)
    assert at.types["0"].activation_bytes_per_sample[1] == pytest.approx(1536 / 2048 * 400 * MiB, abs=2)
    assert at.types["0"].ckpt_activation_bytes_per_sample == pytest.approx(1536 / 2048 * 16 * MiB, abs=2)
    assert at.epilogue.activation_bytes_per_sample[2] == pytest.approx(1536 / 2048 * 150 * MiB, abs=2)
    assert at.cut_bytes_per_sample[0] == 1536 * 4096 * 2  # hidden 4096, bf16
    hardware = load_hardware(folder, memory_bytes="36GB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SequenceRangeWarning)
        assert CostModel(profile, hardware, mixed_precision="bf16", seq=1024).seq == 1024
    with pytest.warns(SequenceRangeWarning, match=r"256\.\.2048.*sequence length 4096"):
        CostModel(profile, hardware, mixed_precision="bf16", seq=4096)

    # the fixture's files hold one length and twelve batch sizes: a batch profile, refused at another length
    fixture = load_model(FIXTURE)
    assert fixture.profile_mode == "batch" and fixture.profiled_batches == list(range(1, 13))
    with pytest.raises(ProfileError) as error:
        CostModel(fixture, load_hardware(FIXTURE), mixed_precision="bf16", seq=1024)
    assert "computation_profiling_bf16_llama2-7b_all.json" in str(error.value) and "key seq_length is 2048" in str(
        error.value
    )


# -- the command line ---------------------------------------------------------------------------------------
def test_profile_model_command_records_the_mode_and_the_points(tmp_path, capsys):
    out = tmp_path / "static.json"
    argv = ["profile-model", "gpt2", "--repeats", "1", "--no-progress", "--out", str(out)]
    assert main([*argv, "--profile-mode", "static", "--batches", "2", "--seqs", "16"]) == 0
    printed = capsys.readouterr().out
    assert "profile mode static: batches 2 at sequence length 16" in printed and "refuses other lengths" in printed
    data = json.loads(out.read_text())
    assert data["profile_mode"] == "static" and data["profiled"] == {"batches": [2], "seqs": [16]}
    points = data["extra"]["measurements"][data["layer_types"][0]]["fwd"]
    assert [p[:2] for p in points] == [[2, 16]]

    assert main([*argv, "--profile-mode", "batch", "--batches", "2", "--seqs", "16,32"]) == 2
    assert "profile mode batch measures two or more micro-batch sizes" in capsys.readouterr().err

    out = tmp_path / "sequence.json"
    argv[-1] = str(out)
    assert main([*argv, "--profile-mode", "sequence", "--batches", "2", "--seqs", "16,32"]) == 0
    assert "profile mode sequence: batches 2 at sequence lengths 16,32" in capsys.readouterr().out
    profile = ModelProfile.load(out)
    assert profile.profile_mode == "sequence" and profile.seq_range() == (16, 32) and profile.seq_length == 32
    assert sorted(profile.types[profile.layer_types[0]].by_seq) == [16, 32]
    assert sorted(profile.cut_bytes_by_seq) == [16, 32]


# -- the acceptance figure: measured times at 32 and 64 predict 128 ------------------------------------------
def test_sequence_profile_predicts_a_longer_sequence():
    """A LLaMA layer of width 256 (about 8 ms forward and backward at 4 × 32 tokens on one core), profiled at
    sequence lengths 32 and 64, predicts its forward + backward time at 128 within 15 % of the time measured
    there, and its activation memory exactly. The three lengths are timed in the same interleaved rounds, so
    that the machine's drift touches them alike; each is the least of its 21 rounds, which other processes on
    the machine's shared cores only ever lengthen (their medians wander by tens of percent under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measured = measure_layers(
                _llama(256), [(4, 32), (4, 64), (4, 128)], warmup=2, repeats=21, progress=False, clock="thread"
            )
    finally:
        torch.set_num_threads(threads)
    profile = fit_profile(measured, "sequence", seqs=(32, 64))
    assert profile.profile_mode == "sequence" and profile.profiled_seqs == [32, 64]
    with pytest.warns(SequenceRangeWarning):
        at_128 = profile.at_seq(128)
    errors = {}
    for layer_type in profile.types:
        fwd = {s: t for _, s, t in measured.samples[layer_type]["fwd"]}
        bwd = {s: t for _, s, t in measured.samples[layer_type]["bwd"]}
        predicted = at_128.types[layer_type].fwd(4, 128) + at_128.types[layer_type].bwd(4, 128)
        errors[layer_type] = predicted / (fwd[128] + bwd[128]) - 1
    assert all(abs(e) < 0.15 for e in errors.values()), errors
    exact = measured.graph_profiles[128]
    for name, part in at_128.parts().items():
        ours, theirs = part.activation_bytes_per_sample, exact.parts()[name].activation_bytes_per_sample
        assert all(ours[tp] == pytest.approx(theirs[tp], rel=0.15, abs=2) for tp in theirs), name
