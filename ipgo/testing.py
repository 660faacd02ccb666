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
    import open_clip

    config = path / f"{TINY_OPEN_CLIP_NAME}.json"
    config.write_text(json.dumps(_OPEN_CLIP, indent=2))
    open_clip.add_model_config(config)
    model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None)
    torch.save(model.state_dict(), path / "hps.pt")


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


TINY_SOURCES: dict[str, Callable[[], Path]] = {
    "tiny:sd1": tiny_sd_path,
    "tiny:clip": tiny_clip_path,
    "tiny:aesthetic-head": tiny_aesthetic_head_path,
    "tiny:hps": tiny_hps_checkpoint_path,
}
"""Names that configs may use instead of a hub id or path: the tiny models above, built on first use."""


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
