"""The benchmark script runs both variants on the same batches and reports positive rates (not a timing test)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_runs_both_variants_on_the_toy_model(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    rows = train_step.main(["--model", "toy", "--batch", "2", "--steps", "1", "--warmup", "0", "--repeats", "2",
                            "--also", "channels_last;batched;lightning", "--sampling-steps", "2"])
    assert [r["variant"] for r in rows] == ["reference", "ours", "ours [channels_last]", "ours [batched]", "ours [lightning]"]
    assert all(0 < r["min"] <= r["median"] <= r["max"] for r in rows)
    # FLOPs per step: the reference also encodes images and prompts; the batched forward also runs the
    # backward over the reference half; channels_last changes layout, not work
    reference, ours, channels_last, batched, lightning = (r["gflop_step"] for r in rows)
    assert ours < reference and batched > ours and channels_last == pytest.approx(ours) == lightning
    out = capsys.readouterr().out
    assert "| reference |" in out and "x reference" in out and "| ddim |" in out and "| dpm |" in out


def test_ours_and_reference_compute_the_same_dpo_loss_on_the_same_latents():
    """The two variants differ in where latents come from, not in the loss: fed the same noisy latents,
    policy and reference UNets give ours' loss (checks the rebuilt recipe is honest)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    from alignment.base import PairErrors

    components = train_step.components_for("toy", ROOT)
    ours = train_step.Ours(components, torch.device("cpu"), 5000.0, set())
    ref = train_step.Reference(components, torch.device("cpu"), 5000.0)
    ref.policy.load_state_dict(ours.module.unet.state_dict(), strict=False)
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t, cond = torch.tensor([10, 500]).repeat(2), torch.randn(4, 77, components.text_encoder.config.hidden_size, generator=g)
    noisy = components.noise_scheduler.add_noise(z, eps, t)
    with torch.no_grad():
        m = ours.module
        policy = m._per_sample_mse(m._predict(m.unet, noisy, t, cond), eps)
        with ours.module.reference() as unet:
            reference = m._per_sample_mse(m._predict(unet, noisy, t, cond), eps)
        theirs_policy = (ref.policy(noisy, t, encoder_hidden_states=cond).sample - eps).pow(2).mean(dim=(1, 2, 3))
        theirs_ref = (ref.ref(noisy, t, encoder_hidden_states=cond).sample - eps).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(policy, theirs_policy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reference, theirs_ref, rtol=1e-4, atol=1e-6)
    ours_loss = ours.module.objective(PairErrors(policy[:2], policy[2:], reference[:2], reference[2:])).loss
    torch.testing.assert_close(ours_loss, train_step.recipe_dpo_loss(theirs_policy, theirs_ref, 5000.0), rtol=1e-4, atol=1e-6)


def test_an_unknown_option_is_refused_by_name(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    with pytest.raises(SystemExit):
        train_step.main(["--model", "toy", "--also", "bf16,cudnn_attn"])
    assert "unknown option(s) ['cudnn_attn']" in capsys.readouterr().err


@pytest.mark.slow
def test_train_step_benchmark_runs_the_sdxl_path_on_a_tiny_sdxl(capsys):
    """sdxl-tiny: the sdxl-arch code path (the reference encodes with both text encoders every step, both variants
    pass the pooled embedding and time ids) on a tiny random SDXL."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    rows = train_step.main(["--model", "sdxl-tiny", "--batch", "1", "--steps", "1", "--warmup", "0", "--repeats", "1",
                            "--sampling-steps", "0"])
    assert [r["variant"] for r in rows] == ["reference", "ours"]
    assert all(r["median"] > 0 for r in rows) and rows[1]["gflop_step"] < rows[0]["gflop_step"]
    assert "model sdxl-tiny" in capsys.readouterr().out


def test_sdxl_arch_has_the_published_sdxl_base_unet():
    """The benchmark's sdxl-arch UNet config is SDXL base 1.0's: 2,567,463,684 parameters (built on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    from models.builders import SDXL_PROJECTION, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET

    cross = SDXL_TEXT["hidden_size"] + SDXL_TEXT_2["hidden_size"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET, cross_attention_dim=cross,
                                    projection_class_embeddings_input_dim=6 * SDXL_UNET["addition_time_embed_dim"] + SDXL_PROJECTION)
    assert cross == 2048 and sum(p.numel() for p in unet.parameters()) == 2_567_463_684


@pytest.mark.slow
def test_train_step_benchmark_runs_the_flow_path_on_a_tiny_sd3(capsys):
    """sd3-tiny: the sd3-arch code path (the reference VAE-encodes with SD 3's shift and scale and encodes with
    both CLIPs and T5 every step; both variants draw noise levels and regress velocities) on a tiny random SD 3;
    its sampling table uses the flow-matching Euler scheduler."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    rows = train_step.main(["--model", "sd3-tiny", "--batch", "1", "--steps", "1", "--warmup", "0", "--repeats", "1",
                            "--sampling-steps", "2"])
    assert [r["variant"] for r in rows] == ["reference", "ours"]
    assert all(r["median"] > 0 for r in rows) and rows[1]["gflop_step"] < rows[0]["gflop_step"]
    out = capsys.readouterr().out
    assert "model sd3-tiny" in out and "| euler |" in out


def test_a_failing_variant_becomes_a_row_and_the_others_still_run(capsys, monkeypatch):
    """On a GPU one variant may run out of memory or refuse a compile mode; the table names it and goes on."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    real_init = train_step.Ours.__init__

    def init(self, components, device, beta, options):
        if "channels_last" in options:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        real_init(self, components, device, beta, options)

    monkeypatch.setattr(train_step.Ours, "__init__", init)
    # the loop is under test, not the timing: each variant that builds gets a row without running steps
    monkeypatch.setattr(train_step, "measure", lambda name, runner, *args: {
        "variant": name, "median": 1.0, "min": 1.0, "max": 1.0, "gflop_step": 1.0, "tflops": 1.0})
    rows = train_step.main(["--model", "toy", "--batch", "1", "--steps", "1", "--warmup", "0", "--repeats", "1",
                            "--also", "channels_last;bf16", "--sampling-steps", "0"])
    assert [r["variant"] for r in rows] == ["reference", "ours", "ours [channels_last]", "ours [bf16]"]
    assert rows[2]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[3]["median"] > 0
    assert "| ours [channels_last] | failed: RuntimeError: CUDA out of memory" in capsys.readouterr().out


def test_error_scale_reports_both_toy_families(capsys):
    """The toy flow model's velocity errors are several times the toy UNet's epsilon errors (0.67 vs 0.09 on
    average), the reason its dpo beta is smaller (docs/methods/flow-matching.md)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import error_scale

    sd, flow = error_scale.main(["--pairs", "4", "--draws", "2"])
    assert 0 < sd["mean_error"] < flow["mean_error"] and 0 < sd["spread"] < flow["spread"]
    assert "| flow |" in capsys.readouterr().out
