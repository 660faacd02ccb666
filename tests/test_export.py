import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

import ipgo
from ipgo.backbones import PromptTooLongError, StableDiffusion
from ipgo.errors import UserError
from ipgo.export import TokenFile, TokenFileError, load_tokens, save_tokens
from ipgo.module import IPGOModule
from ipgo.rewards import ClipScore
from ipgo.sampling import SamplerConfig, make_scheduler
from ipgo.tokens import TokenConfig

PROMPTS = ["a red circle on the left", "a blue square"]


def make_module(tiny_sd_dir, tiny_clip_dir, layout="padded", mode="prompt-wise", scheduler="lms"):
    module = IPGOModule(
        StableDiffusion(str(tiny_sd_dir)),
        ClipScore(str(tiny_clip_dir)),
        mode=mode,
        tokens=TokenConfig(n_prefix=2, n_suffix=3, rank=4, init_scale=1.0),
        layout=layout,
        sampler=SamplerConfig(scheduler=scheduler, num_steps=4, grad_steps=1, guidance_scale=4.0, height=32,
                              width=32),
    )
    module.prepare(PROMPTS)
    return module


def pipeline(tiny_sd_dir, scheduler):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_images(pipe, prompts, seed, config):
    return pipe(prompts, generator=[torch.Generator().manual_seed(seed) for _ in prompts],
                num_inference_steps=config.num_steps, guidance_scale=config.guidance_scale, height=config.height,
                width=config.width, output_type="pt").images


@pytest.mark.parametrize(("layout", "mode", "scheduler"), [
    ("padded", "prompt-wise", "lms"), ("unpadded", "prompt-wise", "ddim"), ("padded", "prompt-batch", "euler"),
    ("padded", "prompt-wise", "dpmpp_2m"),
])
def test_round_trip_gives_the_modules_image(tiny_sd_dir, tiny_clip_dir, tmp_path, layout, mode, scheduler):
    module = make_module(tiny_sd_dir, tiny_clip_dir, layout, mode, scheduler)
    path = save_tokens(tmp_path / "tokens.safetensors", module.token_file())
    loaded = load_tokens(path)
    assert loaded.layout == layout and loaded.mode == mode and loaded.hidden_size == 32

    seed = 7
    p, s = loaded.tokens_for(PROMPTS)
    ours = module.render(PROMPTS, [seed], p, s)
    pipe = ipgo.apply_tokens(pipeline(tiny_sd_dir, scheduler), path)
    theirs = torch.cat([pipe_images(pipe, [prompt], seed, module.sampler_config) for prompt in PROMPTS])
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
    if layout == "padded":
        assert torch.allclose(pipe_images(pipe, PROMPTS, seed, module.sampler_config), theirs, atol=1e-5)
    else:  # the prompts differ in length: one call for both would stretch the shorter one with filler states
        with pytest.raises(UserError, match="once per prompt"):
            pipe_images(pipe, PROMPTS, seed, module.sampler_config)

    raw = pipe_images(ipgo.remove_tokens(pipe), PROMPTS, seed, module.sampler_config)
    assert torch.allclose(module.render(PROMPTS, [seed]), raw.float(), atol=1e-5)  # raw prompt, no tokens
    assert not torch.allclose(raw, theirs, atol=1e-3)  # the tokens change the image

    embeds = ipgo.token_embeds(pipe, path, PROMPTS[:1])
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape


def test_mismatched_or_bad_token_files(tiny_sd_dir, tiny_clip_dir, tmp_path):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    tokens = module.token_file()
    pipe = pipeline(tiny_sd_dir, "lms")
    wrong = TokenFile(torch.zeros(2, 64), torch.zeros(3, 64), family="sd", base_model="other/model",
                      hidden_size=64)
    with pytest.raises(TokenFileError, match="hidden size 64.*hidden size 32"):
        ipgo.apply_tokens(pipe, save_tokens(tmp_path / "wrong.safetensors", wrong))
    with pytest.raises(TokenFileError, match="no tokens for 'a green triangle'"):
        ipgo.token_embeds(pipe, tokens, "a green triangle")
    prompt = tokens.prompts[0]
    spaced = "  " + prompt.replace(" ", "  ") + " "  # the tokenizer sees the same prompt
    assert torch.equal(tokens.tokens_for([spaced])[0], tokens.tokens_for([prompt])[0])
    damaged = TokenFile(torch.zeros(2, 16), torch.zeros(3, 16), family="sd", base_model="tiny", hidden_size=32)
    with pytest.raises(TokenFileError, match=r"damaged: its prefix has shape \(2, 16\).* needs \(2, 32\)"):
        load_tokens(save_tokens(tmp_path / "damaged.safetensors", damaged))
    short = TokenFile(torch.zeros(2, 2, 32), torch.zeros(2, 3, 32), family="sd", base_model="tiny", hidden_size=32,
                      mode="prompt-wise", prompts=["a", "b", "c"])
    with pytest.raises(TokenFileError, match=r"3 prompts.* needs \(3, 2, 32\)"):
        load_tokens(save_tokens(tmp_path / "short.safetensors", short))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(TokenFileError, match="not a readable safetensors"):
        load_tokens(tmp_path / "junk.safetensors")
    with pytest.raises(TokenFileError, match="does not exist"):
        load_tokens(tmp_path / "missing")


def test_token_files_with_missing_or_unknown_metadata_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    good = TokenFile(torch.zeros(2, 32), torch.zeros(3, 32), family="sd", base_model="tiny", hidden_size=32)
    path = save_tokens(tmp_path / "good.safetensors", good)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = {"prefix": torch.zeros(2, 32), "suffix": torch.zeros(3, 32)}
    cases = [({k: v for k, v in metadata.items() if k != "hidden_size"}, "metadata lacks hidden_size"),
             ({**metadata, "family": "flux"}, "family 'flux', which this ipgo does not know"),
             ({**metadata, "layout": "ragged"}, "layout 'ragged'"),
             ({**metadata, "mode": "prompt-wise", "prompts": "[not json"}, "metadata does not parse"),
             ({**metadata, "n_prefix": "two"}, "metadata does not parse"),
             ({**metadata, "family": "sd3"}, "earlier ipgo, whose SD 3 conditioning dropped the last T5 states")]
    for changed, message in cases:
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=changed)
        with pytest.raises(TokenFileError, match=message):
            load_tokens(tmp_path / "bad.safetensors")


def test_applied_tokens_refuse_arguments_they_would_ignore(tiny_sd_dir, tiny_clip_dir):
    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    pipe = ipgo.apply_tokens(pipeline(tiny_sd_dir, "lms"), module.token_file())
    with pytest.raises(UserError, match="clip_skip: ipgo's tokens were learnt"):
        pipe("a cat", clip_skip=1, num_inference_steps=1, height=32, width=32)


def test_a_failed_render_leaves_no_tokens_on_the_pipeline(tiny_sd_dir, tiny_clip_dir):
    from ipgo.generate import render

    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    tokens = module.token_file()
    tokens.extra["sampler"] = '{"num_steps": 2, "guidance_scale": 4.0, "height": 33, "width": 32}'  # 33: refused
    pipe = pipeline(tiny_sd_dir, "lms")
    with pytest.raises(ValueError, match="divisible by 8"):
        render(pipe, tokens, ["a cat"], [0])
    assert "encode_prompt" not in pipe.__dict__  # the pipeline's own method again



def test_token_files_name_the_weights_they_were_trained_on(tiny_sd_dir, tiny_clip_dir, monkeypatch):
    """A local folder by its absolute path, and the revision and variant, which generate loads again."""
    from ipgo.backbones.base import portable_model_name
    from ipgo.generate import load_pipeline

    monkeypatch.chdir(tiny_sd_dir.parent)
    assert portable_model_name(tiny_sd_dir.name) == str(tiny_sd_dir.resolve())
    assert portable_model_name("org/model") == "org/model"
    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    module.backbone.variant, module.backbone.revision = "fp16", "v2"  # as if loaded so (tiny has no fp16 files)
    tokens = module.token_file()
    tokens.extra["sampler"] = json.dumps({"scheduler": "lms"})
    assert (tokens.extra["variant"], tokens.extra["revision"]) == ("fp16", "v2")
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    for model in (None, str(tiny_sd_dir)):  # another model given: no pins of the training weights
        with pytest.raises(UserError):
            load_pipeline(tokens, model)
    assert (calls[0]["variant"], calls[0]["revision"]) == ("fp16", "v2") and "variant" not in calls[1]


def test_tokens_on_other_weights_of_the_same_kind_warn(tiny_sd_dir, tiny_clip_dir):
    """A fine-tune, a LoRA (fused or not) or another checkpoint of the family: the tokens apply, with a warning that
    names the part; the very weights trained on, cast to bfloat16, pass."""
    import warnings

    tokens = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch").token_file()
    pipe = pipeline(tiny_sd_dir, "lms")

    class Adapted(torch.nn.Module):  # peft's layout of a layer with an unfused LoRA adapter
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.lora_A = base, torch.nn.Linear(base.in_features, 2, bias=False)

        def forward(self, x):
            return self.base_layer(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ipgo.token_embeds(pipe, tokens, "a cat")
        ipgo.token_embeds(pipe.to(torch.bfloat16), tokens, "a cat")
        pipe.to(torch.float32)
        pipe.fuse_qkv_projections()  # new layers of the same weights
        ipgo.token_embeds(pipe, tokens, "a cat")
        pipe.unfuse_qkv_projections()
    block = pipe.unet.up_blocks[-1].attentions[-1].transformer_blocks[0].attn1
    block.to_v = Adapted(block.to_v)
    with pytest.warns(UserWarning, match="this pipeline's denoiser weights differ from that model's"):
        ipgo.token_embeds(pipe, tokens, "a cat")
    block.to_v = block.to_v.base_layer
    with torch.no_grad():
        block.to_v.weight.mul_(1.1)  # a "fine-tune", or a fused LoRA, of any linear layer
    with pytest.warns(UserWarning, match="this pipeline's denoiser weights differ from that model's"):
        ipgo.apply_tokens(pipe, tokens)
    with torch.no_grad():
        pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj").weight.mul_(1.5)  # as a LoRA would
    with pytest.warns(UserWarning, match="text encoder and denoiser weights differ"):
        ipgo.token_embeds(pipe, tokens, "a cat")


def test_applied_tokens_check_the_weights_once_not_per_call(tiny_sd_dir, tiny_clip_dir, monkeypatch):
    """The weights' fingerprint reads every linear layer: apply_tokens checks it once, not at every pipeline call."""
    from ipgo.backbones.base import Backbone

    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    tokens = module.token_file()  # records the fingerprint
    calls = []
    fingerprint = Backbone.weights_fingerprint
    monkeypatch.setattr(Backbone, "weights_fingerprint", lambda self: calls.append(1) or fingerprint(self))
    pipe = ipgo.apply_tokens(pipeline(tiny_sd_dir, "lms"), tokens)
    for seed in (1, 2):
        pipe_images(pipe, ["a cat"], seed, module.sampler_config)
    assert len(calls) == 1


def test_a_lora_scale_the_tokens_would_ignore_is_refused(tiny_sd_dir, tiny_clip_dir):
    """The pipeline scales its text encoder's LoRA layers inside encode_prompt, which the tokens bypass."""
    tokens = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch").token_file()
    pipe = ipgo.apply_tokens(pipeline(tiny_sd_dir, "lms"), tokens)

    def encode(scale):
        return pipe.encode_prompt("a cat", "cpu", 1, True, lora_scale=scale)

    layer = next(m for name, m in pipe.text_encoder.named_modules() if name.endswith("layers.0.self_attn"))
    layer.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(layer.q_proj.in_features, 2, bias=False)})
    encode(None)
    with pytest.raises(UserError, match=r"a LoRA scale of 0.5 .* fuse the LoRA at that scale instead"):
        encode(0.5)


def test_tokens_work_on_a_pipeline_with_cpu_offload(tiny_sd_dir, tiny_clip_dir):
    """With (sequential) CPU offload the weights sit on the "meta" device; prompts are encoded where the pipeline
    runs its models (its execution device), as diffusers does."""
    from accelerate import cpu_offload

    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    pipe = ipgo.apply_tokens(pipeline(tiny_sd_dir, "lms"), module.token_file())
    before = pipe_images(pipe, ["a cat"], 3, module.sampler_config)
    for part in (pipe.text_encoder, pipe.unet, pipe.vae):
        cpu_offload(part, execution_device=torch.device("cpu"))
    assert next(pipe.text_encoder.parameters()).device.type == "meta"
    torch.testing.assert_close(pipe_images(pipe, ["a cat"], 3, module.sampler_config), before)


def test_an_sdxl_pipeline_without_its_first_text_encoder_is_refused_clearly(ipgo_cache, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from ipgo.backbones import backbone_for_pipeline
    from ipgo.testing import resolve_source

    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    refiner = StableDiffusionXLPipeline.from_pretrained(resolve_source("tiny:sdxl"), text_encoder=None, tokenizer=None)
    with pytest.raises(UserError, match="has no text_encoder .* apply them to the base pipeline"):
        backbone_for_pipeline(refiner)


def test_prompt_sets_beyond_the_metadata_limit_round_trip(tmp_path):
    """safetensors caps metadata at 100 MB: prompts live in a tensor, so a prompt-batch file of a very large
    training set (here ~110 MB of prompts) is written and read back."""
    many = [f"prompt number {i:07d} " + "x" * 90 for i in range(1_000_000)]
    tokens = TokenFile(torch.zeros(2, 32), torch.zeros(3, 32), family="sd", base_model="tiny", hidden_size=32,
                       train_prompts=many)
    loaded = load_tokens(save_tokens(tmp_path / "big.safetensors", tokens))
    assert loaded.train_prompts == many


def test_token_files_of_earlier_versions_keep_their_prompts_in_the_metadata(tmp_path):
    from safetensors.torch import save_file

    tokens = TokenFile(torch.zeros(2, 2, 32), torch.zeros(2, 3, 32), family="sd", base_model="tiny", hidden_size=32,
                       mode="prompt-wise", prompts=["a cat", "ein Hund über"])
    path = save_tokens(tmp_path / "new.safetensors", tokens)
    with safe_open(str(path), "pt") as handle:
        metadata = {**handle.metadata(), "prompts": json.dumps(tokens.prompts), "format_version": "1"}
    assert metadata["ipgo_version"] == ipgo.__version__  # the writer's, in any file save_tokens writes
    save_file({"prefix": tokens.prefix, "suffix": tokens.suffix}, str(tmp_path / "old.safetensors"), metadata=metadata)
    assert load_tokens(path).prompts == load_tokens(tmp_path / "old.safetensors").prompts == tokens.prompts


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unpadded_tokens_cut_a_negative_prompt_as_the_pipeline_does(ipgo_cache, monkeypatch, family):
    """With the unpadded layout the conditioning is n_p + L + n_s states long: a longer negative prompt is cut to
    that many tokens with its end token kept (and SDXL's pooled embedding from the cut one), as the pipeline does
    for prompt_embeds of that length; with a warning that names the negative prompt."""
    from diffusers import DiffusionPipeline

    from ipgo.testing import resolve_source

    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    pipe = DiffusionPipeline.from_pretrained(resolve_source(f"tiny:{family}"))
    width = pipe.text_encoder.config.hidden_size + (pipe.text_encoder_2.config.hidden_size if family == "sdxl" else 0)
    tokens = TokenFile(torch.randn(1, width), torch.randn(1, width), family="sd" if family == "sd1" else family,
                       base_model=f"tiny:{family}", hidden_size=width, layout="unpadded")
    negative = "blurry dark grainy washed out overexposed picture"  # 12 tokens with BOS and EOS; "a cat" leaves 6
    with pytest.warns(UserWarning, match=r"negative prompt 1 \('blurry.*'\) has 12 tokens, more than the 6 CLIP "):
        ours = ipgo.token_embeds(pipe, tokens, "a cat", negative_prompt=negative)
    assert ours["prompt_embeds"].shape[1] == 6
    pooled = {"pooled_prompt_embeds": ours["pooled_prompt_embeds"]} if family == "sdxl" else {}
    theirs = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt=negative, prompt_embeds=ours["prompt_embeds"], **pooled)
    torch.testing.assert_close(ours["negative_prompt_embeds"], theirs[1], rtol=0, atol=1e-6)
    if family == "sdxl":
        torch.testing.assert_close(ours["negative_pooled_prompt_embeds"], theirs[3], rtol=0, atol=1e-6)


def test_applied_tokens_refuse_a_second_prompt_they_would_ignore(ipgo_cache, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from ipgo.testing import resolve_source

    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_source("tiny:sdxl"))
    pipe.set_progress_bar_config(disable=True)
    tokens = TokenFile(torch.randn(2, 64), torch.randn(1, 64), family="sdxl", base_model="tiny:sdxl", hidden_size=64)
    ipgo.apply_tokens(pipe, tokens)
    call = dict(num_inference_steps=1, height=32, width=32, output_type="pt")
    with pytest.raises(UserError, match="prompt_2 differs from prompt: ipgo's tokens condition every text encoder"):
        pipe("a cat", prompt_2="an oil painting", **call)
    with pytest.raises(UserError, match="negative_prompt_2 differs from negative_prompt"):
        pipe("a cat", negative_prompt="blurry", negative_prompt_2="dark", **call)
    assert pipe("a cat", prompt_2="a cat", **call).images.shape == (1, 3, 32, 32)  # the same prompt: nothing lost


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_applied_tokens_render_several_images_per_prompt(family, ipgo_cache, monkeypatch):
    """num_images_per_prompt=2 gives each prompt's images as two copies of the prompt would (SD 3's encode_prompt
    does not repeat embeddings it is handed, so the wrapper repeats them), and negatives must match the prompts."""
    import diffusers

    from ipgo.backbones import backbone_for_pipeline
    from ipgo.testing import resolve_source

    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    pipeline_class = {"sd1": StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
                      "sd3": diffusers.StableDiffusion3Pipeline}[family]
    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = pipeline_class.from_pretrained(resolve_source(f"tiny:{family}"), **extra)
    pipe.set_progress_bar_config(disable=True)
    backbone = backbone_for_pipeline(pipe)
    both = {"prompt_2": "blurry", "prompt_3": "blurry"} if family == "sd3" else {}
    blurry = pipe.encode_prompt(prompt="blurry", device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=False, **both)
    torch.manual_seed(0)
    tokens = TokenFile(torch.randn(2, backbone.hidden_size), torch.randn(1, backbone.hidden_size),
                       family=backbone.family, base_model=f"tiny:{family}", hidden_size=backbone.hidden_size)
    ipgo.apply_tokens(pipe, tokens)
    call = dict(num_inference_steps=2, height=32, width=32, output_type="pt", guidance_scale=4.0)

    def seeds(*values):
        return [torch.Generator().manual_seed(v) for v in values]

    repeated = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=seeds(1, 2, 3, 4), **call).images
    copies = pipe(["a cat", "a cat", "a dog", "a dog"], generator=seeds(1, 2, 3, 4), **call).images
    assert repeated.shape == (4, 3, 32, 32)
    torch.testing.assert_close(repeated, copies)
    assert not torch.allclose(repeated[0], repeated[2])  # the prompts differ: a real comparison
    with pytest.raises(UserError, match="negative_prompt: 1 given for 2 prompts; give one per prompt"):
        pipe(["a cat", "a dog"], negative_prompt=["blurry"], **call)
    # a caller's own negative embeddings, sized as the plain pipeline takes them (SD 3: one per image, the others:
    # one per prompt, which they repeat)

    def negatives(rows):
        given = {"negative_prompt_embeds": blurry[0].repeat(rows, 1, 1)}
        if len(blurry) == 4:
            given["negative_pooled_prompt_embeds"] = blurry[2].repeat(rows, 1)
        return given

    own = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=seeds(1, 2, 3, 4), **call,
               **negatives(4 if family == "sd3" else 2)).images
    own_copies = pipe(["a cat", "a cat", "a dog", "a dog"], generator=seeds(1, 2, 3, 4), **call, **negatives(4)).images
    torch.testing.assert_close(own, own_copies)
    assert not torch.allclose(own, repeated)  # the negatives were used


def test_applied_tokens_spell_out_multi_vector_textual_inversion_as_the_pipeline(tiny_sd_dir):
    """A textual-inversion token of two vectors loaded into the pipeline: with empty learned tokens, ipgo's prompt
    states are the pipeline's own (it spells "<cat-toy>" as "<cat-toy> <cat-toy>_1" before tokenising)."""
    pipe = pipeline(tiny_sd_dir, "lms")
    width = pipe.text_encoder.config.hidden_size
    pipe.load_textual_inversion({"<cat-toy>": torch.randn(2, width, generator=torch.Generator().manual_seed(0))})
    tokens = TokenFile(torch.zeros(0, width), torch.zeros(0, width), family="sd", base_model="tiny", hidden_size=width)
    prompt = "a photo of <cat-toy> on a table"
    ours = ipgo.token_embeds(pipe, tokens, prompt)["prompt_embeds"]
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)


def test_a_prompt_too_long_once_textual_inversion_is_spelt_out_is_refused(tiny_sd_dir):
    """The length check counts a multi-vector textual-inversion token as its vectors, as the pipeline encodes it:
    a prompt that fits as written but not spelt out is refused, not silently cut."""
    pipe = pipeline(tiny_sd_dir, "lms")
    width, limit = pipe.text_encoder.config.hidden_size, pipe.tokenizer.model_max_length
    pipe.load_textual_inversion({"<long>": torch.randn(limit - 4, width, generator=torch.Generator().manual_seed(0))})
    tokens = TokenFile(torch.zeros(1, width), torch.zeros(1, width), family="sd", base_model="tiny", hidden_size=width)
    ipgo.token_embeds(pipe, tokens, "<long>")  # BOS + its vectors + EOS + 2 learned tokens: fits exactly
    with pytest.raises(PromptTooLongError, match=f"has {limit + 1} tokens but only {limit - 2} fit"):
        ipgo.token_embeds(pipe, tokens, "a photo of <long>")
