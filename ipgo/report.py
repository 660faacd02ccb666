"""What a finished `ipgo.fit` run leaves in its folder: tokens, before/after grid, summary."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ipgo.export import load_tokens, save_tokens
from ipgo.files import atomic_path, write_text
from ipgo.rewards.combine import frozen_statistics
from ipgo.tokens import TokenSets

if TYPE_CHECKING:
    from ipgo.module import IPGOModule


def progress_bar(total: int, command: str, disable: bool = False) -> tqdm:
    """The images a command renders, counted on stderr (the pipeline's own per-call bar is off)."""
    return tqdm(total=total, desc=command, unit="image", dynamic_ncols=True, disable=disable)


GRID_PROMPTS = 16
"""Grids show the first 16 prompts; `generate` and `evaluate` render (and score) this many prompts at a time, so
a large prompt set's images never all sit in memory."""


def as_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] as 0-255, rounded as every PNG ipgo writes is (stored this way, a grid does not change)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def save_before_after(before: Tensor, after: Tensor, path: Path, gap: int = 8) -> Path:
    """Save renders (P, S, 3, H, W) in [0, 1] as one PNG, atomically: a row per prompt with its S `before`
    images on the left and its S `after` images on the right, a white gap of `gap` pixels between them."""
    halves = [make_grid(x.flatten(0, 1).float().cpu(), nrow=x.shape[1], padding=2, pad_value=1.0)
              for x in (before, after)]
    grid = torch.cat([halves[0], torch.ones(3, halves[0].shape[1], gap), halves[1]], dim=2)
    array = as_uint8(grid.permute(1, 2, 0)).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def write_run_outputs(module: IPGOModule, run_dir: Path) -> dict:
    """Export the tokens, render report prompts before/after on held-out seeds, write the summary."""
    # summary.json, written last, marks a finished run: without it until every output is replaced, a continued run
    # that fails half-way through here is resumed (and its outputs written) rather than taken for finished
    (run_dir / "summary.json").unlink(missing_ok=True)
    tokens_path = save_tokens(run_dir / "tokens.safetensors", module.token_file())
    tokens = load_tokens(tokens_path)  # render from the file: the export is the single source of truth

    held_out = list(module.val_prompts)
    prompts = (held_out or list(module.prompts))[: module.report_prompts]
    seeds = list(module.seeds.eval)
    # the tokens before the first step: what adding tokens at all does, apart from what optimising them does
    initial = TokenSets.initial(module.token_config, tokens.hidden_size,
                                range(len(prompts)) if module.prompt_wise else [0]).to(module.device)
    rows, scores = [], {"before": [], "start": [], "after": []}
    judged: dict[str, dict[str, list[float]]] = {}
    trainer = module._trainer  # None outside a Trainer
    progress = progress_bar(3 * len(prompts) * len(seeds), "ipgo.fit: before/start/after renders",
                            disable=trainer is not None and trainer.progress_bar_callback is None)
    for first in range(0, len(prompts), 4):
        chunk = prompts[first : first + 4]
        p, s = tokens.tokens_for(chunk)
        with torch.no_grad():
            p0, s0 = initial(range(first, first + len(chunk)) if module.prompt_wise else [0] * len(chunk))
        images = {}
        for when, (prefix, suffix) in {"before": (None, None), "start": (p0, s0),
                                       "after": (p.to(module.device), s.to(module.device))}.items():
            images[when] = module.render(chunk, seeds, prefix, suffix)
            progress.update(len(chunk) * len(seeds))
        repeated = [q for q in chunk for _ in seeds]
        with torch.no_grad(), frozen_statistics(module.reward):  # all on one scale
            for when, rendered in images.items():
                scores[when] += module.reward(rendered, repeated).view(len(chunk), -1).mean(1).tolist()
                if module.judges is not None:
                    module.judges(rendered, repeated)
                    for name, values in module.judges.components.items():
                        judged.setdefault(name, {key: [] for key in scores})[when] += values.float().tolist()
        rows.append(tuple(images[when].unflatten(0, (len(chunk), len(seeds))) for when in ("before", "after")))
    progress.close()
    if rows:
        befores, afters = zip(*rows)
        save_before_after(torch.cat(befores), torch.cat(afters), run_dir / "before_after.png")

    compute = json.loads(tokens.extra.get("compute", "{}"))
    summary = {
        "mode": module.mode,
        "model": module.backbone.model,
        "reward": module.reward.name,
        "epochs": _epochs_run(trainer),
        "fit_seconds": round(compute["fit_seconds"], 1) if "fit_seconds" in compute else None,
        "run_dir": str(run_dir),
        "prompts_are": "held-out prompts (validation split)" if held_out else "training prompts",
        "seeds": seeds,
        "seeds_are": "held out: never used in optimisation",
        "per_prompt": [
            {"prompt": q, "before": b, "start": s, "after": a, "change": a - b, "change_from_start": a - s}
            for q, b, s, a in zip(prompts, scores["before"], scores["start"], scores["after"])
        ],
        "tokens": tokens_path.name,  # in the run folder
        "grid": "before_after.png" if rows else None,
    }
    if prompts:
        summary.update({f"mean_{when}": sum(values) / len(prompts) for when, values in scores.items()})
    if judged:
        summary["judges"] = {name: {**{when: sum(v[when]) / len(v[when]) for when in v}, "images": len(v["after"])}
                             for name, v in judged.items()}
    if module.best is not None and torch.isfinite(module.best.reward).all():
        summary["train"] = {
            "seeds": list(module.seeds.train),
            "first_step_mean": float(module.best.first.mean()),
            "last_step_mean": float(module.best.last.mean()),
            "best_step_mean": float(module.best.reward.mean()),
            "exported": module.select,
            "noise": module.seeds.policy,
        }
    summary, non_finite = _finite(summary)
    if non_finite:  # the tokens are saved: the run is kept, and the gaps are said
        warnings.warn(f"{non_finite} figures of the run summary are NaN or infinite (written as null, shown as n/a): a "
                      "reward or judge failed on the before/after renders. With float16 weights this is usually an "
                      "overflow (the SD VAE's): judge the tokens with ipgo.evaluate --dtype float32", stacklevel=2)
    text = summary_markdown(summary)
    write_text(run_dir / "summary.md", text)
    # last: it marks a finished run
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _epochs_run(trainer: Any) -> int | None:
    """The epochs a run finished (prompt-wise: its steps per prompt); None outside a Trainer."""
    if trainer is None:
        return None
    # the multi-process prompt-wise path optimises inside predict, for max_epochs steps, and leaves current_epoch 0
    return trainer.max_epochs if trainer.state.fn == "predict" else trainer.current_epoch


def _finite(value: Any) -> tuple[Any, int]:
    """`value` with every NaN or infinite float replaced by None (strict JSON has no NaN), and how many were."""
    if isinstance(value, float):
        return (value, 0) if math.isfinite(value) else (None, 1)
    if isinstance(value, dict):
        pairs = {key: _finite(item) for key, item in value.items()}
        return {key: item for key, (item, _) in pairs.items()}, sum(count for _, count in pairs.values())
    if isinstance(value, list):
        pairs = [_finite(item) for item in value]
        return [item for item, _ in pairs], sum(count for _, count in pairs)
    return value, 0


def _figure(value: float | None, sign: bool = False) -> str:
    return "n/a" if value is None else f"{value:+.4f}" if sign else f"{value:.4f}"


def _change(before: float | None, after: float | None) -> str:
    return _figure(None if before is None or after is None else after - before, sign=True)


def summary_markdown(summary: dict) -> str:
    """The summary as a small Markdown report (also printed at the end of a run)."""
    lines = [f"# ipgo run summary ({summary['mode']})", ""]
    if "model" in summary:
        epochs = "" if summary["epochs"] is None else f", {summary['epochs']} epochs"
        seconds = "" if summary["fit_seconds"] is None else f" in {summary['fit_seconds']:.0f} s of optimisation"
        lines += [f"`{summary['model']}`{epochs}{seconds}; run folder `{summary['run_dir']}`.", ""]
    lines += [
        f"Reward `{summary['reward']}` on {summary['prompts_are']}, seeds {summary['seeds']} "
        f"({summary['seeds_are']}); mean over seeds. This is the optimised reward: judge with held-out "
        "rewards too (`ipgo.evaluate`).",
        "",
        "Before: the raw prompt. Start: the tokens as initialised, before the first step (adding tokens at all). "
        "After: the exported tokens. What the optimisation did is after against start.",
        "",
        "| prompt | before | start | after | after - before | after - start |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["per_prompt"]:
        prompt = row["prompt"].replace("|", "\\|")  # a table cell
        shown = prompt if len(prompt) <= 100 else prompt[:97] + "..."
        lines.append(f"| {shown} | {_figure(row['before'])} | {_figure(row.get('start'))} | {_figure(row['after'])} | "
                     f"{_change(row['before'], row['after'])} | {_change(row.get('start'), row['after'])} |")
    if "mean_before" in summary:
        before, start, after = summary["mean_before"], summary.get("mean_start"), summary["mean_after"]
        lines.append(f"| **mean** | {_figure(before)} | {_figure(start)} | {_figure(after)} | "
                     f"{_change(before, after)} | {_change(start, after)} |")
    for name, judge in summary.get("judges", {}).items():
        lines += ["", f"Judge `{name}` (not optimised), mean over the same {judge['images']} renders: "
                  f"before {_figure(judge['before'])}, start {_figure(judge.get('start'))}, after "
                  f"{_figure(judge['after'])} ({_change(judge['before'], judge['after'])} against before, "
                  f"{_change(judge.get('start'), judge['after'])} against start)."]
    if "train" in summary:
        train = summary["train"]
        lines += ["", f"Optimisation (training seeds {train['seeds']}, mean over prompts): reward at the first "
                  f"step {_figure(train['first_step_mean'])}, at the last step (scored before its update) "
                  f"{_figure(train['last_step_mean'])}, at each prompt's best step "
                  f"{_figure(train['best_step_mean'])}; exported tokens: {train['exported']}."]
        if train.get("noise") == "fresh":
            lines[-1] += (" Each step was scored on fresh noise, so the best step's reward is partly the luck of its "
                          "noise: the held-out figures above are the measure.")
    lines += ["", f"Tokens: `{summary['tokens']}` (in the run folder)"]
    if summary["grid"]:
        n = len(summary["seeds"])
        left, right = (("the left image is", "the right one") if n == 1 else
                       (f"the left {n} images are", f"the right {n}"))
        lines.append(f"Grid `{summary['grid']}`: one row per prompt; {left} the raw prompt, {right} the prompt with "
                     f"the tokens, on the same seed{'s' if n > 1 else ''}.")
    return "\n".join(lines) + "\n"
