"""Every model family through the same protocol: fit, export, and the family's own diffusers pipeline."""

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

import ipgo
from ipgo.backbones import StableDiffusion, StableDiffusion3, StableDiffusionXL
from ipgo.errors import UserError
from ipgo.export import TokenFile, TokenFileError, load_tokens, save_tokens
from ipgo.generate import render, sampler_settings
from ipgo.inject import conditioning
from ipgo.module import IPGOModule
from ipgo.rewards import ClipScore
from ipgo.sampling import SamplerConfig, make_scheduler
from ipgo.testing import edited_copy, tiny_sd2_path, tiny_sd3_path, tiny_sd_path, tiny_sdxl_path
from ipgo.tokens import TokenConfig

PROMPTS = ["a red circle on the left", "a blue square"]
FAMILIES = {  # name: (adapter, tiny builder, pipeline class, scheduler)
    "sd1": (StableDiffusion, tiny_sd_path, StableDiffusionPipeline, "lms"),
    "sd2": (StableDiffusion, tiny_sd2_path, StableDiffusionPipeline, "ddim"),
    "sdxl": (StableDiffusionXL, tiny_sdxl_path, StableDiffusionXLPipeline, "euler"),
    "sd3": (StableDiffusion3, tiny_sd3_path, StableDiffusion3Pipeline, "flow_euler"),
}


def make_module(family, ipgo_cache, tiny_clip_dir, mode="prompt-wise", prompt_attention=False, layout="padded"):
    adapter, build, _, scheduler = FAMILIES[family]
    return IPGOModule(
        adapter(str(build(ipgo_cache))), ClipScore(str(tiny_clip_dir)), mode=mode, layout=layout,
        tokens=TokenConfig(n_prefix=2, n_suffix=2, rank=4),
        sampler=SamplerConfig(scheduler=scheduler, num_steps=3, grad_steps=2, guidance_scale=4.0, height=32, width=32),
        optimizer=lambda params: torch.optim.Adam(params, lr=0.05), prompt_attention=prompt_attention,
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fit_raises_reward_and_export_reproduces_in_the_familys_pipeline(family, ipgo_cache, tiny_clip_dir, tmp_path):
    module = make_module(family, ipgo_cache, tiny_clip_dir)
    module.prepare(PROMPTS)
    module.log = lambda *args, **kwargs: None
    optimizer = torch.optim.Adam(module.tokens.parameters(), lr=0.05)
    batch = {"prompt": PROMPTS, "index": torch.arange(2)}
    for _ in range(4):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
        module.tokens.project_()
    assert (module.best.last > module.best.first).all(), (module.best.first, module.best.last)

    path = save_tokens(tmp_path / "tokens.safetensors", module.token_file())
    _, build, pipeline_class, scheduler = FAMILIES[family]
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # the tiny SD 3 has no T5
    pipe = pipeline_class.from_pretrained(str(build(ipgo_cache)), local_files_only=True, **extra)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ipgo.apply_tokens(pipe, path)
    config = module.sampler_config
    theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(3) for _ in PROMPTS], height=32, width=32,
                  num_inference_steps=config.num_steps, guidance_scale=config.guidance_scale, output_type="pt").images
    p, s = load_tokens(path).tokens_for(PROMPTS)
    assert torch.allclose(module.render(PROMPTS, [3], p, s), theirs.float(), atol=1e-5)


def test_ipgo_plus_tokens_depend_on_the_prompt_without_parameters(ipgo_cache, tiny_clip_dir, tmp_path):
    plain = make_module("sd1", ipgo_cache, tiny_clip_dir, mode="prompt-batch")
    plus = make_module("sd1", ipgo_cache, tiny_clip_dir, mode="prompt-batch", prompt_attention=True)
    for module in (plain, plus):
        module.prepare(PROMPTS)
    assert plain.tokens.num_trainable() == plus.tokens.num_trainable() > 0  # IPGO+ adds no parameter
    from ipgo.inject import conditioning

    prefix, suffix = plus.token_vectors([0, 0])
    _, _, embeds, placed_prefix, placed_suffix = conditioning(plus.backbone, PROMPTS, prefix, suffix,
                                                              prompt_attention=True)
    assert not torch.allclose(placed_prefix[0], placed_prefix[1])  # IPGO+ tokens are prompt-conditioned
    for tokens, placed in ((prefix, placed_prefix), (suffix, placed_suffix)):  # P and Q alike
        for row in range(len(PROMPTS)):  # P + softmax(P h[:L]^T / sqrt(D)) h[:L], over the prompt's real states
            states = embeds.hidden[row, : int(embeds.lengths[row])]
            weights = (tokens[row] @ states.T / states.shape[-1] ** 0.5).softmax(dim=-1)
            torch.testing.assert_close(placed[row], tokens[row] + weights @ states)

    # the token file records IPGO+, and applying it reproduces the module's render
    path = save_tokens(tmp_path / "plus.safetensors", plus.token_file())
    assert load_tokens(path).prompt_attention
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path(ipgo_cache)), local_files_only=True)
    pipe.scheduler = make_scheduler("lms", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    embeds = ipgo.token_embeds(pipe, path, PROMPTS)
    expected, _, *_ = conditioning(plus.backbone, PROMPTS, prefix, suffix, prompt_attention=True)
    assert torch.allclose(embeds["prompt_embeds"], expected.hidden, atol=1e-6)
    with pytest.raises(ValueError, match="prompt-batch variant"):
        make_module("sd1", ipgo_cache, tiny_clip_dir, mode="prompt-wise", prompt_attention=True)


def test_a_token_file_for_another_family_is_refused(ipgo_cache, tmp_path):
    sd1 = TokenFile(torch.zeros(2, 64), torch.zeros(2, 64), family="sd", base_model="tiny:sd2", hidden_size=64)
    path = save_tokens(tmp_path / "sd2.safetensors", sd1)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path(ipgo_cache)), local_files_only=True)
    with pytest.raises(TokenFileError, match="made for a 'sd' model .* but the pipeline is a 'sdxl' model"):
        ipgo.apply_tokens(pipe, path)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path(ipgo_cache)), local_files_only=True)
    with pytest.raises(TokenFileError, match="hidden size 64 .* hidden size 32"):
        ipgo.token_embeds(pipe, path, "a cat")


def test_a_checkpoint_saved_from_another_pipeline_of_its_family_is_accepted(ipgo_cache, tmp_path):
    """Only another family's pipeline class is refused: a model saved from an img2img pipeline is still SD 1.x, for
    ipgo.fit and for generate / evaluate alike."""
    from ipgo.generate import pipeline_config

    model = edited_copy(tiny_sd_path(ipgo_cache), tmp_path / "img2img",
                        {"model_index.json": {"_class_name": "StableDiffusionImg2ImgPipeline"}})
    StableDiffusion(str(model)).load_tokenizer()  # ipgo.fit's check
    tokens = TokenFile(torch.zeros(2, 32), torch.zeros(2, 32), family="sd", base_model=str(model), hidden_size=32)
    assert pipeline_config(tokens)["_class_name"] == "StableDiffusionImg2ImgPipeline"
    with pytest.raises(UserError, match="is a StableDiffusionPipeline model, and StableDiffusionXL runs"):
        StableDiffusionXL(str(tiny_sd_path(ipgo_cache))).load_tokenizer()


def test_sd3_refuses_the_unpadded_layout_before_loading(ipgo_cache, tiny_clip_dir):
    """The unpadded layout keeps n_prefix + prompt + n_suffix positions: for SD 3 that would cut off T5's."""
    module = make_module("sd3", ipgo_cache, tiny_clip_dir, layout="unpadded")
    with pytest.raises(UserError, match="T5 states .* set model.layout=padded"):
        module.prepare(["a cat"])
    assert module.backbone.transformer is None  # refused before the weights loaded


def test_a_sampler_that_does_not_fit_the_model_is_refused_before_loading(ipgo_cache, tiny_clip_dir):
    """From the model's configs: a diffusion scheduler for SD 3 (lms is SamplerConfig's default), and the other way."""
    sd3 = make_module("sd3", ipgo_cache, tiny_clip_dir)
    sd3.sampler_config = SamplerConfig(scheduler="lms", num_steps=3, height=32, width=32)
    with pytest.raises(UserError, match="scheduler 'lms' does not fit a flow-matching model"):
        sd3.prepare(["a cat"])
    sd1 = make_module("sd1", ipgo_cache, tiny_clip_dir)
    sd1.sampler_config = SamplerConfig(scheduler="flow_euler", num_steps=3, height=32, width=32)
    with pytest.raises(UserError, match="flow_euler is for flow-matching models"):
        sd1.prepare(["a cat"])
    assert sd3.backbone.transformer is None and sd1.backbone.unet is None and not sd3.reward.loaded


def test_sdxl_tokens_notice_a_change_of_the_text_encoder_layer_they_are_conditioned_on(ipgo_cache, tiny_clip_dir):
    """SDXL takes the encoders' second-to-last states: its last layer has no effect on the tokens, that one has."""
    import warnings

    module = make_module("sdxl", ipgo_cache, tiny_clip_dir, mode="prompt-batch")
    module.prepare(PROMPTS)
    tokens = module.token_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path(ipgo_cache)))
    projections = [m for name, m in pipe.text_encoder.named_modules() if name.endswith("mlp.fc2")]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        projections[-1].weight.add_(0.5)  # the conditioning does not change
        ipgo.token_embeds(pipe, tokens, "a cat")
        projections[-2].weight.add_(0.5)
        with pytest.raises(UserWarning, match="text encoder weights differ"):
            ipgo.token_embeds(pipe, tokens, "a cat")
        projections[-2].weight.sub_(0.5)
        # text_encoder_2's last layer feeds the pooled embedding
        [m for name, m in pipe.text_encoder_2.named_modules() if name.endswith("mlp.fc1")][-1].weight.mul_(1.5)
        with pytest.raises(UserWarning, match="pipeline's text encoder 2 weights differ"):  # it alone
            ipgo.token_embeds(pipe, tokens, "a cat")


def test_sd3_checkpoints_of_the_earlier_conditioning_are_refused(ipgo_cache, tiny_clip_dir):
    """Earlier versions dropped the last T5 states for the tokens: their SD 3 checkpoints trained on another
    conditioning (their run description has no t5_states)."""
    module = make_module("sd3", ipgo_cache, tiny_clip_dir)
    current = module._run_identity(["a cat"])
    module.check_checkpoint_run(current, ["a cat"])
    earlier = {key: value for key, value in current.items() if key != "t5_states"}
    with pytest.raises(UserError, match="earlier ipgo, whose SD 3 conditioning dropped the last T5 states"):
        module.check_checkpoint_run(earlier, ["a cat"])
    assert "t5_states" not in make_module("sd1", ipgo_cache, tiny_clip_dir)._run_identity(["a cat"])


@pytest.mark.parametrize("t5_length", [77, 300])
def test_sd3_tokens_carry_their_t5_length_into_the_pipeline(t5_length, ipgo_cache, tiny_clip_dir, tmp_path):
    """Trained with a T5 length other than the pipeline's default 256, the tokens rebuild the same conditioning,
    the unconditional branch included, and the pipeline renders with them."""
    module = IPGOModule(
        StableDiffusion3(str(tiny_sd3_path(ipgo_cache)), max_sequence_length=t5_length), ClipScore(str(tiny_clip_dir)),
        tokens=TokenConfig(n_prefix=2, n_suffix=2, rank=4),
        sampler=SamplerConfig(scheduler="flow_euler", num_steps=2, grad_steps=1, height=32, width=32),
    )
    module.prepare(PROMPTS)
    path = save_tokens(tmp_path / "tokens.safetensors", module.token_file())
    assert load_tokens(path).extra["text_encoders"] == '["text_encoder", "text_encoder_2"]'  # the tiny SD 3: no T5
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path(ipgo_cache)), local_files_only=True,
                                                    text_encoder_3=None, tokenizer_3=None)
    embeds = ipgo.token_embeds(pipe, path, PROMPTS)
    prefix, suffix = load_tokens(path).tokens_for(PROMPTS)
    cond, uncond, *_ = conditioning(module.backbone, PROMPTS, prefix, suffix)
    assert embeds["prompt_embeds"].shape == cond.hidden.shape == (2, 77 + t5_length, 64)
    assert torch.allclose(embeds["prompt_embeds"], cond.hidden.to(embeds["prompt_embeds"].dtype))
    assert torch.equal(embeds["negative_prompt_embeds"], uncond.hidden.to(embeds["prompt_embeds"].dtype))
    pipe.set_progress_bar_config(disable=True)
    ipgo.apply_tokens(pipe, path)
    images = pipe(PROMPTS, num_inference_steps=1, height=32, width=32, output_type="pt").images
    assert images.shape == (2, 3, 32, 32)
    with pytest.raises(UserError, match=f"max_sequence_length 128: these tokens were learnt with SD 3's T5 length "
                                        f"{t5_length}"):
        pipe(PROMPTS, num_inference_steps=1, height=32, width=32, max_sequence_length=128)
    # ipgo.generate's raw renders also encode at the trained T5 length
    raw = render(pipe, load_tokens(path), PROMPTS[:1], [5], tuned=False)[0]
    settings = sampler_settings(load_tokens(path))
    expected = pipe(PROMPTS[:1], generator=[torch.Generator().manual_seed(5)], height=32, width=32,
                    num_inference_steps=settings["num_steps"], guidance_scale=settings["guidance_scale"],
                    max_sequence_length=t5_length, output_type="pt").images
    assert torch.equal(raw, expected.float())


def test_sd3_tokens_learnt_with_t5_are_refused_by_a_pipeline_without_it(ipgo_cache, tmp_path):
    """A pipeline loaded with text_encoder_3=None (as diffusers suggests, to save memory) conditions on zeros in place
    of T5's states; tokens learnt with T5 would silently meet another conditioning. (The tiny SD 3 has no T5: the
    token file records one.)"""
    import json

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path(ipgo_cache)), local_files_only=True,
                                                    text_encoder_3=None, tokenizer_3=None)
    fits = TokenFile(torch.zeros(2, 64), torch.zeros(2, 64), family="sd3", base_model="tiny:sd3", hidden_size=64,
                     extra={"text_encoders": json.dumps(["text_encoder", "text_encoder_2"])})
    assert ipgo.token_embeds(pipe, fits, "a cat")["prompt_embeds"].shape == (1, 77 + 256, 64)
    with_t5 = replace(fits, extra={"text_encoders": json.dumps(["text_encoder", "text_encoder_2", "text_encoder_3"])})
    with pytest.raises(TokenFileError, match=r"learnt with the text encoders text_encoder, text_encoder_2 and "
                                             r"text_encoder_3, and this pipeline has text_encoder and text_encoder_2: "
                                             r".* \(do not pass text_encoder_3=None to from_pretrained; or the model "
                                             r"lacks it"):
        ipgo.apply_tokens(pipe, save_tokens(tmp_path / "t5.safetensors", with_t5))
    one = replace(fits, extra={"text_encoders": json.dumps(["text_encoder"])})  # and the other way round
    with pytest.raises(TokenFileError, match=r"\(pass text_encoder_2=None to from_pretrained\)"):
        ipgo.token_embeds(pipe, one, "a cat")


def test_sd3_cuts_a_long_negative_prompt_with_a_warning(ipgo_cache):
    """Its CLIP part is cut to 77 tokens as the pipeline cuts it (SD 3 is padded: nothing shorter)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path(ipgo_cache)), local_files_only=True,
                                                    text_encoder_3=None, tokenizer_3=None)
    tokens = TokenFile(torch.zeros(2, 64), torch.zeros(2, 64), family="sd3", base_model="tiny:sd3", hidden_size=64)
    with pytest.warns(UserWarning, match=r"negative prompt 1 .* has 82 tokens, more than the 77 CLIP positions"):
        embeds = ipgo.token_embeds(pipe, tokens, "a cat", negative_prompt="blurry " * 80)
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape


def test_sd3_with_dynamic_shifting_samples_as_its_pipeline(ipgo_cache, tiny_clip_dir, tmp_path):
    """A flow-matching scheduler with use_dynamic_shifting gets the pipeline's resolution-dependent shift."""
    folder = edited_copy(tiny_sd3_path(ipgo_cache), tmp_path / "sd3",
                         {"scheduler/scheduler_config.json": {"use_dynamic_shifting": True}})
    module = IPGOModule(
        StableDiffusion3(str(folder)), ClipScore(str(tiny_clip_dir)),
        tokens=TokenConfig(n_prefix=1, n_suffix=1, rank=2),
        sampler=SamplerConfig(scheduler="flow_euler", num_steps=3, grad_steps=1, guidance_scale=4.0, height=32,
                              width=32),
    )
    module.prepare(PROMPTS)
    path = save_tokens(tmp_path / "tokens.safetensors", module.token_file())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    ipgo.apply_tokens(pipe, path)
    theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(3) for _ in PROMPTS], height=32, width=32,
                  num_inference_steps=3, guidance_scale=4.0, output_type="pt").images
    p, s = load_tokens(path).tokens_for(PROMPTS)
    assert torch.allclose(module.render(PROMPTS, [3], p, s), theirs.float(), atol=1e-5)


def test_sdxl_decodes_with_the_vaes_latent_statistics_as_its_pipeline(ipgo_cache, tiny_clip_dir, tmp_path):
    """VAEs with latents_mean / latents_std in their config (Playground-v2.5 style) decode as the pipeline does."""
    import json

    channels = json.loads((tiny_sdxl_path(ipgo_cache) / "vae/config.json").read_text())["latent_channels"]
    folder = edited_copy(tiny_sdxl_path(ipgo_cache), tmp_path / "sdxl", {"vae/config.json": {
        "latents_mean": [0.3 * (c + 1) for c in range(channels)], "latents_std": [0.5 + c for c in range(channels)]}})
    module = IPGOModule(
        StableDiffusionXL(str(folder)), ClipScore(str(tiny_clip_dir)),
        tokens=TokenConfig(n_prefix=1, n_suffix=1, rank=2),
        sampler=SamplerConfig(scheduler="euler", num_steps=2, grad_steps=1, guidance_scale=4.0, height=32, width=32),
    )
    module.prepare(PROMPTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(3) for _ in PROMPTS], height=32, width=32,
                  num_inference_steps=2, guidance_scale=4.0, output_type="pt").images
    assert torch.allclose(module.render(PROMPTS, [3]), theirs.float(), atol=1e-5)
