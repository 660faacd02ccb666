"""Speed and memory of one IPGO optimisation step against the sampling floor and the reference notebook's way.

    python scripts/benchmark.py                    # tiny:sd1 on the CPU, T=20, K=2, 32 px (about 2-3 minutes)
    python scripts/benchmark.py --full-size --dtype float16 --steps 50 --size 512 --gradient-checkpointing

Variants, on the same model, prompts, seeds and settings (LMS, CFG 7.5, 10 + 10 tokens):
  floor     plain sampling of T steps with guidance under torch.no_grad() (what any step must cost at least)
  ipgo      one ipgo step: tokens -> conditioning -> TruncatedSampler (T-K steps without autograd, K with)
            -> decode -> ClipScore -> backward -> Adam
  notebook  the same step the published notebook's way: a graph for every step, the first T-K detached after
  full      backpropagation through all T steps
Each variant runs in a fresh process (`--in-process` runs them here: quicker, for tests). Time: the median
over `--repeats` steps after one warm-up. Memory: CUDA max allocated, or on the CPU the rise of the process's
resident set over the step (VmHWM after the steps minus VmRSS before them, the peak reset in between).
Prompt-wise throughput: prompts per hour with B prompts optimised together as independent token sets
(`TokenSets(num_sets=B)`), `--throughput-steps` steps per prompt, against one prompt at a time (ipgo and
notebook way). `--gradient-checkpointing`, `--channels-last` and `--compile` each add a row: the ipgo step
with that knob. `--full-size` builds SD 1.5-shaped components and a CLIP ViT-L/14-shaped reward with random
weights (the cost of real ones), saves them with save_pretrained and loads them through `StableDiffusion`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("floor", "ipgo", "notebook", "full")
KNOBS = ("gradient_checkpointing", "channels_last", "compile")
PROMPTS = ("a red apple on a wooden table", "a lighthouse at dusk", "a cat asleep on a sofa", "a snowy mountain road",
           "a bowl of ramen, studio light", "an old map of a city", "a boat on a calm lake", "a fox in a forest")


def sd15_configs(small: bool = False) -> dict[str, dict[str, Any]]:
    """Constructor arguments of SD 1.5's UNet, VAE and text encoder and of a CLIP ViT-L/14 (`small`: scaled down)."""
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    unet = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    if small:
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      patch_size=32, projection_dim=32)
        unet.update(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32)
        vae.update(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64)
    return {"text": text, "vision": vision, "unet": unet, "vae": vae}


def build_sd15_shaped(root: Path, small: bool = False) -> tuple[str, str]:
    """Random-weight SD 1.5-shaped pipeline and CLIP ViT-L/14-shaped reward folders under root (built once)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel

    from ipgo.testing import clip_tokenizer

    c = sd15_configs(small)
    sd, clip = root / f"sd15-shaped{'-small' if small else ''}", root / f"clip-l14-shaped{'-small' if small else ''}"
    if not (sd / "model_index.json").exists():
        torch.manual_seed(0)
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
        StableDiffusionPipeline(
            vae=AutoencoderKL(**c["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**c["text"])),
            tokenizer=clip_tokenizer(), unet=UNet2DConditionModel(**c["unet"]), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(sd)
    if not (clip / "config.json").exists():
        size = c["vision"]["image_size"]
        projection = c["text"]["projection_dim"]
        config = CLIPConfig(text_config=c["text"], vision_config=c["vision"], projection_dim=projection)
        CLIPModel(config).save_pretrained(clip)
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            clip)
        clip_tokenizer().save_pretrained(clip)
    return str(sd), str(clip)


def notebook_sample(sampler: Any, backbone: Any, cond: Any, uncond: Any, noise: torch.Tensor) -> torch.Tensor:
    """The notebook's way: every step builds a graph; latents and scheduler history are detached before the last K.

    Detaching the latents alone is not enough with LMS: its stored derivatives of the earlier steps still hold
    their graphs, and the gradient would run back through every step (it differs from the truncated one).
    """
    from ipgo.backbones import Conditioning
    from ipgo.sampling import make_scheduler

    scheduler = make_scheduler(sampler.config.scheduler, backbone.scheduler_config)
    scheduler.set_timesteps(sampler.config.num_steps, device=noise.device)
    both, latents = Conditioning.cat(uncond, cond), noise * scheduler.init_noise_sigma
    n_free = len(scheduler.timesteps) - sampler.config.grad_steps
    for i, t in enumerate(scheduler.timesteps):
        if i == n_free:  # the graphs of the first T-K steps were built, now they are dropped; multistep schedulers
            latents = latents.detach()  # (LMS) keep earlier derivatives, which would carry gradient back past T-K
            for name in ("derivatives", "model_outputs"):
                history = getattr(scheduler, name, None)
                if isinstance(history, list):
                    setattr(scheduler, name, [x.detach() if torch.is_tensor(x) else x for x in history])
        latents = sampler._step(backbone, scheduler, latents, t, both, guided=True)
    return backbone.decode(latents)


def _proc_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), None)


def run_variant(args: argparse.Namespace, variant: str, batch: int, knob: str | None = None) -> dict[str, Any]:
    """Time one variant in this process: median seconds per step and peak memory of the step in bytes."""
    from ipgo.backbones import StableDiffusion
    from ipgo.inject import conditioning
    from ipgo.sampling import SamplerConfig, TruncatedSampler, initial_noise
    from ipgo.tokens import TokenConfig, TokenSets

    device, note = torch.device(args.device), ""
    model, clip = build_sd15_shaped(Path(args.cache), args.small) if args.full_size else ("tiny:sd1", "tiny:clip")
    backbone = StableDiffusion(model, dtype=args.dtype, gradient_checkpointing=knob == "gradient_checkpointing")
    backbone.load()
    backbone.to(device)
    reward = make_reward(args, clip).to(device=device, dtype=backbone.dtype)
    reward.load()
    if knob == "channels_last":
        backbone.unet.to(memory_format=torch.channels_last)
    eager_unet = backbone.unet
    if knob == "compile":
        backbone.unet = torch.compile(eager_unet)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i // len(PROMPTS) or ''}".rstrip() for i in range(batch)]
    config = SamplerConfig(scheduler="lms", num_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                           grad_steps=args.steps if variant == "full" else args.grad_steps)
    sampler = TruncatedSampler(config)
    tokens = TokenSets(TokenConfig(n_prefix=10, n_suffix=10, rank=32), backbone.hidden_size, batch).to(device)
    optimizer = torch.optim.Adam(tokens.parameters(), lr=1e-3)
    noise = initial_noise(backbone, config, list(range(batch)), device)

    def step() -> None:
        with torch.set_grad_enabled(variant != "floor"):
            prefix, suffix = tokens(range(batch))
            cond, uncond, *_ = conditioning(backbone, prompts, prefix, suffix)
            if variant == "notebook":
                images = notebook_sample(sampler, backbone, cond, uncond, noise)
            else:
                images = sampler(backbone, cond, uncond, noise)
            if variant == "floor":
                return
            loss = -reward(images, prompts).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens.project_()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _proc_kb("VmRSS")
    try:
        step()  # warm-up (and compilation)
    except Exception as error:  # noqa: BLE001 - torch.compile may fail on some machines: say so, measure eager
        if knob != "compile":
            raise
        note, backbone.unet = f"torch.compile failed ({type(error).__name__}), measured eager", eager_unet
        step()
    times = []
    for _ in range(args.repeats):
        sync()
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_kb("VmHWM")
        memory = (peak - base) * 1024 if peak is not None and base is not None else float("nan")
    return {"variant": variant, "batch": batch, "knob": knob, "seconds": statistics.median(times), "best": min(times),
            "memory": memory,
            "note": note}


def measure(args: argparse.Namespace, variant: str, batch: int, knob: str | None = None) -> dict[str, Any]:
    """Run one variant, in a fresh process unless `--in-process`; a failure (e.g. out of memory) is reported."""
    print(f"measuring {variant} B={batch}{' + ' + knob if knob else ''} ...", file=sys.stderr, flush=True)
    if args.in_process:
        return run_variant(args, variant, batch, knob)
    command = [sys.executable, str(Path(__file__).resolve()), *options(args), "--child", f"{variant},{batch},{knob}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1][:160]
        return {"variant": variant, "batch": batch, "knob": knob, "seconds": float("nan"), "best": float("nan"),
                "memory": float("nan"), "note": f"failed: {reason}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_reward(args: argparse.Namespace, clip: str) -> Any:
    """The reward of the measurement: CLIP score (ViT-L/14-shaped when full size) or HPSv2 (ViT-H-14-shaped)."""
    from ipgo.rewards import ClipScore, HPSv2

    if args.reward == "clip":
        return ClipScore(clip)
    if not args.full_size:
        from ipgo.testing import TINY_OPEN_CLIP_NAME

        return HPSv2("tiny:hps", model_name=TINY_OPEN_CLIP_NAME)
    checkpoint = Path(args.cache) / "hps-vit-h-14-shaped.pt"
    if not checkpoint.exists():  # random weights of HPSv2's architecture: the same cost as the real checkpoint
        import open_clip

        torch.save(open_clip.create_model("ViT-H-14").state_dict(), checkpoint)
    return HPSv2(str(checkpoint), model_name="ViT-H-14")


def options(args: argparse.Namespace) -> list[str]:
    """The options that define the measurement, as command-line flags."""
    flags = ["--steps", str(args.steps), "--grad-steps", str(args.grad_steps), "--size", str(args.size), "--repeats",
             str(args.repeats), "--device", args.device, "--dtype", args.dtype, "--cache", args.cache, "--reward",
             args.reward]
    flags += [f"--{name}" for name in ("full-size", "small") if getattr(args, name.replace("-", "_"))]
    return flags


def machine(args: argparse.Namespace) -> str:
    """The device and software the numbers come from."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    text = f"CPU: {cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
    if args.device.startswith("cuda"):
        text = f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}; {text}"
    return f"{text}; torch {torch.__version__}, Python {platform.python_version()}"


def _ratio(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or not b else f"{a / b:.2f}"  # NaN (a failed variant) compares unequal


def report(args: argparse.Namespace, command: str, rows: list[dict], throughput: list[dict]) -> str:
    """The results as Markdown: settings, machine, command, the variant table, ratios and throughput."""
    by = {row["variant"]: row["seconds"] for row in rows if not row["knob"]}
    model = "SD 1.5-shaped, random weights" + (" (scaled down)" if args.small else "") if args.full_size else "tiny:sd1"
    memory = "CUDA max allocated" if args.device.startswith("cuda") else "rise of process peak RSS over the step"
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Model: {model}; {args.size} px, LMS, "
             f"T={args.steps}, K={args.grad_steps}, CFG 7.5, 10 + 10 tokens (rank 32), "
             f"{'HPSv2' if args.reward == 'hpsv2' else 'ClipScore'} reward, "
             f"{args.batch} prompt(s) per step, weights {args.dtype}, median of {args.repeats} after 1 warm-up.",
             f"Machine: {machine(args)}.", f"Command: `{command}`", "",
             f"| variant | median s / step | fastest s / step | peak memory (MiB, {memory}) | vs ipgo |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        name = row["variant"] + (f" + {row['knob'].replace('_', ' ')}" if row["knob"] else "")
        mib = "n/a" if row["memory"] != row["memory"] else f"{row['memory'] / 2**20:.1f}"
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {name}{note} | {row['seconds']:.3f} | {row['best']:.3f} | {mib} | "
                     f"{_ratio(row['seconds'], by['ipgo'])} |")
    lines += ["", f"Ratios: b/a (ipgo / floor) = {_ratio(by['ipgo'], by['floor'])}; c/b (notebook / ipgo) = "
              f"{_ratio(by['notebook'], by['ipgo'])}; d/b (full / ipgo) = {_ratio(by['full'], by['ipgo'])}."]
    if throughput:
        rate = {(r["variant"], r["batch"]): 3600 * r["batch"] / (r["seconds"] * args.throughput_steps)
                for r in throughput}
        one, reference = rate.get(("ipgo", 1), float("nan")), rate[("notebook", 1)]
        lines += ["", f"Prompt-wise throughput ({args.throughput_steps} optimisation steps per prompt):", "",
                  "| prompts per step | s / step | prompts / hour | vs ipgo B=1 | vs notebook way B=1 |",
                  "|---|---:|---:|---:|---:|"]
        for r in throughput:
            name = f"{r['batch']} (notebook way)" if r["variant"] == "notebook" else str(r["batch"])
            value = rate[(r["variant"], r["batch"])]
            lines.append(f"| {name} | {r['seconds']:.3f} | {value:.0f} | {_ratio(value, one)} | "
                         f"{_ratio(value, reference)} |")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str, section: str | None) -> None:
    """Write the results to path, or replace (or append) the section between its markers in path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if section:
        start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
        old = path.read_text() if path.exists() else ""
        block = f"{start}\n{text}{end}"
        if start in old and end in old:
            text = old[: old.index(start)] + block + old[old.index(end) + len(end):]
        else:
            text = old + ("\n" if old else "") + block + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see `--help`)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="SD 1.5-shaped random-weight model (GPU)")
    parser.add_argument("--small", action="store_true", help="with --full-size: scaled-down configs (tests)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps T")
    parser.add_argument("--grad-steps", type=int, default=2, help="last steps with gradients K")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--batch", type=int, default=1, help="prompts per step in the variant table")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the frozen weights (the tokens stay float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="add a row: ipgo with checkpointing")
    parser.add_argument("--channels-last", action="store_true", help="add a row: ipgo with a channels-last UNet")
    parser.add_argument("--compile", action="store_true", help="add a row: ipgo with torch.compile(unet)")
    parser.add_argument("--reward", default="clip", choices=("clip", "hpsv2"),
                        help="reward: CLIP score, or HPSv2 (open_clip ViT-H-14-shaped with --full-size)")
    parser.add_argument("--throughput", default="1,2,4,8", help="prompts per step to compare ('' skips)")
    parser.add_argument("--throughput-steps", type=int, default=50, help="optimisation steps per prompt")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ipgo-bench"), help="built models")
    parser.add_argument("--out", default="BENCHMARKS.md", help="results file ('' writes nothing)")
    parser.add_argument("--section", default=None, help="replace this marked section of --out (default: a tag "
                        "such as cpu-tiny); 'none' writes the whole file")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (no fresh processes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Measure every variant and the throughput, print the Markdown table, write it to `--out`; return it."""
    args = parse_args(argv)
    if args.child:  # a fresh process measuring one variant: print its JSON
        variant, batch, knob = args.child.split(",")
        print(json.dumps(run_variant(args, variant, int(batch), None if knob == "None" else knob)))
        return ""
    rows = [measure(args, variant, args.batch) for variant in VARIANTS]
    rows += [measure(args, "ipgo", args.batch, knob) for knob in KNOBS if getattr(args, knob)]
    throughput = []
    if args.throughput:
        throughput.append(rows[2] if args.batch == 1 else measure(args, "notebook", 1))
        for batch in (int(b) for b in args.throughput.split(",")):
            throughput.append(rows[1] if batch == args.batch else measure(args, "ipgo", batch))
    command = "python scripts/benchmark.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    text = report(args, command, rows, throughput)
    print(text)
    if args.out:
        tag = f"{'cuda' if args.device.startswith('cuda') else 'cpu'}-{'sd15' if args.full_size else 'tiny'}"
        section = None if args.section == "none" else args.section or tag
        write(Path(args.out), text, section)
    return text


if __name__ == "__main__":
    main()
