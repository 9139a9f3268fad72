"""bf16 mixed precision (autocast; fp32 parameters and gradients) trains close to fp32 eager, across a
pipeline cut and with sharded layers. On CPU here; the same path runs on CUDA."""

from distributed import STEPS, bf16_worker, eager_reference

from galvatron_fx.runtime import spawn


def test_bf16_autocast_trains_close_to_fp32():
    reference, _ = eager_reference("gpt2")
    for recipe in ("pp2_1f1b", "zero2_2"):
        results = spawn(bf16_worker, 2, recipe)
        for result in results:
            assert len(result["losses"]) == STEPS
            assert result["dtypes"] == ["torch.float32"]
            worst = max(abs(a - b) for a, b in zip(result["losses"], reference))
            assert worst < 2e-2, (recipe, result["losses"], reference)
            assert worst > 1e-5, "no bf16 rounding visible: autocast did not run"
        assert results[0]["losses"] == results[1]["losses"]
