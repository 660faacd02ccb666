import pytest
import torch

from ipgo.backbones import ModelNotFoundError, PromptTooLongError, StableDiffusion
from ipgo.errors import UserError
from ipgo.testing import edited_copy

LONG = "a cat " + "very " * 70  # 74 tokens with BOS and EOS


def test_model_source_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StableDiffusion(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="model_index.json is missing"):
        StableDiffusion(str(tmp_path))
    offline = StableDiffusion("nobody/no-such-model")  # a hub id passes the cheap check ...
    with pytest.raises(ModelNotFoundError, match="not found in the Hugging Face cache"):
        offline.load_tokenizer()  # ... and fails clearly at the first (cheap) load, offline


def test_a_model_folder_under_the_home_directory_loads(tiny_sd_dir, tmp_path, monkeypatch):
    """"~/..." passes the early check and is loaded from the same folder (from_pretrained does not expand it)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd").symlink_to(tiny_sd_dir)
    backbone = StableDiffusion("~/models/sd")
    assert backbone.token_lengths(["a cat"]) == [4]


def test_encode_caches_and_applies_the_too_long_policy(tiny_backbone):
    calls = []
    handle = tiny_backbone.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = tiny_backbone.encode(["a cat", "a dog"], reserved=4)
        again = tiny_backbone.encode(["a dog", "a cat"], reserved=4)
    finally:
        handle.remove()
    assert len(calls) == 1  # each prompt encoded once
    assert torch.equal(first.hidden[0], again.hidden[1]) and first.lengths.tolist() == [4, 4]
    assert first.hidden.shape == (2, 77, 32)

    assert tiny_backbone.token_lengths([LONG]) == [74]
    with pytest.raises(PromptTooLongError, match=r"prompt 1 \('a cat very .*'\) has 74 tokens but only 57 fit"):
        tiny_backbone.encode([LONG], reserved=20)
    with pytest.warns(UserWarning, match="truncating to 57 tokens"):
        cut = tiny_backbone.encode([LONG], reserved=20, too_long="truncate")
    assert cut.lengths.tolist() == [57]
    # truncation keeps the end-of-text token, as the tokenizer does for a plain pipeline
    assert torch.equal(cut.hidden[0, 56], tiny_backbone.encode(["a cat " + "very " * 53]).hidden[0, 56])


def test_the_prompt_cache_stays_bounded_and_serves_every_batch():
    """Once full, new keys are computed but not kept; a batch mixing cached and new keys still gets all its values,
    and epochs over more prompts than fit still find the first ones cached."""
    from ipgo.caching import cached

    cache: dict[str, int] = {}
    computed: list[list[str]] = []

    def compute(keys: list[str]) -> list[int]:
        computed.append(keys)
        return [len(key) for key in keys]

    assert cached(cache, ["a", "bb", "ccc"], compute, limit=4) == [1, 2, 3]
    assert cached(cache, ["a", "dddd", "eeeee", "a"], compute, limit=4) == [1, 4, 5, 1]
    assert computed == [["a", "bb", "ccc"], ["dddd", "eeeee"]]
    assert list(cache) == ["a", "bb", "ccc", "dddd"]  # full: "eeeee" was computed, not kept
    computed.clear()
    for _ in range(2):  # two more epochs over the five keys, two at a time
        for batch in (["a", "bb"], ["ccc", "dddd"], ["eeeee"]):
            assert cached(cache, batch, compute, limit=4) == [len(key) for key in batch]
    assert computed == [["eeeee"], ["eeeee"]]  # only the key that did not fit, once an epoch


def test_the_prompt_cache_holds_fewer_wide_states(tiny_backbone, monkeypatch):
    """Its size follows the states' width and length: 4,096 prompts of SD 3's states would fill 22 GB of host memory
    per process."""
    from ipgo.backbones import base

    assert tiny_backbone._cache_entries() == 4096  # 77 x 32 floats a prompt
    monkeypatch.setattr(base, "ENCODING_CACHE_BYTES", 77 * 32 * 4 * 100)
    assert tiny_backbone._cache_entries() == 100
    tiny_backbone._cache.clear()
    for start in range(0, 150, 50):
        tiny_backbone.encode([f"a cat number {i}" for i in range(start, start + 50)])
    assert len(tiny_backbone._cache) == 100


@pytest.mark.parametrize("edit, message", [
    ({"time_cond_proj_dim": 8}, "guidance-distilled UNet .* use the base model"),  # LCM: no classifier-free guidance
    ({"in_channels": 9}, "takes 9 channels and returns 4: an inpainting or image-editing model"),
])
def test_unets_the_sampler_cannot_run_are_refused_from_their_config(tiny_sd_dir, tmp_path, edit, message):
    backbone = StableDiffusion(str(edited_copy(tiny_sd_dir, tmp_path / "model", {"unet/config.json": edit})))
    with pytest.raises(UserError, match=message):
        backbone.load()
    assert backbone.text_encoder is None and backbone.unet is None  # refused from its config: no weights loaded


@pytest.mark.parametrize("remove, edit, message", [
    ("vae", {}, "could not load the VAE of the local folder .*: its files are missing or incomplete"),
    ("tokenizer", {}, "could not load the tokenizer of the local folder .*: its files are missing or incomplete"),
    (None, {"model_index.json": {"text_encoder": [None, None]}}, "has no text_encoder .* use the base model"),
])
def test_an_incomplete_model_folder_is_named_as_such(tiny_sd_dir, tmp_path, remove, edit, message):
    """Not the hub's advice (it is a local folder), nor a tokenizer backend's complaint."""
    backbone = StableDiffusion(str(edited_copy(tiny_sd_dir, tmp_path / "model", edit, remove)))
    with pytest.raises(UserError, match=message) as error:
        backbone.load()
    assert "Hub" not in str(error.value)


def test_sd3_refuses_a_t5_length_its_pipeline_refuses(ipgo_cache):
    from ipgo.backbones import StableDiffusion3
    from ipgo.errors import ConfigError

    for length in (0, 513):
        with pytest.raises(ConfigError, match=f"max_sequence_length must be between 1 and 512 .* got {length}"):
            StableDiffusion3("tiny:sd3", max_sequence_length=length)
    assert [StableDiffusion3("tiny:sd3", max_sequence_length=n).max_sequence_length for n in (1, 512)] == [1, 512]


def test_a_tokenizer_that_fails_for_another_reason_keeps_its_own_message(tiny_sd_dir, tmp_path, monkeypatch):
    """Only a local tokenizer folder that is missing or empty is reported as such; transformers' other complaints
    (a slow tokenizer that needs sentencepiece) reach the user as transformers words them."""
    import transformers

    (edited_copy(tiny_sd_dir, tmp_path / "empty", remove="tokenizer") / "tokenizer").mkdir()
    with pytest.raises(ModelNotFoundError, match="could not load the tokenizer of the local folder"):
        StableDiffusion(str(tmp_path / "empty")).load_tokenizer()

    def needs_sentencepiece(*args, **kwargs):
        raise ValueError("this tokenizer needs sentencepiece: pip install sentencepiece")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_sentencepiece)
    with pytest.raises(ValueError, match="needs sentencepiece") as error:
        StableDiffusion(str(tiny_sd_dir)).load_tokenizer()
    assert not isinstance(error.value, ModelNotFoundError)


def test_renders_are_decoded_one_image_at_a_time(tiny_backbone):
    """Without gradients (reports, validation) the VAE decodes image by image: a 1024 px SDXL decode holds about
    3 GiB of activations per image. With gradients it decodes the batch at once, as the graph holds them all anyway."""
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    batches = []
    hook = tiny_backbone.vae.decoder.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    try:
        with torch.no_grad():
            rendered = tiny_backbone.decode(latents)
        assert batches == [1, 1, 1]
        batches.clear()
        trained = tiny_backbone.decode(latents.clone().requires_grad_())
        assert batches == [3]
    finally:
        hook.remove()
    torch.testing.assert_close(rendered, trained.detach(), atol=1e-6, rtol=0)
