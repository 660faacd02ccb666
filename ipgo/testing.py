"""Tiny deterministic random-weight models for tests, demos and benchmarks.

Every builder writes a folder with ``save_pretrained`` (so loading goes through the same
``from_pretrained`` code as real checkpoints), once per cache root: the folder is built in a
temporary directory next to its target and renamed into place, and its name carries a hash of
the recipe, so editing a recipe builds a fresh folder. Weights come from a fixed seed inside
``torch.random.fork_rng``: two builds are bit-identical and the caller's RNG is untouched.

The cache root is the ``root`` argument, else ``$IPGO_CACHE``, else ``~/.cache/ipgo``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ipgo.errors import UserError

_RECIPE_VERSION = 1  # bump when the build code changes in a way the configs below do not show
_SEED = 0
_COMPLETE = ".complete"

# SD 1.x-shaped components: 2 UNet levels, VAE scale factor 2, 32-wide text encoder.
_SD_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)  # fmt: skip
_SD_VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
)  # fmt: skip
_CLIP_IDS = dict(  # the tokenizer's: 49,408 tokens, <|startoftext|> = 49406, <|endoftext|> = 49407 = pad
    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)  # fmt: skip
_SD_TEXT = dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=37, **_CLIP_IDS)
# SD 1.5's scheduler_config.json; PNDM ignores clip_sample but keeps it for from_config swaps (e.g. DDIM).
_SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)  # fmt: skip
_CLIP = dict(
    text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     **_CLIP_IDS),
    vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37),
    projection_dim=768,  # the width of ViT-L/14 embeddings, so the real LAION aesthetic head fits
)  # fmt: skip
_CLIP_PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})  # OpenAI mean/std
_AESTHETIC_WIDTHS = (768, 1024, 128, 64, 16, 1)
_AESTHETIC_KEYS = (0, 2, 4, 6, 7)  # nn.Sequential positions of the Linear layers (dropout at 1, 3, 5)
TINY_OPEN_CLIP_NAME = "ipgo-tiny-ViT"
"""open_clip model name of the tiny HPS checkpoint; its config JSON lies next to the checkpoint."""
_OPEN_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=8, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)  # fmt: skip


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    import open_clip

    bpe = open_clip.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in bpe.encoder.items()}
    return vocab, tuple(sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))


def clip_tokenizer() -> CLIPTokenizer:
    """The real 49,408-token CLIP BPE tokenizer, built offline from open_clip's vocabulary.

    The vocabulary is read once per process; each call returns a new tokenizer, so adding
    tokens to one (as textual inversion does) leaves the others alone.

    Returns:
        A ``CLIPTokenizer`` with SD 1.5's settings: pad = ``<|endoftext|>``, 77 tokens.
    """
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def _recipe_hash(*parts: object) -> str:
    text = json.dumps([_RECIPE_VERSION, _SEED, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _build_once(root: str | os.PathLike | None, name: str, build: Callable[[Path], None]) -> Path:
    """Return ``root/name``, calling ``build(tmp_dir)`` under a fixed seed first if it is not complete."""
    root = Path(root if root is not None else os.environ.get("IPGO_CACHE") or "~/.cache/ipgo").expanduser()
    target = root / name
    if (target / _COMPLETE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            build(tmp)
        (tmp / _COMPLETE).touch()
        try:
            os.replace(tmp, target)
        except OSError:  # target exists: another process finished first, or an incomplete leftover
            if not (target / _COMPLETE).exists():
                shutil.rmtree(target)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_sd(path: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**_SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_SD_TEXT)),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**_SD_UNET),
        scheduler=PNDMScheduler.from_config(dict(_SD_SCHEDULER)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def tiny_sd_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a tiny random Stable Diffusion 1.x pipeline folder.

    Args:
        root: Cache root; defaults to ``$IPGO_CACHE`` or ``~/.cache/ipgo``.

    Returns:
        A folder that ``StableDiffusionPipeline.from_pretrained(path, local_files_only=True)``
        loads: UNet (32, 64), VAE scale factor 2, 32-wide CLIP text encoder, real CLIP
        tokenizer, SD 1.5's PNDM scheduler, no safety checker.
    """
    name = f"tiny-sd1-{_recipe_hash(_SD_UNET, _SD_VAE, _SD_TEXT, _SD_SCHEDULER)}"
    return _build_once(root, name, _build_sd)


# SD 2.x-shaped: linear projections, per-level head dims, "!" padding, v-prediction; text width 64, so
# its tokens do not fit SD 1.x's 32-wide ones.
_SD2_UNET = dict(_SD_UNET, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True)
_SD2_TEXT = dict(_SD_TEXT, hidden_size=64, hidden_act="gelu")
_SD2_SCHEDULER = dict(_SD_SCHEDULER, prediction_type="v_prediction")
# SDXL-shaped (diffusers' own test sizes): two 32-wide encoders -> 64-wide states, pooled 32, 6 time ids x 8.
_SDXL_UNET = dict(
    _SD_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
)  # fmt: skip
_SDXL_TEXT = dict(_SD_TEXT, hidden_act="gelu", projection_dim=32)
_SDXL_SCHEDULER = dict(_SD_SCHEDULER, timestep_spacing="leading")
# SD 3-shaped: a one-layer MMDiT; CLIP 32 + 32 = joint width 64, pooled 64; no T5 (zeros, as the pipeline does).
_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
)  # fmt: skip
_SD3_VAE = dict(_SD_VAE, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)


def _pad_bang_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer with "!" as padding, as SD 2.x and SDXL's second tokenizer have."""
    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token="!")


def _build_sd2(path: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    StableDiffusionPipeline(
        vae=AutoencoderKL(**_SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**_SD2_TEXT)),
        tokenizer=_pad_bang_tokenizer(), unet=UNet2DConditionModel(**_SD2_UNET),
        scheduler=DDIMScheduler.from_config(dict(_SD2_SCHEDULER)), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)


def tiny_sd2_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a tiny random SD 2.x-shaped pipeline folder (v-prediction, text width 64)."""
    return _build_once(root, f"tiny-sd2-{_recipe_hash(_SD2_UNET, _SD_VAE, _SD2_TEXT, _SD2_SCHEDULER)}", _build_sd2)


def _build_sdxl(path: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    StableDiffusionXLPipeline(
        vae=AutoencoderKL(**_SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**_SDXL_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_SDXL_TEXT)), tokenizer=clip_tokenizer(),
        tokenizer_2=_pad_bang_tokenizer(), unet=UNet2DConditionModel(**_SDXL_UNET),
        scheduler=EulerDiscreteScheduler.from_config(dict(_SDXL_SCHEDULER)),
        add_watermarker=False,  # not saved; building never needs invisible-watermark, installed or not
    ).save_pretrained(path)


def tiny_sdxl_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a tiny random SDXL-shaped pipeline folder (two text encoders, pooled, time ids)."""
    name = f"tiny-sdxl-{_recipe_hash(_SDXL_UNET, _SD_VAE, _SDXL_TEXT, _SDXL_SCHEDULER)}"
    return _build_once(root, name, _build_sdxl)


def _build_sd3(path: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**_SD3_TRANSFORMER), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(**_SD3_VAE), text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**_SDXL_TEXT)),
        tokenizer=clip_tokenizer(), text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_SDXL_TEXT)),
        tokenizer_2=_pad_bang_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    ).save_pretrained(path)


def tiny_sd3_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a tiny random SD 3-shaped pipeline folder (MMDiT, two CLIP encoders, no T5)."""
    return _build_once(root, f"tiny-sd3-{_recipe_hash(_SD3_TRANSFORMER, _SD3_VAE, _SDXL_TEXT)}", _build_sd3)


def _build_clip(path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    CLIPModel(CLIPConfig(**copy.deepcopy(_CLIP))).save_pretrained(path)
    CLIPImageProcessor(**_CLIP_PROCESSOR).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)


def tiny_clip_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a tiny random CLIP model folder with its image processor and tokenizer.

    Args:
        root: Cache root; defaults to ``$IPGO_CACHE`` or ``~/.cache/ipgo``.

    Returns:
        A folder loadable by ``CLIPModel``, ``CLIPImageProcessor`` and ``CLIPTokenizer``
        ``.from_pretrained``: 32x32 images, patch 8, 32-wide towers, projection width 768.
    """
    return _build_once(root, f"tiny-clip-{_recipe_hash(_CLIP, _CLIP_PROCESSOR)}", _build_clip)


def _build_aesthetic_head(path: Path) -> None:
    state = {}
    for key, (n_in, n_out) in zip(_AESTHETIC_KEYS, zip(_AESTHETIC_WIDTHS, _AESTHETIC_WIDTHS[1:])):
        layer = torch.nn.Linear(n_in, n_out)
        state[f"layers.{key}.weight"], state[f"layers.{key}.bias"] = layer.weight.data, layer.bias.data
    torch.save(state, path / "aesthetic_head.pth")


def tiny_aesthetic_head_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a random LAION-format aesthetic head (768→1024→128→64→16→1).

    Args:
        root: Cache root; defaults to ``$IPGO_CACHE`` or ``~/.cache/ipgo``.

    Returns:
        The ``.pth`` file: a state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``.
    """
    folder = _build_once(root, f"tiny-aesthetic-{_recipe_hash(_AESTHETIC_WIDTHS)}", _build_aesthetic_head)
    return folder / "aesthetic_head.pth"


def _build_hps(path: Path) -> None:
    from open_clip.model import CLIP

    (path / f"{TINY_OPEN_CLIP_NAME}.json").write_text(json.dumps(_OPEN_CLIP, indent=2))
    torch.save(CLIP(**copy.deepcopy(_OPEN_CLIP)).state_dict(), path / "hps.pt")  # create_model's keys


def tiny_hps_checkpoint_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a random open_clip checkpoint in HPSv2's format, for the model ``ipgo-tiny-ViT``.

    The folder also holds the model's open_clip config, ``ipgo-tiny-ViT.json``, which
    ``HPSv2`` registers with ``open_clip.add_model_config`` when it loads the checkpoint.

    Args:
        root: Cache root; defaults to ``$IPGO_CACHE`` or ``~/.cache/ipgo``.

    Returns:
        The ``.pt`` file: a plain state dict (32x32 images, patch 8, 32-wide towers, embed 32).
    """
    folder = _build_once(root, f"tiny-hps-{_recipe_hash(_OPEN_CLIP)}", _build_hps)
    return folder / "hps.pt"


class UnknownTinyModelError(UserError, ValueError):
    """A "tiny:..." name that is not one of the built-in tiny models."""


SHAPES_WEIGHTS = Path(__file__).parent / "shapes" / "weights"
"""The trained shapes-world models shipped in the package (`python -m ipgo.shapes.train` made them)."""


def shapes_path(part: str) -> Path:
    """The shipped shapes-world model `part` ("sd": the text-to-image pipeline, "clip": the reward's CLIP)."""
    path = SHAPES_WEIGHTS / part
    if not (path / ("model_index.json" if part == "sd" else "config.json")).is_file():
        raise UnknownTinyModelError(
            f"the shapes-world weights are missing from {path}: reinstall ipgo, or make them with "
            f"`python -m ipgo.shapes.train --out {SHAPES_WEIGHTS}`"
        )
    return path


TINY_SOURCES: dict[str, Callable[[], Path]] = {
    "tiny:sd1": tiny_sd_path,
    "tiny:sd2": tiny_sd2_path,
    "tiny:sdxl": tiny_sdxl_path,
    "tiny:sd3": tiny_sd3_path,
    "tiny:clip": tiny_clip_path,
    "tiny:aesthetic-head": tiny_aesthetic_head_path,
    "tiny:hps": tiny_hps_checkpoint_path,
    "tiny:shapes-sd": lambda: shapes_path("sd"),
    "tiny:shapes-clip": lambda: shapes_path("clip"),
}
"""Names that configs may use instead of a hub id or path: the random tiny models above, built on first
use, and the trained shapes-world models shipped in the package."""


def is_tiny(source: str | os.PathLike) -> bool:
    """Whether `source` names a built-in tiny model ("tiny:..."); unknown tiny names raise."""
    text = os.fspath(source)
    if not text.startswith("tiny:"):
        return False
    if text not in TINY_SOURCES:
        raise UnknownTinyModelError(f"unknown tiny model {text!r}; the built-in ones are {', '.join(TINY_SOURCES)}")
    return True


def resolve_source(source: str | os.PathLike) -> str:
    """The local path of a "tiny:..." name (building it once, in the cache); other sources unchanged."""
    return str(TINY_SOURCES[os.fspath(source)]()) if is_tiny(source) else os.fspath(source)


# ImageReward: BLIP ViT (32 px, patch 8) + 32-wide cross-attending BERT, a small BERT vocabulary.
_IMAGE_REWARD = dict(
    vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, initializer_range=0.02),
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64),
)  # fmt: skip
_BERT_WORDS = (
    "a an the of on in with and at by photo painting picture oil cat dog moon lighthouse red blue sky house "
    "man woman tree city night"
).split()


def _tiny_bert_tokenizer():  # -> transformers.BertTokenizer
    """A small uncased WordPiece tokenizer with BLIP's extra ``[DEC]`` (bos) and ``[ENC]`` tokens."""
    import string

    from transformers import BertTokenizer

    pieces = [*string.ascii_lowercase, *string.digits, *string.punctuation]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_BERT_WORDS, *pieces, *(f"##{c}" for c in pieces)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _build_image_reward(path: Path) -> None:
    from ipgo.rewards.image_reward import build_model, to_imagereward_key

    tokenizer = _tiny_bert_tokenizer()
    config = copy.deepcopy(_IMAGE_REWARD)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config["text"].update(vocab_size=len(tokenizer), sep_token_id=tokenizer.sep_token_id,
                          eos_token_id=tokenizer.sep_token_id, **ids)  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    model = build_model(config["vision"], {**config["text"], "encoder_hidden_size": config["vision"]["hidden_size"]})
    state = {to_imagereward_key(k): v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path / "ImageReward.pt")  # the published names: loading goes through the key mapping


def tiny_image_reward_path(root: str | os.PathLike | None = None) -> Path:
    """Build (once) a random ImageReward model folder in the published checkpoint format.

    Args:
        root: Cache root; defaults to ``$IPGO_CACHE`` or ``~/.cache/ipgo``.

    Returns:
        A folder with ``ImageReward.pt`` (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
        ``mlp.layers.*`` keys), ``config.json`` (``{"vision": ..., "text": ...}`` sizes) and the
        tokenizer files of a small BERT vocabulary with ``[DEC]`` and ``[ENC]``.
    """
    name = f"tiny-image-reward-{_recipe_hash(_IMAGE_REWARD, _BERT_WORDS)}"
    return _build_once(root, name, _build_image_reward)


TINY_SOURCES["tiny:image-reward"] = tiny_image_reward_path


def edited_copy(source: str | Path, folder: str | Path, edits: dict[str, dict] | None = None,
                remove: str | None = None) -> Path:
    """A copy of a model folder with `edits` ({file: {key: value}}) merged into its JSON files and the subfolder
    `remove` deleted: a model of another make, for tests."""
    folder = Path(shutil.copytree(source, folder))
    for name, values in (edits or {}).items():
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    if remove:
        shutil.rmtree(folder / remove)
    return folder
