"""The flow-matching families (models/families/flow.py, sd3.py): noise levels, interpolation and velocity
targets by hand; the prompt encoding against StableDiffusion3Pipeline's own; the LoRA export read back by
StableDiffusion3Pipeline.load_lora_weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.dpo import DPO
from models.alignment_module import AlignmentModule
from models.families.sd3 import SD3_FAMILY

WORDS = ["a", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def sd3_components(tmp_path_factory):
    from models.builders import build_sd3_components

    return build_sd3_components(tmp_path_factory.mktemp("sd3") / "build", words=WORDS)


def sd3_batch(components, pairs: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels, size = components.unet.config.in_channels, components.unet.config.sample_size
    with torch.no_grad():
        encoded = SD3_FAMILY.encode_prompts(components, ["a red circle", "a blue square", "a red square"][:pairs],
                                            torch.device("cpu"))
    return {"latents_w": torch.randn(pairs, channels, size, size, generator=g),
            "latents_l": torch.randn(pairs, channels, size, size, generator=g), **encoded}


@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_flow_matching_errors_and_dpo_loss_by_hand(sd3_components, weighting):
    """One batch: logit-normal u, the scheduler's shift, x_s = (1 - s) x_0 + s eps shared by winner and loser,
    velocity eps - x_0, the transformer at s x 1000, errors against the adapter-free reference, dpo's loss."""
    import copy

    c = sd3_components
    sampling = {"density": "logit_normal", "logit_mean": 0.3, "logit_std": 0.8, "weighting": weighting}
    module = AlignmentModule(copy.deepcopy(c.unet), c.noise_scheduler, DPO(beta=50.0), lora={"rank": 4, "alpha": 4},
                             family=SD3_FAMILY, noise_sampling=sampling)
    g = torch.Generator().manual_seed(0)
    for _, p in module.unet.named_parameters():
        if p.requires_grad:
            p.data = 0.05 * torch.randn(p.shape, generator=g)
    batch = sd3_batch(c)
    out = module.compute(batch, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(torch.normal(0.3, 0.8, size=(3,), generator=g))  # diffusers' logit-normal density
    u = u.clamp(1 / 1000, 1.0)  # t_min = 0, t_max = 999: [0, 1)
    s = 3.0 * u / (1 + 2.0 * u)  # the scheduler's shift 3
    eps = torch.randn(batch["latents_w"].shape, generator=g)
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    s2, eps2 = s.repeat(2).view(-1, 1, 1, 1), eps.repeat(2, 1, 1, 1)
    x_s, v = (1 - s2) * x0 + s2 * eps2, eps2 - x0
    cond = dict(encoder_hidden_states=batch["prompt_embeds"].repeat(2, 1, 1),
                pooled_projections=batch["pooled_prompt_embeds"].repeat(2, 1))
    with torch.no_grad():
        pred = module.unet(hidden_states=x_s, timestep=s.repeat(2) * 1000, **cond).sample
        module.unet.disable_adapters()
        ref = module.unet(hidden_states=x_s, timestep=s.repeat(2) * 1000, **cond).sample
        module.unet.enable_adapters()
    weight = 2 / (math.pi * (1 - 2 * s + 2 * s**2)) if weighting == "cosmap" else torch.ones(3)
    e = (pred - v).pow(2).mean(dim=(1, 2, 3)) * weight.repeat(2)
    r = (ref - v).pow(2).mean(dim=(1, 2, 3)) * weight.repeat(2)
    h = -(50.0 / 2) * ((e[:3] - r[:3]) - (e[3:] - r[3:]))
    torch.testing.assert_close(out.loss.detach(), -F.logsigmoid(h).mean(), rtol=1e-5, atol=1e-6)
    assert (e - r).abs().max() > 1e-6  # the adapters matter, so the margin is not trivially zero


def test_noise_levels_follow_density_range_and_shift(sd3_components):
    scheduler = sd3_components.noise_scheduler
    shape = torch.Size([20000, 4, 8, 8])
    uniform = SD3_FAMILY.draw_timesteps(scheduler, shape, 0, 999, {"density": "uniform"}, torch.Generator().manual_seed(0))
    assert uniform.dtype == torch.float32 and 0 < uniform.min() and uniform.max() <= 1
    # shift 3 moves mass to high noise: the median of a shifted uniform is 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert uniform.median().item() == pytest.approx(0.75, abs=0.01)
    low = SD3_FAMILY.draw_timesteps(scheduler, shape, 0, 499, {"density": "uniform"}, torch.Generator().manual_seed(0))
    assert low.max().item() <= 3 * 0.5 / (1 + 2 * 0.5) + 1e-6  # t_max = 499: u < 0.5 before the shift
    with pytest.raises(Exception, match="model.noise_sampling.density: expected one of uniform, logit_normal, mode"):
        SD3_FAMILY.check_noise_sampling({"density": "beta"})


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_prompt_encoding_is_the_pipelines(sd3_components, t5):
    import dataclasses

    c = sd3_components if t5 else dataclasses.replace(sd3_components, text_encoder_3=None)
    prompts = ["a red circle", "", "a blue square and a red circle"]
    with torch.no_grad():
        ours = SD3_FAMILY.encode_prompts(c, prompts, torch.device("cpu"))
        embeds, _, pooled, _ = c.pipeline().encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                          max_sequence_length=c.tokenizer_3.model_max_length)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert ours["prompt_embeds"].shape == (3, 77 + c.tokenizer_3.model_max_length, c.unet.config.joint_attention_dim)
    if not t5:
        assert ours["prompt_embeds"][:, 77:].abs().max() == 0


# ------------------------------------------------------------------------------------------------------ FLUX
@pytest.fixture(scope="module")
def flux_components(tmp_path_factory):
    from models.builders import build_flux_components

    return build_flux_components(tmp_path_factory.mktemp("flux") / "build", words=WORDS)


def test_flux_encoding_prediction_and_shift_are_the_pipelines(flux_components):
    """Prompts as FluxPipeline.encode_prompt encodes them; the prediction is the transformer on the packed latents
    with the pipeline's position ids and guidance, unpacked; the noise-level shift is the scheduler's own."""
    from diffusers import FluxPipeline

    from models.families.flux import FLUX_FAMILY

    c = flux_components
    prompts = ["a red circle", "", "a blue square"]
    pipe = c.pipeline()
    with torch.no_grad():
        ours = FLUX_FAMILY.encode_prompts(c, prompts, torch.device("cpu"))
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=c.tokenizer_2.model_max_length)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        ours = FLUX_FAMILY.predict(c.unet, x, t, FLUX_FAMILY.conditioning(ours, ("w",)))
        packed = FluxPipeline._pack_latents(x, 3, 4, 8, 8)
        ids = FluxPipeline._prepare_latent_image_ids(3, 4, 4, x.device, x.dtype)
        theirs = c.unet(hidden_states=packed, timestep=t, guidance=torch.full((3,), 3.5), encoder_hidden_states=embeds,
                        pooled_projections=pooled, txt_ids=text_ids, img_ids=ids).sample
        theirs = FluxPipeline._unpack_latents(theirs, 8 * pipe.vae_scale_factor, 8 * pipe.vae_scale_factor,
                                              pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    scheduler, sigmas = c.noise_scheduler, torch.tensor([0.1, 0.5, 0.9])
    shape = torch.Size([3, 4, 64, 64])  # 32 x 32 = 1024 image tokens
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    torch.testing.assert_close(FLUX_FAMILY.shift(scheduler, sigmas, shape), scheduler.time_shift(mu, 1.0, sigmas))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_export_loads_in_the_familys_pipeline_as_the_trained_transformer(name, request, tmp_path):
    """The exported LoRA, read by a fresh pipeline's load_lora_weights, gives the trained module's transformer
    prediction to 1e-5 and changes the image a fixed seed gives."""
    import copy

    from alignment.sft import SFT
    from models.builders import save_components
    from models.families import FAMILIES
    from models.lora_io import save_lora

    c, family = request.getfixturevalue(f"{name}_components"), FAMILIES[name]
    pipeline_dir = save_components(c, tmp_path / "pipeline")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    module = AlignmentModule(copy.deepcopy(c.unet), c.noise_scheduler, SFT(), family=family,
                             lora={"rank": 4, "alpha": 8, "target_modules": targets})
    g = torch.Generator().manual_seed(0)
    for _, p in module.unet.named_parameters():
        if p.requires_grad:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    file = save_lora(module.unet, tmp_path / "lora", family=family)

    with torch.no_grad():
        cond = family.conditioning(family.encode_prompts(c, ["a red circle", "a blue square"], torch.device("cpu")), ("w",))
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.25, 0.8])
    outputs, images = {}, {}
    for lora in (None, file):
        pipe = family.pipeline_type.from_pretrained(pipeline_dir)
        if lora is not None:
            pipe.load_lora_weights(str(lora.parent))
        with torch.no_grad():
            outputs[lora] = family.predict(pipe.transformer, x, t, cond)
        pipe.set_progress_bar_config(disable=True)
        images[lora] = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt",
                            generator=torch.Generator().manual_seed(1), **family.call_kwargs(pipe)).images
    with torch.no_grad():
        trained = family.predict(module.unet, x, t, cond)
    torch.testing.assert_close(outputs[file], trained, rtol=0, atol=1e-5)
    assert (outputs[file] - outputs[None]).abs().max() > 1e-2
    assert (images[file] - images[None]).abs().max() > 1e-3


def test_float16_checkpoint_parts_load_in_float32_and_sample(tiny_sd3_dir, tmp_path):
    """SD 3's and FLUX's published text encoders are stored in float16, which transformers keeps; next to
    diffusers' float32 transformer the pipeline would then make float16 latents. Every part loads in float32."""
    import shutil

    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from models.components import load_components
    from models.sampling import SamplerSettings, generate

    directory = tmp_path / "fp16"
    shutil.copytree(tiny_sd3_dir, directory)
    for name, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                      ("text_encoder_3", T5EncoderModel)):
        cls.from_pretrained(tiny_sd3_dir / name).half().save_pretrained(directory / name)
    assert CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder").dtype == torch.float16
    components = load_components(str(directory))
    assert {part.dtype for part in (components.text_encoder, components.text_encoder_2, components.text_encoder_3,
                                    components.unet, components.vae)} == {torch.float32}
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, ["a red circle"], [0], SamplerSettings(scheduler="euler", num_inference_steps=2,
                                                                   height=32, width=32), progress=False)
    assert images.shape[0] == 1 and torch.isfinite(torch.as_tensor(images)).all()


def test_flux_schnell_style_model_without_guidance_embedding_predicts_and_samples(tmp_path):
    """FLUX schnell has no guidance embedding: the prediction passes none (family_options.guidance is unused) and
    the family's pipeline samples with it."""
    from diffusers import FluxPipeline

    from models.builders import build_flux_components
    from models.families.flux import FLUX_FAMILY
    from models.sampling import SamplerSettings, generate

    c = build_flux_components(tmp_path / "build", guidance_embeds=False, words=WORDS)
    assert not c.unet.config.guidance_embeds
    with torch.no_grad():
        encoded = FLUX_FAMILY.encode_prompts(c, ["a red circle", "a blue square"], torch.device("cpu"))
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
        ours = FLUX_FAMILY.predict(c.unet, x, t, FLUX_FAMILY.conditioning(encoded, ("w",)))
        theirs = c.unet(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 8), timestep=t, guidance=None,
                        encoder_hidden_states=encoded["prompt_embeds"], pooled_projections=encoded["pooled_prompt_embeds"],
                        txt_ids=torch.zeros(encoded["prompt_embeds"].shape[1], 3),
                        img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)).sample
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(theirs, 64, 64, 8), rtol=0, atol=1e-6)
    pipe = c.pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, ["a red circle"], [0], SamplerSettings(scheduler="euler", num_inference_steps=2,
                                                                   guidance_scale=0.0, height=64, width=64),
                      progress=False)
    assert images.shape[-2:] == (64, 64) and torch.isfinite(images).all()
