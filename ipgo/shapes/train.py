"""`python -m ipgo.shapes.train`: train the shapes-world text-to-image model and CLIP reward on a CPU.

The model is an ordinary Stable Diffusion 1.x layout, so `StableDiffusionPipeline.from_pretrained`
and `ipgo.backbones.StableDiffusion` load it like any checkpoint:

- latents: the image folded 2 x 2 into channels (pixel_unshuffle: 3 x 32 x 32 -> 12 x 16 x 16), an
  exact invertible map that made the UNet ~4x faster than 32 x 32 in the prototype; the
  `AutoencoderKL` decoder is trained to invert it, so the pipeline decodes as usual;
- UNet2DConditionModel on 12 x 16 x 16 latents and a small CLIPTextModel (started from the text
  tower of a CLIP first trained on rendered scenes, as SD starts from CLIP's), trained together
  with v-prediction on a zero-terminal-SNR schedule, min-SNR weights, EMA and 10% empty captions
  for classifier-free guidance;
- only captions of the training split (`ipgo.shapes.caption_split`) are seen.

Then the model is sampled on training captions, the CLIP reward is trained on from that first
CLIP with rendered and generated images (`ipgo.shapes.clip`), and the targets are measured on
held-out captions (`--measure` re-measures saved models):
oracle accuracy at guidance 1, 2, 3, 5 and the CLIP reward's AUC at telling oracle-correct
from incorrect generated images (`metrics.json`).

Everything is seeded: the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ipgo.errors import UserError
from ipgo.files import check_writable_folder
from ipgo.shapes.world import caption_split, parse, render

UNET = dict(
    sample_size=16, in_channels=12, out_channels=12, layers_per_block=1, block_out_channels=(48, 96, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=6, norm_num_groups=16, only_cross_attention=(True, False, False),
)  # fmt: skip
# 16 x 16: two cross-attentions instead of self-attention over 256 positions (40% faster per step);
# 8 x 8: self- and cross-attention; 4 x 4: the mid block's attention sees the whole image.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=12, block_out_channels=(32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=32, scaling_factor=1.0, force_upcast=False,
)  # fmt: skip
GUIDANCE = 3.0  # the default guidance scale of the demo, and the one the CLIP reward's samples use
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="v_prediction", rescale_betas_zero_snr=True, steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)
# Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): with
# SD's schedule, the most-noised training latents of these flat-coloured scenes still show their layout,
# so from pure noise the model took colours from the noise instead of the caption (held-out colours 0.76
# at guidance 3, every other miss the other shape's colour); zeroing the last SNR fixed that (1.0 at the
# same guidance after 600 steps).


def to_latents(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1] -> latents (B, 12, 16, 16) in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, 2)


def batch(captions: list[str], size: int, generator: torch.Generator, rng: random.Random,
          drop: float = 0.1) -> tuple[torch.Tensor, list[str]]:
    """Random training scenes: images (size, 3, 32, 32) and captions ("" for `drop` of them)."""
    texts = [rng.choice(captions) for _ in range(size)]
    images = torch.stack([render(parse(t), generator) for t in texts])
    return images, ["" if rng.random() < drop else t for t in texts]


def train_decoder(vae: torch.nn.Module, captions: list[str], steps: int, seed: int) -> float:
    """Fit the VAE decoder to invert `to_latents`; returns the last mean squared error."""
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    optimizer = torch.optim.AdamW(vae.decoder.parameters(), lr=2e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        images, _ = batch(captions, 32, generator, rng, drop=0.0)
        decoded = vae.decode(to_latents(images) / vae.config.scaling_factor).sample
        loss = F.mse_loss(decoded, images * 2 - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def unet_loss_weights(noise_schedule: Any, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weights for v-prediction, min(SNR + 1, gamma) / (SNR + 1) as in diffusers' training
    scripts: less weight on nearly clean steps, full weight at zero SNR (where min(SNR, gamma) would be 0)."""
    alphas = noise_schedule.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    return (snr + 1).clamp(max=gamma) / (snr + 1)


def learning_rate(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `steps`."""
    if step <= warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(out: str, steps: int = 1200, decoder_steps: int = 300, batch_size: int = 32, seed: int = 0,
          lr: float = 1e-3, ema_decay: float = 0.995, snr_gamma: float = 5.0,
          unet: dict[str, Any] | None = None, text_encoder_from: str | Path | None = None) -> Path:
    """Train the shapes model for `steps` UNet steps and save it (EMA weights) as a diffusers folder.

    `text_encoder_from`: a shapes CLIP folder whose text tower starts the text encoder (as Stable
    Diffusion starts from CLIP's); without it the text encoder starts random."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ipgo.shapes.vocab import shapes_tokenizer, text_config

    torch.manual_seed(seed)
    train_captions, held_out = caption_split()
    tokenizer = shapes_tokenizer()
    vae, model = AutoencoderKL(**VAE), UNet2DConditionModel(**(unet or UNET))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config()))  # the shapes CLIP's text tower shape
    if text_encoder_from is not None:
        from transformers import CLIPModel

        text_encoder.load_state_dict(CLIPModel.from_pretrained(text_encoder_from).text_model.state_dict())
    started = time.time()
    decoder_error = train_decoder(vae, train_captions, decoder_steps, seed)
    print(f"decoder: mse {decoder_error:.5f} after {decoder_steps} steps ({time.time() - started:.0f} s)")

    noise_schedule = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"})
    params = list(model.parameters()) + list(text_encoder.parameters())
    averaged = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator, rng = torch.Generator().manual_seed(seed + 1), random.Random(seed + 1)
    ids_cache: dict[str, list[int]] = {}
    losses = []
    for step in range(1, steps + 1):
        images, texts = batch(train_captions, batch_size, generator, rng)
        latents = to_latents(images)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, t)
        target = noise_schedule.get_velocity(latents, noise, t)
        for text in texts:
            if text not in ids_cache:
                ids = tokenizer(text, truncation=True).input_ids
                ids_cache[text] = ids + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
        hidden = text_encoder(torch.tensor([ids_cache[x] for x in texts])).last_hidden_state
        errors = (model(noisy, t, encoder_hidden_states=hidden).sample - target).pow(2).mean(dim=(1, 2, 3))
        loss = (errors * unet_loss_weights(noise_schedule, t, snr_gamma)).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
        losses.append(float(errors.detach().mean()))
        if step % 50 == 0:
            print(f"step {step}: loss {sum(losses[-50:]) / 50:.4f} ({time.time() - started:.0f} s)", flush=True)
    with torch.no_grad():
        for p, a in zip(params, averaged):
            p.copy_(a)

    scheduler = DDIMScheduler(**SCHEDULER, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = Path(out)
    pipe.save_pretrained(path)
    record = {"seed": seed, "unet_steps": steps, "unet": unet or UNET, "scheduler": SCHEDULER, "held_out": held_out,
              "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
              "snr_gamma": snr_gamma, "decoder_steps": decoder_steps, "torch_threads": torch.get_num_threads(),
              "decoder_mse": decoder_error,
              "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "seconds": round(time.time() - started)}
    (path / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return path


def model_settings(steps: int, seed: int, text_steps: int) -> dict[str, Any]:
    """Everything `build` trains its text-to-image model with: the recipe (`train`'s defaults), the split, the
    text tower's steps, and the thread count (float sums, so the weights, depend on it)."""
    import inspect

    recipe = {key: parameter.default for key, parameter in inspect.signature(train).parameters.items()
              if key in ("decoder_steps", "batch_size", "lr", "ema_decay", "snr_gamma")}
    return {"unet_steps": steps, "seed": seed, "unet": UNET, "scheduler": SCHEDULER, "held_out": caption_split()[1],
            "text_steps": text_steps, "torch_threads": torch.get_num_threads(), **recipe}


def finished_model(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The training record of the model in `folder` if it was trained with these settings (so it is kept)."""
    done = folder / "training.json"
    try:
        record = json.loads(done.read_text()) if done.is_file() else {}
    except ValueError:  # a damaged record: train again
        record = {}
    same = json.loads(json.dumps(settings))  # through JSON, so that tuples equal the lists the record holds
    return record if record and all(record.get(key) == value for key, value in same.items()) else None


def build(out: str, steps: int = 1200, clip_steps: int = 600, text_steps: int = 300, seed: int = 0,
          keep_model: bool = False) -> dict[str, Any]:
    """Train the CLIP text tower, the text-to-image model from it, then the CLIP reward on rendered and
    generated images; measure the targets of issue 7 into `metrics.json`.

    Stages: (1) a CLIP on rendered scenes (`text_steps`), whose text tower starts the text encoder;
    (2) the text-to-image model (`steps`); (3) the CLIP reward (`clip_steps`), on from (1), with the
    model's samples of training captions in the mix. Leaves sd/ and clip/ (the shipped models),
    build.json (command, seconds per stage) and metrics.json in `out`. With `keep_model`, a finished sd/
    stage trained with every setting of `model_settings` the same is kept (to iterate on the CLIP stage; code
    changes outside those settings are not noticed, so a build to ship trains every stage).
    """
    import shutil

    from diffusers import StableDiffusionPipeline

    from ipgo.shapes.clip import train_clip
    from ipgo.shapes.measure import sample

    root = Path(out)
    train_captions, _ = caption_split()
    seconds: dict[str, float] = {}
    started = time.time()
    text_clip = train_clip(root / "clip-text", steps=text_steps, seed=seed)
    seconds["clip_text"] = time.time() - started
    record = finished_model(root / "sd", model_settings(steps, seed, text_steps)) if keep_model else None
    if record is None:
        train(str(root / "sd"), steps=steps, seed=seed, text_encoder_from=text_clip)
        seconds["sd"] = time.time() - started - sum(seconds.values())
        done = root / "sd" / "training.json"  # and which text tower the text encoder started from:
        done.write_text(json.dumps({**json.loads(done.read_text()), "text_steps": text_steps}, indent=2) + "\n")
    else:  # kept from an earlier run of the same command: count the time it took then
        seconds["sd"] = record["seconds"]
        started -= record["seconds"]
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    generated = sample(pipe, train_captions, [10_000 + seed, 10_001 + seed], guidance_scale=GUIDANCE)
    train_clip(root / "clip", generated=list(generated), steps=clip_steps, seed=seed, start=text_clip)
    shutil.rmtree(text_clip)
    seconds["clip"] = time.time() - started - sum(seconds.values())
    command = (f"python -m ipgo.shapes.train --out {out} --steps {steps} --clip-steps {clip_steps} "
               f"--text-steps {text_steps} --seed {seed} --threads {torch.get_num_threads()}"
               + (" --keep-model" if record is not None else ""))
    build_record = {"command": command, "seed": seed, "seconds": {k: round(v) for k, v in seconds.items()},
                    "total_seconds": round(sum(seconds.values())), "torch_threads": torch.get_num_threads(),
                    **({"model_kept_from_an_earlier_build": True} if record is not None else {})}
    (root / "build.json").write_text(json.dumps(build_record, indent=2) + "\n")
    print(json.dumps(build_record, indent=2))
    from ipgo.shapes.measure import measure

    return measure(out)


def _count(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _seed(text: str) -> int:
    """A torch seed (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63 - 20_000:  # build draws seeds up to seed + 10,001; torch takes < 2**63
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: give a whole number from 0 to 2**63 - 20001")
    return value


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ipgo.shapes.train",
                                     description="Train the shapes-world text-to-image model and CLIP on the CPU.")
    parser.add_argument("--out", default="shapes-world", help="output folder: sd/, clip/, metrics.json")
    parser.add_argument("--steps", type=_count, default=1200, help="UNet + text encoder training steps")
    parser.add_argument("--clip-steps", type=_count, default=600, help="CLIP reward training steps")
    parser.add_argument("--text-steps", type=_count, default=300, help="CLIP steps that make the text encoder's start")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--threads", type=_count, default=2,
                        help="torch threads: float sums, so the weights, depend on it (the shipped ones: 2)")
    parser.add_argument("--keep-model", action="store_true",
                        help="keep a finished sd/ in --out trained with the same settings (to retrain the CLIP only)")
    parser.add_argument("--measure", action="store_true", help="only measure the models already in --out")
    args = parser.parse_args(args)
    torch.set_num_threads(args.threads)
    if args.measure:
        from ipgo.shapes.measure import measure

        marks = {"sd": "model_index.json", "clip": "config.json"}
        missing = [part for part, mark in marks.items() if not (Path(args.out) / part / mark).is_file()]
        if missing:
            folders = " or ".join(f"{part}/" for part in missing)
            parser.error(f"--measure: {args.out} holds no trained {folders} (from an earlier `python -m "
                         "ipgo.shapes.train --out FOLDER`): point --out at one")
        measure(args.out)
    else:
        try:
            check_writable_folder(args.out, "--out", "ipgo.shapes.train")
        except UserError as error:
            parser.error(str(error))
        build(args.out, args.steps, args.clip_steps, args.text_steps, args.seed, args.keep_model)


if __name__ == "__main__":
    main()
