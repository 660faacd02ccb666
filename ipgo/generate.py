"""`python -m ipgo.generate`: render raw and tuned prompts on the same seeds through a diffusers pipeline.

    python -m ipgo.generate --tokens runs/demo --seeds 1000-1007 --out generated/

The pipeline is the family's ordinary diffusers pipeline with the token file applied
(`ipgo.apply_tokens`): the path a user takes, and the single source of truth for evaluation.
Scheduler, steps, guidance and size are the ones the tokens were trained with (from the
file's metadata). Writes `raw/` and `tuned/` PNGs, `grid.png` (a row per prompt for the first
16 prompts: raw seeds, then tuned seeds) and `images.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ipgo.backbones import FAMILIES, family_of_pipeline
from ipgo.data import read_prompts
from ipgo.errors import UserError, reported
from ipgo.export import (
    TokenFile,
    TokenFileError,
    apply_tokens,
    check_prompts_fit,
    check_tokens,
    load_tokens,
    remove_tokens,
)
from ipgo.files import atomic_path, check_output_folder, write_text
from ipgo.report import GRID_PROMPTS, as_uint8, progress_bar, save_before_after
from ipgo.sampling import make_scheduler

MAX_SEED = 2**32


class SeedError(UserError, ValueError):
    """Seeds that cannot be read, or that were used in training."""


def parse_seeds(text: str) -> list[int]:
    """Seeds from "0-7", "3,5,9" or a mix like "0-3,10"."""
    seeds: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise SeedError(f"cannot read the seeds {text!r}: use a range like 0-7, a list like 1,4,9, or both")
        if match.group(2) and int(match.group(2)) < int(match.group(1)):
            raise SeedError(f"the seed range {part} runs backwards: write {match.group(2)}-{match.group(1)}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high >= MAX_SEED:  # torch's generators take 64 bits, and best-of-N derives its candidates' seeds from these
            raise SeedError(f"the seed {high} is too large: give seeds below 2**32 ({MAX_SEED})")
        seeds += range(low, high + 1)
    if len(set(seeds)) != len(seeds):
        raise SeedError(f"the seeds {text!r} repeat a seed")
    return seeds


def training_seeds(tokens: TokenFile) -> set[int]:
    """The fixed seeds the tokens were optimised on (from the file's metadata)."""
    return set(json.loads(tokens.extra.get("seeds", "{}")).get("train", []))


def check_held_out(tokens: TokenFile, seeds: Sequence[int], allow_training_seeds: bool) -> list[int]:
    """Refuse seeds the tokens were trained on, unless allowed; returns the ones that were."""
    used = sorted(training_seeds(tokens) & set(seeds))
    if used and not allow_training_seeds:
        raise SeedError(
            f"seeds {used} were used to optimise these tokens, so images on them say nothing about new noise. "
            "Use other seeds, or pass --allow_training_seeds true to include them (they are flagged)."
        )
    return used


def sampler_settings(tokens: TokenFile) -> dict[str, Any]:
    """The sampler settings the tokens were trained with."""
    if "sampler" not in tokens.extra:
        raise UserError("this token file records no sampler settings; it was not written by ipgo.fit")
    return json.loads(tokens.extra["sampler"])


def call_settings(tokens: TokenFile) -> dict[str, Any]:
    """The pipeline-call arguments the tokens were trained with (steps, guidance, size; SD 3's T5 length):
    `pipe(prompt, **call_settings(tokens))`, with the scheduler `load_pipeline` sets, renders as training did."""
    settings = sampler_settings(tokens)
    return {"num_inference_steps": settings["num_steps"], "guidance_scale": settings["guidance_scale"],
            "height": settings["height"], "width": settings["width"],
            # SD 3: raw prompts too are encoded at the T5 length the tokens were trained with
            **{key: int(tokens.extra[key]) for key in ("max_sequence_length",) if key in tokens.extra}}


def rendering_dtype(tokens: TokenFile, device: str) -> str:
    """The dtype the tokens render in without --dtype: the one they were trained in, but float32 on a CPU for
    float16 runs (slow or missing kernels there)."""
    recorded = tokens.extra.get("dtype", "float32")
    return "float32" if recorded == "float16" and torch.device(device).type == "cpu" else recorded


def _recorded_dtype(tokens: TokenFile, device: str) -> str:
    """`rendering_dtype`, with a warning where it is not the one trained in."""
    dtype = rendering_dtype(tokens, device)
    if dtype != tokens.extra.get("dtype", "float32"):
        warnings.warn("the tokens were trained in float16, which the CPU does not run well: rendering in float32 "
                      "(images differ slightly from training; pass --dtype float16 to insist)", stacklevel=3)
    return dtype


def pipeline_config(tokens: TokenFile, model: str | None = None) -> dict[str, Any]:
    """The pipeline config (model_index.json) of the tokens' base model (or `model`), read without loading weights;
    refuses a model of another family than the tokens'."""
    import diffusers

    from ipgo.backbones.base import ModelNotFoundError, check_model_source, load_error
    from ipgo.testing import is_tiny, resolve_source

    name = model or tokens.base_model
    expected = FAMILIES[tokens.family].pipeline_class
    try:
        if not is_tiny(name):
            check_model_source(name)
        revision = tokens.extra.get("revision") if model is None else None
        config = getattr(diffusers, expected).load_config(resolve_source(name), revision=revision)
    except (ModelNotFoundError, OSError) as error:
        found = error if isinstance(error, ModelNotFoundError) else load_error(name, "pipeline", error)
        if model is None:  # the name came from the token file, not from the user
            raise ModelNotFoundError(f"the tokens' base model, as the token file names it: {found} If it has moved, "
                                     "pass its new place with --model.") from error
        raise found from error
    found = family_of_pipeline(config.get("_class_name"))
    if found is not None and found.family != tokens.family:  # as ipgo.fit's check: another family's pipeline
        raise TokenFileError(
            f"these tokens were made for a {tokens.family!r} model ({expected}), but {name!r} "
            f"is a {config.get('_class_name')}: use the model the tokens were trained on"
        )
    width = FAMILIES[tokens.family](name, revision=revision).conditioning_width  # from the denoiser's config
    if width is not None and width != tokens.hidden_size:
        raise TokenFileError(
            f"these tokens were made for a model with hidden size {tokens.hidden_size} (base model "
            f"{tokens.base_model!r}), but the denoiser of {name!r} attends to states {width} wide: use a token file "
            "trained for this model family and text encoder"
        )
    return dict(config)


def load_pipeline(tokens: TokenFile, model: str | None = None, device: str = "cpu", dtype: str | None = None) -> Any:
    """The family's diffusers pipeline for the tokens' base model (or `model`), scheduler and dtype as in training
    (`dtype` overrides the recorded one; files without one are float32)."""
    import diffusers

    from ipgo.backbones.base import load_error, torch_dtype
    from ipgo.testing import resolve_source

    name = model or tokens.base_model
    config = pipeline_config(tokens, model)
    source = resolve_source(name)
    cls = getattr(diffusers, FAMILIES[tokens.family].pipeline_class)
    extra: dict[str, Any] = {}
    if tokens.family == "sd":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    if tokens.family == "sdxl":
        extra = {"add_watermarker": False}  # its invisible watermark (when installed) alters the pixels scored
    if model is None:  # the very weights trained on
        extra.update({key: tokens.extra[key] for key in ("revision", "variant") if key in tokens.extra})
    try:
        if tokens.family == "sd3" and (config.get("text_encoder_3") or [None])[0] is None:
            extra.update(text_encoder_3=None, tokenizer_3=None)  # a checkpoint without T5
        pipe = cls.from_pretrained(source, dtype=torch_dtype(dtype or _recorded_dtype(tokens, device)), **extra)
    except OSError as error:
        raise load_error(name, "pipeline", error) from error
    settings = sampler_settings(tokens)
    pipe.scheduler = make_scheduler(settings["scheduler"], pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class Renders:
    """The prompts and seeds rendered, and the images (shown, seeds, 3, H, W) in [0, 1] of the raw and the tuned
    prompts for the first `shown` = min(GRID_PROMPTS, len(prompts)) prompts, those of grid.png (every image is
    written as a PNG; all of them would not fit in memory for a large prompt set at 1024 px)."""

    prompts: list[str]
    seeds: list[int]
    raw: Tensor
    tuned: Tensor


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or one this machine does not have, before any model loads."""
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise UserError(f"--device {device!r} is not a torch device ({error}); give e.g. cpu, cuda or cuda:1") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not available():
        raise UserError(f"--device {device}: this machine has no {kind} device available to torch; use --device cpu")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: give the number of images per pipeline call, at least 1")


@torch.no_grad()
def render(pipe: Any, tokens: TokenFile, prompts: Sequence[str], seeds: Sequence[int], tuned: bool = True,
           progress: tqdm | None = None, batch_size: int = 8) -> Tensor:
    """Images (len(prompts), len(seeds), 3, H, W) from `pipe` on the given seeds, with or without the tokens, at most
    `batch_size` images per pipeline call (each has its own generator, so the batching changes them only by the
    rounding of batched arithmetic); `progress` counts them as they are rendered."""
    settings = call_settings(tokens)
    if tuned:
        apply_tokens(pipe, tokens)
    else:
        remove_tokens(pipe)
    rows = []
    try:
        for prompt in prompts:
            row = []
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start:start + batch_size]
                images = pipe([prompt] * len(chunk), generator=[torch.Generator().manual_seed(int(s)) for s in chunk],
                              output_type="pt", **settings).images
                row.append(images.float().cpu())
                if progress is not None:
                    progress.update(len(chunk))
            rows.append(torch.cat(row))
    finally:  # a failed render leaves no tokens on the caller's pipeline
        remove_tokens(pipe)
    return torch.stack(rows)


STAGING = ".ipgo-writing"
"""The folder in `out` that holds a run's PNGs until all are rendered."""


def render_file(kind: str, index: int, seed: int) -> str:
    """Where `generate` writes an image, relative to the output folder."""
    return f"{kind}/{index:04d}_seed{seed}.png"


def save_pngs(images: Tensor, kind: str, first: int, prompts: Sequence[str], seeds: Sequence[int],
              out: Path) -> list[dict[str, Any]]:
    """Write renders (prompts, seeds, 3, H, W) of prompts number `first`... as `render_file`s under `out`; returns
    their manifest entries."""
    from PIL import Image

    files = []
    for i, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            file = render_file(kind, first + i, seed)
            with atomic_path(out / file) as tmp:
                Image.fromarray(as_uint8(images[i, j].permute(1, 2, 0)).numpy()).save(tmp, format="PNG")
            files.append({"kind": kind, "prompt": prompt, "seed": seed, "file": file})
    return files


def earlier_renders(out: Path) -> list[Path]:
    """The images an earlier `ipgo.generate` listed in `out`/images.json (to remove once the new ones are written:
    their names, by index, would mislead); refuses a manifest that ipgo did not write."""
    manifest = out / "images.json"
    if not manifest.is_file():
        return []
    try:
        entries = json.loads(manifest.read_text())["images"]
        files = [(out / entry["file"]).resolve() for entry in entries]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{manifest} is not an ipgo.generate manifest ({error!r}), so ipgo will not delete what it "
                        "lists: choose another --out") from error
    renders = [(out / kind).resolve() for kind in ("raw", "tuned")]
    outside = [f for f in files if not any(f.parent == folder for folder in renders)]
    if outside:
        raise UserError(f"{manifest} lists {outside[0]}, outside {out}/raw and {out}/tuned; ipgo will not delete it: "
                        "choose another --out")
    return files


def generate(
    tokens: str,
    seeds: str = "1000-1003",
    prompts: str | None = None,
    column: str | None = None,
    out: str = "generated",
    model: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    allow_training_seeds: bool = False,
    overwrite: bool = False,
    batch_size: int = 8,
) -> Renders:
    """Render raw and tuned prompts on the same seeds.

    Args:
        tokens: a token file, or a run folder holding tokens.safetensors.
        seeds: seeds as a range or list, e.g. "0-7" or "1,4,9".
        prompts: a prompt file (.txt/.csv/.jsonl); default: the prompts of a prompt-wise token file.
        column: the column of a .csv/.jsonl prompt file that holds the prompts (default "prompt").
        out: output folder.
        model: base model id or folder; default: the one recorded in the token file.
        device: torch device, e.g. "cuda".
        dtype: float32, float16 or bfloat16; default: the one the tokens were trained in.
        allow_training_seeds: allow seeds the tokens were trained on (recorded in images.json).
        overwrite: write into a non-empty `out` (the images of an earlier generate there are removed once the new
            ones are written).
        batch_size: images per pipeline call (lower it if the device runs out of memory).
    """
    check_batch_size(batch_size)
    check_device(device)
    if (Path(out) / STAGING).is_dir():  # left by a generate that was killed: partial renders, never the user's
        warnings.warn(f"removing {Path(out) / STAGING}: the partial renders of an ipgo.generate that did not finish",
                      stacklevel=2)
        shutil.rmtree(Path(out) / STAGING)
    check_output_folder(out, overwrite, "ipgo.generate")
    earlier = earlier_renders(Path(out))
    token_file = load_tokens(tokens)
    seed_list = parse_seeds(seeds)
    flagged = check_held_out(token_file, seed_list, allow_training_seeds)
    if prompts is None and column is not None:
        raise UserError(f"--column {column} names a column of a prompt file: give the file with --prompts FILE")
    if prompts is not None:
        prompt_list = read_prompts(prompts, column)
    elif token_file.prompts is not None:
        prompt_list = list(token_file.prompts)
    else:
        raise UserError("these are shared (prompt-batch) tokens: give the prompts to render with --prompts FILE")
    token_file.tokens_for(prompt_list)  # a prompt-wise file must hold every prompt: checked before loading
    pipeline_config(token_file, model)  # the model exists and is of the tokens' family
    check_prompts_fit(token_file, prompt_list, model)
    pipe = load_pipeline(token_file, model, device, dtype)
    check_tokens(pipe, token_file)
    # The PNGs go to a staging folder as they are rendered and into place once all are: a run that fails part-way
    # leaves an earlier run's images as they were.
    out_dir = Path(out)
    staging = out_dir / STAGING
    files: list[dict[str, Any]] = []
    try:
        with progress_bar(2 * len(prompt_list) * len(seed_list), "ipgo.generate") as progress:
            for first in range(0, len(prompt_list), GRID_PROMPTS):
                chunk = prompt_list[first : first + GRID_PROMPTS]
                raw = render(pipe, token_file, chunk, seed_list, False, progress, batch_size)
                tuned = render(pipe, token_file, chunk, seed_list, True, progress, batch_size)
                files += save_pngs(raw, "raw", first, chunk, seed_list, staging)
                files += save_pngs(tuned, "tuned", first, chunk, seed_list, staging)
                if first == 0:
                    renders = Renders(prompt_list, seed_list, raw, tuned)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files.sort(key=lambda entry: entry["kind"] != "raw")  # raw, then tuned, each in prompt order
    # Before any image is replaced: the earlier ones not rewritten go, and the manifest lists, without labels, the
    # files this run writes. A write that fails part-way then leaves no manifest that names new images as old
    # ones, and the next run still finds every file to remove.
    for path in set(earlier) - {(out_dir / entry["file"]).resolve() for entry in files}:
        path.unlink(missing_ok=True)
    write_text(out_dir / "images.json", json.dumps({"writing": True, "images": [{"file": entry["file"]}
                                                                                for entry in files]}) + "\n")
    for entry in files:
        (out_dir / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / entry["file"], out_dir / entry["file"])
    shutil.rmtree(staging)
    save_before_after(renders.raw, renders.tuned, out_dir / "grid.png")
    manifest = {"prompts": prompt_list, "seeds": seed_list, "images": files, "grid": "grid.png",
                "tokens": str(tokens), "model": model or token_file.base_model,
                "dtype": str(pipe.dtype).removeprefix("torch."), "training_seeds_used": flagged}
    write_text(out_dir / "images.json", json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(files)} images and grid.png to {out}")
    return renders


def main(args: list[str] | None = None) -> None:
    """Command line of `python -m ipgo.generate`; bad input ends with its message and exit code 2."""
    from jsonargparse import auto_cli

    with reported("ipgo.generate"):
        auto_cli(generate, args=args, as_positional=False, prog="python -m ipgo.generate")


if __name__ == "__main__":
    main()
