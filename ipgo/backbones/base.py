"""The backbone protocol: the only interface the module, sampler and export see of a model family.

A backbone owns the frozen parts of a text-to-image model (tokenizer, text encoder,
denoiser, VAE, scheduler config). Construction is cheap and only checks the model source;
`load_tokenizer()` loads the tokenizer alone (so prompts can be checked before any weights
load), `load()` the weights. Backbones are `nn.Module`s so that Lightning moves them.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ipgo.caching import cached
from ipgo.errors import ConfigError, UserError

DType = Literal["float32", "float16", "bfloat16"]
ENCODING_CACHE_BYTES = 2 * 2**30
"""Host memory each process may hold in encoded prompts (see `Backbone.encode`)."""
TooLong = Literal["error", "truncate"]


@dataclass
class PromptEmbeds:
    """A batch of encoded prompts.

    hidden: (B, S, D) text-encoder states over the prompt padded to the model's length S.
    lengths: (B,) real tokens per prompt, BOS and EOS included (where learned tokens go around).
    pooled: (B, P) pooled text embedding, for families that use one (SDXL, SD 3).
    """

    hidden: Tensor
    lengths: Tensor
    pooled: Tensor | None = None


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: token states (B, S', D), an optional pooled (B, P), and an optional
    mask (B, S') of the states cross-attention may see (rows of different lengths in one batch; None: all)."""

    hidden: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None

    def repeat_interleave(self, n: int) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, 0)
        mask = None if self.mask is None else self.mask.repeat_interleave(n, 0)
        return Conditioning(self.hidden.repeat_interleave(n, 0), pooled, mask)

    def detach(self) -> Conditioning:
        return Conditioning(self.hidden.detach(), None if self.pooled is None else self.pooled.detach(), self.mask)

    @staticmethod
    def cat(first: Conditioning, second: Conditioning) -> Conditioning:
        """Batch-concatenate (unconditional first, as diffusers pipelines do)."""
        pooled = None if first.pooled is None else torch.cat([first.pooled, second.pooled])
        masks = [c.mask if c.mask is not None else torch.ones(c.hidden.shape[:2], dtype=torch.bool,
                                                              device=c.hidden.device) for c in (first, second)]
        mask = None if first.mask is None and second.mask is None else torch.cat(masks)
        return Conditioning(torch.cat([first.hidden, second.hidden]), pooled, mask)


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model id or local folder that cannot be loaded."""


def looks_like_path(model: str) -> bool:
    """True for strings that can only be a local folder (not a `org/name` hub id)."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep in model and os.path.exists(model)
        or os.path.isdir(model)
    )


def check_model_source(model: str, marker: str = "model_index.json") -> None:
    """Fail fast on a local model folder that is missing or incomplete (hub ids pass)."""
    if not model:
        raise ModelNotFoundError("no model given: pass a hub id like 'org/name' or a local folder")
    if not looks_like_path(model):
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model folder {str(path)!r} does not exist. Pass an existing diffusers folder "
            "(one with model_index.json, as written by `pipeline.save_pretrained(...)`) or a hub id."
        )
    if marker and not (path / marker).is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a diffusers model folder: {marker} is missing. Point to the folder "
            "that `save_pretrained` wrote (it holds model_index.json, unet/, vae/, text_encoder/ ...)."
        )


def load_error(model: str, what: str, error: Exception) -> ModelNotFoundError:
    """A readable error for a failed `from_pretrained` of `what` from `model`."""
    original = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if looks_like_path(os.path.expanduser(model)):
        return ModelNotFoundError(
            f"could not load the {what} of the local folder {model!r}: its files are missing or incomplete. Compare "
            "it with a folder that `pipeline.save_pretrained(...)` writes (model_index.json and a subfolder per part), "
            f"or download the model again. Original error: {original}"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return ModelNotFoundError(
        f"could not load the {what} of {model!r}: it is not a local folder and was not found in the "
        f"Hugging Face cache{' (HF_HUB_OFFLINE is set)' if offline else ' or on the Hub'}. Download it "
        "on a machine with internet (`hf download "
        f"{model}`) or pass a local folder written by `save_pretrained`"
        f"{'' if offline else ' (without a network, HF_HUB_OFFLINE=1 skips the retries)'}. Original error: {original}"
    )


def torch_dtype(name: DType) -> torch.dtype:
    """torch dtype from its name."""
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16") from None


class PromptTooLongError(UserError, ValueError):
    """A prompt that does not fit beside the learned tokens."""


def check_prompt_lengths(
    prompts: Sequence[str], lengths: Sequence[int], budget: int, reserved: int, too_long: TooLong,
    negative: bool = False,
) -> None:
    """Apply the too-long policy: raise on the first prompt over budget, or warn and let it be cut. Negative prompts
    (`negative`) are cut to the conditioning's length as diffusers pipelines cut them, with a warning."""
    over = [(i, p, n) for i, (p, n) in enumerate(zip(prompts, lengths)) if n > budget]
    if not over:
        return
    i, prompt, n = over[0]
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    if negative:
        warnings.warn(f"negative prompt {i + 1} ({shown!r}) has {n} tokens, more than the {budget} CLIP positions "
                      f"of the conditioning: truncating it to {budget} tokens (its end token kept), as the pipeline "
                      "does", stacklevel=4)
        return
    distinct = len({p for _, p, _ in over})
    what = (
        f"prompt {i + 1} ({shown!r}) has {n} tokens but only {budget} fit beside the {reserved} learned tokens"
        + (f" ({distinct} prompts are too long)" if distinct > 1 else "")
    )
    if too_long == "error":
        raise PromptTooLongError(
            f"{what}. Shorten the prompt; or, when training, learn fewer tokens (model.tokens.n_prefix / "
            "n_suffix) or set model.too_long=truncate to cut it."
        )
    if too_long == "truncate":
        warnings.warn(f"{what}: truncating to {budget} tokens (model.too_long=truncate).", stacklevel=3)
        return
    raise ConfigError(f"unknown too_long policy {too_long!r}; choose 'error' or 'truncate'")


@torch.no_grad()
def encode_clip(
    tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str], budget: int, max_length: int,
    device: torch.device, penultimate: bool = False, convert: Callable[[list[str], Any], list[str]] | None = None,
) -> tuple[Tensor, list[int], Tensor | None]:
    """CLIP text states (B, S, D) on `device` of prompts cut to `budget` tokens and padded to `max_length`, as
    diffusers pipelines encode them (no attention mask); the real lengths; the projected pooled
    embedding when the encoder has a projection (else None). `convert`: a pipeline's `maybe_convert_prompt`,
    which spells out its multi-vector textual-inversion tokens for this tokenizer first, as the pipeline does."""
    texts = convert(list(prompts), tokenizer) if convert is not None else list(prompts)
    ids = tokenizer(texts, truncation=True, max_length=budget).input_ids
    pad = tokenizer.pad_token_id
    padded = torch.tensor([row + [pad] * (max_length - len(row)) for row in ids], device=device)
    out = text_encoder(padded, output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    return hidden.to(device), [len(row) for row in ids], None if pooled is None else pooled.to(device)


class Backbone(nn.Module, ABC):
    """A frozen text-to-image model behind one small protocol.

    Subclasses name their parts, load them, and implement `_encode_batch`, `negative`,
    `latent_shape`, `denoise` and `decode`; this base class caches prompt encodings and applies
    the too-long policy.

    Args:
        model: hub id or local folder written by `save_pretrained`; "tiny:..." names a built-in tiny model.
        dtype: dtype of the frozen weights; learned tokens stay float32.
        revision: hub revision.
        variant: weight variant, e.g. "fp16".
        gradient_checkpointing: recompute the denoiser's and VAE's activations in the backward pass.
    """

    family: ClassVar[str]
    """Model family written into token files ("sd", "sdxl", "sd3")."""
    pipeline_class: ClassVar[str]
    """The family's diffusers pipeline class (as a model's model_index.json names it)."""
    pipeline_parts: ClassVar[tuple[str, ...]]
    """Attribute names shared with the family's diffusers pipeline."""
    denoiser_part: ClassVar[str] = "unet"
    """The attribute holding the denoiser (UNet or transformer)."""
    penultimate_states: ClassVar[bool] = False
    """Whether the conditioning takes the CLIP encoders' second-to-last hidden states (SDXL, SD 3)."""
    masks_cross_attention: ClassVar[bool] = False
    """Whether `denoise` honours `Conditioning.mask` (UNets do: prompts of different lengths share a batch)."""
    unused_last_layer: ClassVar[tuple[str, ...]] = ()
    """Text encoders whose last layer feeds neither the states nor a pooled embedding (SDXL's first)."""
    tokenizer_parts: ClassVar[tuple[str, ...]]
    """The tokenizers `load_tokenizer` loads (the cheap parts needed to check prompts)."""

    def __init__(
        self,
        model: str,
        dtype: DType = "float32",
        revision: str | None = None,
        variant: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from ipgo.testing import is_tiny

        if not is_tiny(model):
            check_model_source(model)
        torch_dtype(dtype)
        self.model = model
        self.dtype_name = dtype
        self.revision = revision
        self.variant = variant
        self.gradient_checkpointing = gradient_checkpointing
        for part in self.pipeline_parts:
            setattr(self, part, None)
        self._scheduler_config: dict[str, Any] | None = None
        self._pipeline_config: dict[str, Any] = {}
        self._cache: dict[tuple[str, int, int], tuple[Tensor, int, int, Tensor | None]] = {}
        self._execution_device: torch.device | None = None
        self._convert_prompt: Callable[[list[str], Any], list[str]] | None = None

    @classmethod
    def from_pipeline(cls, pipe: Any) -> Backbone:
        """Wrap the components of a loaded diffusers pipeline (nothing is reloaded)."""
        backbone = cls.__new__(cls)
        nn.Module.__init__(backbone)
        backbone.model = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))
        dtypes = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
        backbone.dtype_name = dtypes.get(getattr(pipe, "dtype", torch.float32), "float32")
        backbone.revision = backbone.variant = None
        backbone.gradient_checkpointing = False
        for part in cls.pipeline_parts:
            setattr(backbone, part, getattr(pipe, part, None))
        backbone._scheduler_config = dict(pipe.scheduler.config)
        backbone._pipeline_config = dict(pipe.config)
        backbone._cache = {}
        # where the pipeline runs its models: with CPU offload the weights' own device is "meta" or the CPU
        backbone._execution_device = getattr(pipe, "_execution_device", None)
        # textual-inversion embeddings loaded into the pipeline: their prompt spelling, as the pipeline encodes it
        backbone._convert_prompt = getattr(pipe, "maybe_convert_prompt", None)
        return backbone

    # -- loading ----------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where weights are read from: the model (a local folder with "~" expanded), or the folder of a "tiny:..."
        model."""
        from ipgo.testing import resolve_source

        return resolve_source(os.path.expanduser(self.model))

    def _from_pretrained(self, cls: Any, subfolder: str, what: str, **kwargs: Any) -> Any:
        try:
            return cls.from_pretrained(self.source, subfolder=subfolder, revision=self.revision, **kwargs)
        except OSError as error:
            raise load_error(self.model, what, error) from error

    def _load_tokenizer(self, subfolder: str) -> Any:
        from transformers import AutoTokenizer

        try:
            tokenizer = self._from_pretrained(AutoTokenizer, subfolder, subfolder)
        except ValueError as error:  # transformers' answer to a local subfolder without tokenizer files
            folder = Path(self.source) / subfolder
            if not looks_like_path(self.source) or folder.is_dir() and any(folder.iterdir()):
                raise  # e.g. a slow tokenizer that needs sentencepiece: transformers' own message says so
            raise load_error(self.model, subfolder, error) from error
        if len(tokenizer) <= 3:  # transformers 5 builds a 2-token tokenizer when no files are found
            raise load_error(self.model, subfolder, OSError("no tokenizer files were found"))
        return tokenizer

    def _load_weights(self, cls: Any, subfolder: str, what: str, dtype: torch.dtype | None = None) -> nn.Module:
        part = self._from_pretrained(cls, subfolder, what, dtype=dtype or self.dtype, variant=self.variant)
        return part.requires_grad_(False).eval()

    def _check_unet(self) -> None:
        """Refuse a UNet the sampler cannot run, from its config (before any weights load)."""
        from diffusers import UNet2DConditionModel

        try:
            config = UNet2DConditionModel.load_config(self.source, subfolder="unet", revision=self.revision)
        except OSError as error:
            raise load_error(self.model, "UNet", error) from error
        if config.get("time_cond_proj_dim") is not None:
            raise UserError(
                f"{self.model!r} has a guidance-distilled UNet (time_cond_proj_dim is set, as in LCM models), which "
                "its pipeline samples without classifier-free guidance and with a guidance embedding that ipgo's "
                "sampler does not give: use the base model it was distilled from"
            )
        channels = config.get("in_channels", 4), config.get("out_channels", 4)  # UNet2DConditionModel's defaults
        if channels[0] != channels[1]:
            raise UserError(
                f"{self.model!r} has a UNet that takes {channels[0]} channels and returns {channels[1]}: an "
                "inpainting or image-editing model (its pipeline adds a mask or an image to the latents). ipgo "
                "samples from noise alone: use the text-to-image model it was made from"
            )

    def _load_configs(self) -> None:
        from diffusers import DDIMScheduler, DiffusionPipeline

        try:
            self._scheduler_config = dict(
                DDIMScheduler.load_config(self.source, subfolder="scheduler", revision=self.revision)
            )
            self._pipeline_config = dict(DiffusionPipeline.load_config(self.source, revision=self.revision))
        except OSError as error:
            raise load_error(self.model, "scheduler config", error) from error
        self._check_family()

    def _check_family(self) -> None:
        """Refuse a model of another family than this backbone's, from its model_index.json."""
        from ipgo.backbones import family_of_pipeline

        found = self._pipeline_config.get("_class_name")
        other = family_of_pipeline(found)
        if other is not None and other.family != self.family:
            raise UserError(
                f"{self.model!r} is a {found} model, and {type(self).__name__} runs {self.pipeline_class} models: "
                f"use --model.backbone ipgo.backbones.{other.__name__} (in a config: class_path: "
                f"ipgo.backbones.{other.__name__})"
            )
        if (self._pipeline_config.get("text_encoder") or [None])[0] is None:
            raise UserError(
                f"{self.model!r} has no text_encoder (its model_index.json names none, as an SDXL refiner's does): "
                "ipgo's tokens condition the first text encoder's states too: use the base model"
            )

    def load_tokenizer(self) -> None:
        """Load the tokenizer(s) only (cheap), so prompts can be checked before weights load."""
        if self._scheduler_config is None:
            self._load_configs()  # the model's family first: another family's tokenizers can fail obscurely
        for part in self.tokenizer_parts:
            if getattr(self, part) is None:
                setattr(self, part, self._load_tokenizer(part))

    @abstractmethod
    def load(self) -> None:
        """Load every frozen part (idempotent)."""

    def train(self, mode: bool = True) -> Backbone:
        """Frozen parts stay in eval mode whatever the trainer asks."""
        return super().train(False)

    def _loaded(self, part: Any) -> Any:
        if part is None:
            raise RuntimeError(f"{type(self).__name__}({self.model!r}) is not loaded yet: call .load() first")
        return part

    def text_encoders(self) -> list[str]:
        """The text encoders this model has (SD 3 may be loaded without T5: zeros take the place of its states)."""
        return [part for part in self.pipeline_parts
                if part.startswith("text_encoder") and getattr(self, part, None) is not None]

    def weights_fingerprint(self) -> dict[str, dict[str, list[float]]]:
        """Four values of every linear layer the learned tokens meet, per part (`text_encoder`, `text_encoder_2`,
        ..., `denoiser`) and layer (a short hash of its name): each text encoder up to the layers its states and
        pooled embedding come from, and the denoiser. Token files record them, so tokens used with other weights of
        the same family and width (a fine-tune, a LoRA fused or not, another checkpoint) are noticed (see
        `same_weights`). Empty for weights not in memory (offloaded to the meta device)."""
        parts = [part for part in self.pipeline_parts if part.startswith("text_encoder")] + [self.denoiser_part]
        fingerprint = {}
        for part in parts:
            model = getattr(self, part)
            if model is None:
                continue
            unused = set()
            layers = next((m for name, m in model.named_modules() if name.endswith("encoder.layers")), None)
            if part in self.unused_last_layer and layers is not None:  # SDXL's first encoder: second-to-last states
                unused = {id(m) for m in layers[-1].modules()}
            linear = [(name, m.weight) for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and id(m) not in unused]
            if any(weight.device.type == "meta" for _, weight in linear):
                return {}
            if not linear:
                continue
            device = linear[0][1].device  # one transfer for the part, wherever its layers are
            picks = torch.stack([weight.detach().flatten()[torch.linspace(0, weight.numel() - 1, 4).round().long()
                                 .to(weight.device)].float().to(device) for _, weight in linear]).cpu().tolist()
            fingerprint["denoiser" if part == self.denoiser_part else part] = {
                layer_key(name): [float(f"{v:.6g}") for v in row] for (name, _), row in zip(linear, picks)}
        return fingerprint

    # -- prompts ----------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Length S of the CLIP token sequence the text encoder runs at (77)."""
        self.load_tokenizer()
        return int(self.tokenizer.model_max_length)

    @property
    def sequence_length(self) -> int:
        """Length of the whole conditioning sequence (more than `max_length` where T5 follows CLIP)."""
        return self.max_length

    def token_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Real tokens of each prompt without truncation, BOS and EOS included (multi-vector textual-inversion
        tokens spelt out, as the pipeline encodes them)."""
        self.load_tokenizer()
        texts = list(prompts)
        if self._convert_prompt is not None:
            texts = self._convert_prompt(texts, self.tokenizer)
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its "longer than the maximum" warning: ipgo says it better
        try:
            return [len(ids) for ids in self.tokenizer(texts, truncation=False).input_ids]
        finally:
            transformers_logging.set_verbosity(verbosity)

    def encode(self, prompts: Sequence[str], reserved: int = 0, too_long: TooLong = "error",
               negative: bool = False) -> PromptEmbeds:
        """Encode prompts (each once, then cached), leaving `reserved` positions for learned tokens (`negative`:
        negative prompts, cut to `max_length - reserved` tokens with a warning)."""
        budget = self.max_length - reserved
        length = self.sequence_length  # SD 3's T5 length can be set after loading

        def encode_missing(keys: list[tuple[str, int, int]]) -> list[tuple[Tensor, int, int, Tensor | None]]:
            missing = [key[0] for key in keys]
            hidden, lengths, pooled = self._encode_batch(missing, budget)
            # Kept on the CPU: thousands of prompts' states would otherwise stay on the GPU for the whole run.
            return [(hidden[i].cpu(), lengths[i], full, None if pooled is None else pooled[i].cpu())
                    for i, full in enumerate(self.token_lengths(missing))]

        rows = cached(self._cache, [(p, budget, length) for p in prompts], encode_missing, limit=self._cache_entries())
        check_prompt_lengths(prompts, [row[2] for row in rows], budget, reserved, too_long, negative)
        device, pooled_rows = self._device(), [row[3] for row in rows]
        return PromptEmbeds(
            torch.stack([row[0] for row in rows]).to(device),
            torch.tensor([row[1] for row in rows], device=device),
            None if pooled_rows[0] is None else torch.stack(pooled_rows).to(device),
        )

    def _cache_entries(self) -> int:
        """How many prompts' states the encoding cache keeps: 4,096, or fewer where they would pass
        `ENCODING_CACHE_BYTES` (SD 3's 333 x 4,096 states are 5.5 MB a prompt in float32)."""
        width = self.conditioning_width or 4096
        return max(64, min(4096, ENCODING_CACHE_BYTES // (self.sequence_length * width * 4)))

    @abstractmethod
    def _encode_batch(self, prompts: list[str], budget: int) -> tuple[Tensor, list[int], Tensor | None]:
        """States (B, sequence_length, D), real lengths and pooled (B, P) or None; see `encode_clip`."""

    @abstractmethod
    def negative(self, batch: int, total: int, prompts: Sequence[str] | None = None) -> Conditioning:
        """The unconditional branch (no learned tokens) cut to `total` tokens, from negative prompts if given."""

    def _device(self) -> torch.device:
        """Where prompt states are computed and gathered."""
        if self._execution_device is not None:
            return self._execution_device
        return next(self._loaded(self.text_encoder).parameters()).device

    # -- images -----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width D of the conditioning states the learned tokens live in."""
        return int(self.encode([""]).hidden.shape[-1])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The model's own scheduler config, from which samplers build their scheduler."""
        return self._loaded(self._scheduler_config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.part_config("vae")["block_out_channels"]) - 1)

    def part_config(self, part: str) -> dict[str, Any]:
        """The config of a component ("vae", "unet", "transformer"): the loaded one's, or its config.json read
        without weights."""
        loaded = getattr(self, part, None)
        if loaded is not None:
            return dict(loaded.config)
        from diffusers import AutoencoderKL  # any ConfigMixin reads a subfolder's config.json

        try:
            return dict(AutoencoderKL.load_config(self.source, subfolder=part, revision=self.revision))
        except OSError as error:
            raise load_error(self.model, f"{part} config", error) from error

    @property
    def conditioning_width(self) -> int | None:
        """Width D of the states the denoiser attends to (the learned tokens' width), from its config."""
        config = self.part_config(self.denoiser_part)
        width = config.get("joint_attention_dim") or config.get("cross_attention_dim")
        return width if isinstance(width, int) else None

    def check_sampler(self, scheduler: str, height: int, width: int) -> None:
        """Refuse a scheduler or an image size that does not fit the model, from its configs (before any weights
        load)."""
        from ipgo.sampling import make_scheduler

        if self._scheduler_config is None:
            self._load_configs()
        make_scheduler(scheduler, self.scheduler_config)
        self._check_size(height, width)

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: Sequence[int], device: torch.device) -> None:
        """Set `scheduler`'s timesteps for latents of `latent_shape`, as the family's pipeline does."""
        scheduler.set_timesteps(num_steps, device=device)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the initial noise for images of height x width."""
        factor = self._check_size(height, width)
        channels = int(self._loaded(getattr(self, self.denoiser_part)).config.in_channels)
        return (batch, channels, height // factor, width // factor)

    @abstractmethod
    def denoise(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's prediction for latents under a conditioning."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from latents (differentiable)."""

    def _check_size(self, height: int, width: int) -> int:
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ConfigError(f"model.sampler.height and width must be multiples of {factor} for {self.model!r}, got "
                              f"{height} x {width}")
        return factor

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen weights."""
        return torch_dtype(self.dtype_name)


def model_fingerprint(model: str) -> str | None:
    """For a local model folder: a hash of its files' names, its config files and its weight files' sizes, which a
    moved or copied folder keeps (so a run resumes from it); None for hub ids and tiny names."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if name.startswith("."):  # hub download metadata and the like
            continue
        digest.update(name.encode())
        digest.update(file.read_bytes() if file.suffix in (".json", ".txt") else str(file.stat().st_size).encode())
    return digest.hexdigest()


def layer_key(name: str) -> str:
    """A short stable key for a layer's name in `Backbone.weights_fingerprint` (token files stay small); a LoRA
    adapter's layers (peft's `lora_A`, `lora_B`) are marked `lora:`."""
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"lora:{digest}" if "lora_" in name else digest


def same_weights(recorded: dict[str, list[float]], current: dict[str, list[float]]) -> bool:
    """Whether two fingerprints of a part (`Backbone.weights_fingerprint`) are of the same weights, allowing for a
    cast to float16 or bfloat16 (about 0.4% per value). Layers only one side has are left out (e.g. the fused
    projections `fuse_qkv_projections` adds), unless they are a LoRA adapter's, which change the images; with no
    layer in common the weights are not the same."""
    common = recorded.keys() & current.keys()
    if not common or any(key.startswith("lora:") and key not in recorded for key in current):
        return False
    for key in common:
        old, new = recorded[key], current[key]
        scale = max(max((abs(v) for v in old), default=0.0), 1e-8)
        if len(old) != len(new) or any(abs(a - b) > 0.02 * scale for a, b in zip(old, new)):
            return False
    return True


def portable_model_name(model: str) -> str:
    """A local folder as an absolute path (token files are read from other working directories); hub ids and
    tiny names as they are."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
