"""Token files and their use in ordinary diffusers pipelines.

A token file is a `.safetensors` file holding the learned tokens as vectors in the text
encoder's output space:

    prefix  (n_prefix, D)  suffix  (n_suffix, D)         one shared set (prompt-batch)
    prefix  (N, n_prefix, D)  suffix  (N, n_suffix, D)   one set per prompt (prompt-wise)

and string metadata: format and version, method, mode, model family, base model, hidden
size, sequence layout, too-long policy, token counts, rewards, sampler settings, training
seeds and ipgo version. The prompts (prompt-wise: the prompts in order; prompt-batch: the
training prompts) are uint8 tensors `prompts` / `train_prompts` holding a UTF-8 JSON list:
safetensors caps its metadata at 100 MB, which a prompt set of a million lines can exceed.
Such tokens cannot be written as textual inversion (that format is for the *input*
embedding table); they reach a pipeline through `prompt_embeds` /
`negative_prompt_embeds`, built by `token_embeds`:

    pipe = StableDiffusionPipeline.from_pretrained(...)
    ipgo.apply_tokens(pipe, "runs/prompt_batch/tokens.safetensors")   # shared tokens: any prompt
    image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ipgo.backbones import FAMILIES, Backbone, backbone_for_pipeline
from ipgo.backbones.base import check_prompt_lengths, same_weights
from ipgo.errors import UserError
from ipgo.files import atomic_path
from ipgo.inject import conditioning

FORMAT = "ipgo-tokens"
FORMAT_VERSION = "2"  # 2: prompt lists in tensors, SD 3's T5 states kept in place
READABLE_VERSIONS = ("1", "2")


class TokenFileError(UserError, ValueError):
    """A token file that is unreadable or does not fit the pipeline it is applied to."""


@dataclass
class TokenFile:
    """Learned tokens and what they were made for."""

    prefix: Tensor
    suffix: Tensor
    family: str
    base_model: str
    hidden_size: int
    layout: str = "padded"
    too_long: str = "error"
    mode: str = "prompt-batch"
    prompts: list[str] | None = None
    train_prompts: list[str] | None = None
    """Prompt-batch: the prompts the shared tokens were trained on (evaluation keeps them apart)."""
    prompt_attention: bool = False
    """IPGO+: the shared tokens attend to each prompt's states before they are placed."""
    extra: dict[str, str] = field(default_factory=dict)
    """Further metadata (rewards, sampler, seeds, versions) kept as strings."""

    @property
    def per_prompt(self) -> bool:
        return self.prompts is not None

    def tokens_for(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prefix (B, n_p, D) and suffix (B, n_s, D) for these prompts."""
        if not self.per_prompt:
            b = len(prompts)
            return self.prefix.expand(b, -1, -1), self.suffix.expand(b, -1, -1)
        position = {" ".join(p.split()): i for i, p in enumerate(self.prompts)}  # as tokenizers see spacing
        prompts = [" ".join(p.split()) for p in prompts]
        unknown = [p for p in prompts if p not in position]
        if unknown:
            known = ", ".join(repr(p) for p in self.prompts[:3])
            raise TokenFileError(
                f"this prompt-wise token file has no tokens for {unknown[0]!r}; it was trained for "
                f"{len(self.prompts)} prompts ({known}, ...). Use one of those prompts exactly, or a "
                "prompt-batch token file for new prompts."
            )
        index = torch.tensor([position[p] for p in prompts])
        return self.prefix[index], self.suffix[index]

    def check_fits(self, backbone: Backbone) -> None:
        """Raise a clear error if the tokens were made for another kind of model; warn if for other weights of the
        same kind (a fine-tune or another checkpoint: the tokens apply, but the images differ from training's)."""
        family, hidden_size, model = backbone.family, backbone.hidden_size, backbone.model
        if family != self.family or hidden_size != self.hidden_size:
            raise TokenFileError(
                f"these tokens were made for a {self.family!r} model with hidden size {self.hidden_size} "
                f"(base model {self.base_model!r}), but the pipeline is a {family!r} model with hidden "
                f"size {hidden_size}{f' ({model!r})' if model else ''}. Use a token file trained for "
                "this model family and text encoder."
            )
        trained, here = json.loads(self.extra.get("text_encoders", "null")), backbone.text_encoders()
        if trained is not None and set(trained) != set(here):  # files before the sixteenth session: not checked
            missing, extra = sorted(set(trained) - set(here)), sorted(set(here) - set(trained))
            raise TokenFileError(
                f"these tokens were learnt with the text encoders {_and(trained)}, and this pipeline has "
                f"{_and(here)}: in place of a missing encoder's states the pipeline conditions on zeros, which the "
                "tokens were not learnt with. Load the pipeline with the same encoders ("
                + (f"do not pass {missing[0]}=None to from_pretrained; or the model lacks it: use the one the tokens "
                   "were learnt on" if missing else f"pass {extra[0]}=None to from_pretrained") + ")"
            )
        # files before the fourteenth session kept a sample of two layers ("weights_signature"), not checked now
        recorded = json.loads(self.extra.get("weights_fingerprint", "{}"))
        current = backbone.weights_fingerprint() if recorded else {}
        differing = [part.replace("_", " ") for part, values in recorded.items()
                     if part in current and not same_weights(values, current[part])]
        if differing:
            warnings.warn(
                f"these tokens were learnt on {self.base_model!r}, and this pipeline's {_and(differing)} "
                f"weights differ from that model's{f' ({model!r})' if model else ''}: the tokens apply, but its "
                "images will differ from those the tokens were optimised for. Load the base model to reproduce them.",
                UserWarning, stacklevel=1)  # issued here: shown once, not once per call of apply_tokens and its kin


def _and(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def starting_tokens(tokens: TokenFile, prompts: Sequence[str]) -> TokenFile:
    """The tokens of `tokens` for `prompts` as `ipgo.fit` initialised them, before its first step (from the token
    settings and seed the file records): what adding tokens at all does, apart from what optimising them did."""
    from ipgo.tokens import TokenConfig, TokenSets

    if "tokens" not in tokens.extra:
        raise TokenFileError("this token file records no token settings (it was not written by ipgo.fit), so its "
                             "starting tokens cannot be rebuilt")
    config = TokenConfig(**json.loads(tokens.extra["tokens"]))
    if tokens.per_prompt:
        position = {" ".join(p.split()): i for i, p in enumerate(tokens.prompts)}
        kept = list(dict.fromkeys(" ".join(p.split()) for p in prompts))
        ids = [position[p] for p in kept]
    else:
        kept, ids = None, [0]
    with torch.no_grad():
        prefix, suffix = TokenSets.initial(config, tokens.hidden_size, ids)(range(len(ids)))
    if kept is None:
        prefix, suffix = prefix[0], suffix[0]
    return replace(tokens, prefix=prefix, suffix=suffix, prompts=kept)


def save_tokens(path: str | os.PathLike, tokens: TokenFile) -> Path:
    """Write a token file atomically."""
    from ipgo import __version__

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "ipgo",
        "family": tokens.family,
        "base_model": tokens.base_model,
        "hidden_size": str(tokens.hidden_size),
        "layout": tokens.layout,
        "too_long": tokens.too_long,
        "mode": tokens.mode,
        "prompt_attention": json.dumps(tokens.prompt_attention),
        "n_prefix": str(tokens.prefix.shape[-2]),
        "n_suffix": str(tokens.suffix.shape[-2]),
        **tokens.extra,
        **({"t5_states": "kept"} if tokens.family == "sd3" else {}),  # see load_tokens
        "ipgo_version": __version__,  # of the writer
    }
    tensors = {
        "prefix": tokens.prefix.detach().float().cpu().contiguous(),
        "suffix": tokens.suffix.detach().float().cpu().contiguous(),
    }
    for name, prompts in (("prompts", tokens.prompts), ("train_prompts", tokens.train_prompts)):
        if prompts is not None:  # UTF-8, not escapes: those would double a CJK prompt set
            text = json.dumps(prompts, ensure_ascii=False).encode()
            tensors[name] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_tokens(path: str | os.PathLike) -> TokenFile:
    """Read a token file written by `save_tokens`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokens.safetensors"
    if not path.is_file():
        raise TokenFileError(f"token file {str(path)!r} does not exist (a run folder holds tokens.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise TokenFileError(f"{str(path)!r} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != FORMAT or "prefix" not in tensors or "suffix" not in tensors:
        raise TokenFileError(f"{str(path)!r} is not an ipgo token file (no {FORMAT!r} metadata)")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise TokenFileError(
            f"{str(path)!r} has token-file format {metadata.get('format_version')}; this ipgo reads "
            f"{FORMAT_VERSION}. Upgrade ipgo."
        )
    required = ("family", "base_model", "hidden_size", "layout", "too_long", "mode", "n_prefix", "n_suffix")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise TokenFileError(f"{str(path)!r} is damaged: its metadata lacks {', '.join(missing)}. Export the tokens "
                             "again from their run.")
    allowed = {"family": tuple(FAMILIES), "layout": ("padded", "unpadded"), "too_long": ("error", "truncate"),
               "mode": ("prompt-wise", "prompt-batch")}
    for key, values in allowed.items():
        if metadata[key] not in values:
            raise TokenFileError(f"{str(path)!r} has {key} {metadata[key]!r}, which this ipgo does not know (it knows "
                                 f"{', '.join(values)}): a newer ipgo wrote it, or it is damaged")
    known = {"format", "format_version", "family", "base_model", "hidden_size", "layout", "too_long", "mode",
             "prompts", "n_prefix", "n_suffix", "prompt_attention",
             "train_prompts"}
    try:
        tokens = TokenFile(
            prefix=tensors["prefix"],
            suffix=tensors["suffix"],
            family=metadata["family"],
            base_model=metadata["base_model"],
            hidden_size=int(metadata["hidden_size"]),
            layout=metadata["layout"],
            too_long=metadata["too_long"],
            mode=metadata["mode"],
            prompts=_prompt_list("prompts", tensors, metadata),
            prompt_attention=json.loads(metadata.get("prompt_attention", "false")),
            train_prompts=_prompt_list("train_prompts", tensors, metadata),
            extra={k: v for k, v in metadata.items() if k not in known},
        )
        int(metadata["n_prefix"]), int(metadata["n_suffix"])  # numbers: _check_shapes reads them
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise TokenFileError(f"{str(path)!r} is damaged: its metadata does not parse ({error}). Export the tokens "
                             "again from their run.") from error
    if tokens.family == "sd3" and tokens.layout == "unpadded":
        raise TokenFileError(f"{str(path)!r} is an SD 3 file with layout unpadded, which would drop every T5 state; "
                             "ipgo trains SD 3 with layout padded only")
    if tokens.family == "sd3" and metadata.get("t5_states") != "kept":
        raise TokenFileError(f"{str(path)!r} was made by an earlier ipgo, whose SD 3 conditioning dropped the last "
                             "T5 states for the learned tokens; this ipgo keeps them, so the tokens would give other "
                             "images than in training: optimise them again")
    _check_shapes(tokens, metadata, path)
    return tokens


def _prompt_list(name: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> list[str] | None:
    """A prompt list from its UTF-8 JSON tensor, or from the metadata (files of earlier versions); None if absent."""
    if name in tensors:
        return json.loads(bytes(tensors[name].numpy()).decode("utf-8"))
    return json.loads(metadata[name]) if name in metadata else None


def _check_shapes(tokens: TokenFile, metadata: dict[str, str], path: Path) -> None:
    """The tensors must be what the metadata says: width, token counts, one row per prompt-wise prompt."""
    expected = {"prefix": int(metadata["n_prefix"]), "suffix": int(metadata["n_suffix"])}
    rows = [len(tokens.prompts)] if tokens.per_prompt else []
    for name, tensor in (("prefix", tokens.prefix), ("suffix", tokens.suffix)):
        shape = (*rows, expected[name], tokens.hidden_size)
        if tuple(tensor.shape) != shape:
            raise TokenFileError(
                f"{str(path)!r} is damaged: its {name} has shape {tuple(tensor.shape)}, but its metadata "
                f"({tokens.mode}, {len(tokens.prompts or [])} prompts, hidden size {tokens.hidden_size}) needs "
                f"{shape}. Export the tokens again from their run."
            )


def check_prompts_fit(tokens: TokenFile, prompts: Sequence[str], model: str | None = None) -> None:
    """Refuse prompts too long to fit beside the tokens (with too_long=error), before any weights load: reads only
    the tokenizers of `model` (default: the tokens' base model)."""
    if tokens.too_long != "error":
        return
    backbone = FAMILIES[tokens.family](model or tokens.base_model,
                                       revision=None if model else tokens.extra.get("revision"))
    reserved = tokens.prefix.shape[-2] + tokens.suffix.shape[-2]
    check_prompt_lengths(prompts, backbone.token_lengths(prompts), backbone.max_length - reserved, reserved, "error")


def check_tokens(pipe: Any, tokens: TokenFile) -> None:
    """Refuse, before anything renders, tokens made for another model (family, hidden size) than `pipe`'s."""
    backbone = backbone_for_pipeline(pipe)
    tokens.check_fits(backbone)


@torch.no_grad()
def token_embeds(
    pipe: Any,
    tokens: TokenFile | str | os.PathLike,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """The embedding arguments of `pipe(...)` (`prompt_embeds`, `negative_prompt_embeds` and, for
    SDXL and SD 3, the pooled pair) with the learned tokens applied."""
    tokens = tokens if isinstance(tokens, TokenFile) else load_tokens(tokens)
    tokens.check_fits(backbone_for_pipeline(pipe))
    return _embeds(pipe, tokens, prompt, negative_prompt)


def _embeds(pipe: Any, tokens: TokenFile, prompt: str | Sequence[str],
            negative_prompt: str | Sequence[str] | None) -> dict[str, Tensor]:
    """`token_embeds` for tokens already checked against the pipeline (`apply_tokens` checks once, not per call)."""
    backbone = backbone_for_pipeline(pipe)
    if "max_sequence_length" in tokens.extra and hasattr(backbone, "max_sequence_length"):
        backbone.max_sequence_length = int(tokens.extra["max_sequence_length"])  # SD 3: the T5 length trained with
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = None
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise UserError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts; give one per prompt, "
                            "or a single string for all")
    prefix, suffix = tokens.tokens_for(prompts)
    cond, uncond, *_ = conditioning(backbone, prompts, prefix, suffix, tokens.layout, tokens.too_long, negatives,
                                    prompt_attention=tokens.prompt_attention)
    dtype = backbone.dtype
    embeds = {"prompt_embeds": cond.hidden.to(dtype), "negative_prompt_embeds": uncond.hidden.to(dtype)}
    if cond.pooled is not None:
        embeds["pooled_prompt_embeds"] = cond.pooled.to(dtype)
        embeds["negative_pooled_prompt_embeds"] = uncond.pooled.to(dtype)
    return embeds


def apply_tokens(pipe: Any, tokens: TokenFile | str | os.PathLike) -> Any:
    """Make `pipe(prompt, ...)` use the learned tokens; `remove_tokens(pipe)` undoes it. Returns `pipe`.

    Wraps the pipeline's `encode_prompt`: when it is asked to encode prompts, it is handed the
    embeddings from `token_embeds` instead, and they are repeated for `num_images_per_prompt` here (SD 3's
    `encode_prompt` repeats only the embeddings it computes itself).
    """
    tokens = tokens if isinstance(tokens, TokenFile) else load_tokens(tokens)
    backbone = backbone_for_pipeline(pipe)
    tokens.check_fits(backbone)
    remove_tokens(pipe)
    original = pipe.encode_prompt
    signature = inspect.signature(original)

    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        arguments = call.arguments
        if arguments.get("prompt_embeds") is None and arguments.get("prompt") is not None:
            _refuse_unused(arguments, int(tokens.extra.get("max_sequence_length", 256)))
            _refuse_lora_scale(pipe, arguments.get("lora_scale"))
            with torch.no_grad():
                embeds = _embeds(pipe, tokens, arguments["prompt"], arguments.get("negative_prompt"))
            if arguments.get("negative_prompt_embeds") is not None:  # the caller's own negatives win
                embeds = {k: v for k, v in embeds.items() if not k.startswith("negative")}
            for name in ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"):
                if name in signature.parameters:
                    arguments[name] = None
            arguments.update(embeds)
            if "num_images_per_prompt" in signature.parameters:
                copies = arguments.get("num_images_per_prompt") or 1
                arguments["num_images_per_prompt"] = 1
                encoded = original(*call.args, **call.kwargs)
                # one row per prompt, repeated here; a caller's negatives already sized per image (as SD 3 takes
                # them, since its encode_prompt does not repeat them) stay as they are
                prompts = embeds["prompt_embeds"].shape[0]
                return tuple(x.repeat_interleave(copies, dim=0) if isinstance(x, Tensor) and x.shape[0] == prompts
                             else x for x in encoded)
        return original(*call.args, **call.kwargs)

    pipe.encode_prompt = encode_prompt
    pipe._ipgo_original_encode_prompt = original
    return pipe


def _refuse_unused(arguments: dict[str, Any], t5_length: int) -> None:
    """The tokens condition every encoder on `prompt` (and `negative_prompt`) at the T5 length they were learnt with
    (SD 3): other prompts, CLIP skips and T5 lengths would be dropped without a word, so they are refused. (The
    pipeline hands encode_prompt its default T5 length, 256, when the caller gives none: that one passes.)"""
    for name, main in (("prompt_2", "prompt"), ("prompt_3", "prompt"), ("negative_prompt_2", "negative_prompt"),
                       ("negative_prompt_3", "negative_prompt")):
        if arguments.get(name) is not None and arguments[name] != arguments.get(main):
            raise UserError(f"{name} differs from {main}: ipgo's tokens condition every text encoder on {main} "
                            f"alone, so {name} would be ignored; leave it out (or call remove_tokens(pipe) first)")
    length = arguments.get("max_sequence_length")
    if length is not None and length not in (t5_length, 256):
        raise UserError(f"max_sequence_length {length}: these tokens were learnt with SD 3's T5 length {t5_length}, "
                        "which they set for the pipeline; leave max_sequence_length out (or call remove_tokens(pipe) "
                        "first)")
    if arguments.get("clip_skip") is not None:
        raise UserError("clip_skip: ipgo's tokens were learnt on the text encoder's usual output, which clip_skip "
                        "would replace; leave it out (or call remove_tokens(pipe) first)")


def _refuse_lora_scale(pipe: Any, scale: float | None) -> None:
    """The pipeline scales its text encoders' LoRA layers inside encode_prompt, which the tokens' embeddings bypass:
    a scale other than 1 is refused where it would apply (a text encoder with LoRA layers)."""
    if scale is None or scale == 1.0:
        return
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    if any(any("lora_" in name for name, _ in encoder.named_modules()) for encoder in encoders if encoder is not None):
        raise UserError(f"a LoRA scale of {scale} (cross_attention_kwargs or joint_attention_kwargs 'scale'): ipgo's "
                        "tokens encode the prompt with the text encoders' LoRA layers at full strength, so the scale "
                        "would be ignored there; fuse the LoRA at that scale instead (pipe.fuse_lora(lora_scale="
                        f"{scale})) and leave the scale out")


def remove_tokens(pipe: Any) -> Any:
    """Undo `apply_tokens`. Returns `pipe`."""
    original = pipe.__dict__.pop("_ipgo_original_encode_prompt", None)
    if original is not None:
        pipe.__dict__.pop("encode_prompt", None)
    return pipe
