"""`python -m ipgo.evaluate`: score methods against the raw prompt on held-out seeds, with any rewards.

    python -m ipgo.evaluate --methods '[ipgo=runs/demo]' --seeds 1000-1003 \\
        --rewards '[{name: clip_score, args: {model: tiny:shapes-clip}}, {name: shapes_oracle}]' --out eval/

Every method renders the same prompts on the same seeds through the family's diffusers
pipeline (`ipgo.generate`). Beside the first method, `<name>_start` renders its tokens as
`ipgo.fit` initialised them (from the file's token settings and seed): what adding tokens at
all does, apart from optimising them. Seeds a method was optimised on are refused (or, when allowed,
flagged), and so are prompts a prompt-batch method was trained on. Beside the raw prompt and
each method, a **best-of-N** baseline samples N candidates per (prompt, seed) with the raw
prompt and keeps the one the *selection reward* (the one optimised) likes best; with
`best_of_n: auto`, N is the number of sampler calls the first method's optimisation spent per
prompt, and best-of-N spends them at every evaluation seed: per prompt, IPGO's optimisation
once against N renders at each of S seeds. IPGO's backward passes through K steps are not
counted; at S > 1 seeds the match favours best-of-N.

`metrics.json` (schema_version 2):
    settings: prompts, seeds, rewards, reward_weights ({reward: where its weights come from}),
              selection_reward, best_of_n, best_of_n_matches_compute, bootstrap, tie_tolerance
    methods: {name: {kind: raw|ipgo|start|best_of_n, tokens, compute (fit_seconds, peak_memory_bytes,
              memory_kind, device, processes, sampler_calls_per_prompt), flags,
              rewards: {reward: {n, mean, stderr, wins, ties, losses, win_rate, win_rate_ci}}}}
              (stderr: over prompt means, null with one prompt; win counts compare with the raw
              prompt on the same prompt and seed; a tie is a difference within tie_tolerance;
              win_rate = wins / n; win_rate_ci: 95% bootstrap interval resampling prompts with
              all their seeds, widened to the Wilson interval over prompts where that is wider;
              raw has no win fields)
    images: [{method, prompt, seed, scores: {reward: value}, candidate_seed (best-of-N only)}]

Version 1 (until the eighth session) resampled (prompt, seed) pairs as if independent, took the
standard error over all images, and drew best-of-N's candidates without the evaluation seed.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ipgo.backbones.base import portable_model_name, torch_dtype
from ipgo.data import prompt_key, read_prompts
from ipgo.errors import NonFiniteRewardError, UserError, reported
from ipgo.export import TokenFile, check_prompts_fit, check_tokens, load_tokens
from ipgo.export import starting_tokens as initial_tokens
from ipgo.files import check_output_folder, write_text
from ipgo.generate import (
    check_batch_size,
    check_device,
    check_held_out,
    load_pipeline,
    parse_seeds,
    pipeline_config,
    progress_bar,
    render,
    rendering_dtype,
    sampler_settings,
)
from ipgo.report import GRID_PROMPTS, as_uint8, save_before_after
from ipgo.rewards.combine import CombinedReward, RewardSpec, build_reward

BEST_OF_N_SEEDS = 2**30
"""Candidate seeds of best-of-N start here, far from training and evaluation seeds."""


def candidate_seeds(seed: int, n: int) -> list[int]:
    """The N candidate seeds best-of-N draws for one evaluation seed: the seed itself (the raw prompt's own
    image, so best-of-N is paired with it), then N - 1 more."""
    return [seed] + [BEST_OF_N_SEEDS + seed * n + j for j in range(n - 1)]


def matched_n(tokens: TokenFile) -> int:
    """N of best-of-N matching the sampler calls per prompt of the run that made `tokens`."""
    compute = json.loads(tokens.extra.get("compute", "{}"))
    if "sampler_calls_per_prompt" not in compute:
        raise UserError("the token file records no compute; give best_of_n as a number")
    return max(1, round(compute["sampler_calls_per_prompt"]))


def win_statistics(method: Tensor, raw: Tensor, tie_tolerance: float, bootstrap: int, seed: int = 0) -> dict:
    """Wins, ties, losses against raw on paired scores (prompts, seeds), and a 95% interval of the win rate.

    The seeds of one prompt are not independent, so the interval resamples prompts (with all their seeds),
    and it is never narrower than the Wilson score interval over the prompts: the percentile bootstrap over
    a few prompts is too narrow, down to a point when every pair wins.
    """
    diff = method - raw
    wins, ties = diff > tie_tolerance, diff.abs() <= tie_tolerance
    n, prompts = diff.numel(), diff.shape[0]
    generator = torch.Generator().manual_seed(seed)
    per_prompt = wins.float().mean(dim=1)
    resampled = per_prompt[torch.randint(prompts, (bootstrap, prompts), generator=generator)].mean(dim=1)
    low, high = torch.quantile(resampled, torch.tensor([0.025, 0.975])).tolist()
    rate = float(wins.float().mean())
    wilson_low, wilson_high = wilson_interval(rate, prompts)
    return {"wins": int(wins.sum()), "ties": int(ties.sum()), "losses": int(n - wins.sum() - ties.sum()),
            "win_rate": rate, "win_rate_ci": [min(low, wilson_low), max(high, wilson_high)]}


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `rate` observed over `n` trials."""
    centre = (rate + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(rate * (1 - rate) / n + z**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def summary_statistics(scores: Tensor) -> dict:
    """n, mean and standard error of the mean of scores (prompts, seeds); the standard error is over prompt
    means (seeds of a prompt are not independent), None with one prompt."""
    prompts = scores.shape[0]
    stderr = float(scores.mean(dim=1).std(unbiased=True) / math.sqrt(prompts)) if prompts > 1 else None
    return {"n": scores.numel(), "mean": float(scores.mean()), "stderr": stderr}


@torch.no_grad()
def score(reward: CombinedReward, images: Tensor, prompts: Sequence[str], batch_size: int = 32) -> dict[str, Tensor]:
    """Every component's scores (prompts, seeds) of images (prompts, seeds, 3, H, W), `batch_size` images on the
    device at a time; NaN or infinite is an error."""
    flat, device = images.flatten(0, 1), next(reward.buffers()).device
    texts = [p for p in prompts for _ in range(images.shape[1])]
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(flat), batch_size):
        reward(flat[start:start + batch_size].to(device), texts[start:start + batch_size])
        for name, values in reward.components.items():
            parts.setdefault(name, []).append(values.float().cpu())
    scores = {name: torch.cat(values).view(images.shape[:2]) for name, values in parts.items()}
    for name, values in scores.items():
        bad = ~torch.isfinite(values).all(dim=1)
        if bad.any():
            raise NonFiniteRewardError(
                f"reward {name!r} is NaN or infinite for prompt {prompts[int(bad.nonzero()[0])]!r}, so no mean, "
                "win or best-of-N pick would mean anything. With float16 weights this is usually an overflow "
                "(the SD VAE's): evaluate with --dtype float32 or bfloat16."
            )
    return scores


def evaluate(
    methods: list[str] | str,
    rewards: list[RewardSpec],
    seeds: str = "1000-1003",
    prompts: str | None = None,
    column: str | None = None,
    out: str = "evaluation",
    best_of_n: int | Literal["auto", "off"] = "auto",
    selection_reward: str | None = None,
    bootstrap: int = 1000,
    tie_tolerance: float = 1e-6,
    model: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    allow_training_seeds: bool = False,
    allow_training_prompts: bool = False,
    overwrite: bool = False,
    batch_size: int = 8,
    starting_tokens: bool = True,
) -> dict[str, Any]:
    """Score methods and the raw prompt (and best-of-N) with several rewards; write report.md and metrics.json.

    Args:
        methods: NAME=PATH pairs: token files or run folders, e.g. [ipgo=runs/demo, other=runs/b] (one may go
            without brackets).
        rewards: rewards to score with, e.g. [{name: clip_score}, {name: aesthetic, args: {head: ...}}];
            include the optimised one and held-out ones.
        seeds: evaluation seeds, e.g. "1000-1003"; seeds used in optimisation are refused.
        prompts: prompt file; default: the prompts of the first prompt-wise method.
        column: the column of a .csv/.jsonl prompt file that holds the prompts (default "prompt").
        out: output folder (report.md, metrics.json, grid_*.png of the first 16 prompts).
        best_of_n: candidates per (prompt, seed) of the best-of-N baseline; "auto" matches the first
            method's sampler calls per prompt; "off" leaves it out.
        selection_reward: reward best-of-N selects with; default: the first method's optimised reward.
        bootstrap: resamples for the win-rate confidence intervals.
        tie_tolerance: score differences up to this count as ties.
        model: base model id or folder; default: the one in the token files.
        device: torch device.
        dtype: float32, float16 or bfloat16; default: the one the first method was trained in.
        allow_training_seeds: evaluate on seeds used in optimisation too (flagged in the outputs).
        allow_training_prompts: evaluate prompt-batch tokens on their training prompts (flagged).
        overwrite: write into a non-empty `out`.
        batch_size: images per pipeline call, and per reward call (lower it if the device runs out of memory).
        starting_tokens: also render the first method's tokens as initialised, before its first step
            (`<name>_start`).
    """
    check_batch_size(batch_size)
    check_device(device)
    if dtype is not None:
        torch_dtype(dtype)  # a bad name fails before any model loads
    check_output_folder(out, overwrite, "ipgo.evaluate")
    named = _parse_methods(methods)
    token_files = {name: load_tokens(path) for name, path in named.items()}
    first = next(iter(token_files.values()))
    _check_same_model(token_files)
    if dtype is None and len({rendering_dtype(t, device) for t in token_files.values()}) > 1:
        listed = ", ".join(f"{name}: {t.extra.get('dtype', 'float32')}" for name, t in token_files.items())
        raise UserError(f"the methods were trained in different dtypes ({listed}) and render in one pipeline: choose "
                        "its dtype with --dtype")
    seed_list = parse_seeds(seeds)
    prompt_list = _prompts(prompts, column, token_files)
    flags: dict[str, list[str]] = {}
    for name, tokens in token_files.items():
        used = check_held_out(tokens, seed_list, allow_training_seeds)
        flags[name] = [f"seeds {used} were used in optimisation"] if used else []
        if tokens.train_prompts is not None:
            trained = {prompt_key(p) for p in tokens.train_prompts}
            seen = sorted(p for p in prompt_list if prompt_key(p) in trained)
            if seen and not allow_training_prompts:
                raise UserError(
                    f"{len(seen)} evaluation prompts (e.g. {seen[0]!r}) were in the training split of {name!r}; "
                    "prompt-batch tokens must be judged on new prompts. Use other prompts, or pass "
                    "--allow_training_prompts true (flagged)."
                )
            if seen:
                flags[name].append(f"{len(seen)} prompts were in its training split")

    for tokens in token_files.values():
        tokens.tokens_for(prompt_list)  # a prompt-wise file must hold every prompt
    first_name = next(iter(token_files))
    start = {f"{first_name}_start": initial_tokens(first, prompt_list)} if starting_tokens else {}
    if bootstrap < 1:
        raise UserError(f"bootstrap={bootstrap}: the win-rate intervals need at least 1 resample (e.g. 1000)")
    if not 0 <= tie_tolerance < math.inf:
        raise UserError(f"tie_tolerance={tie_tolerance}: give a finite score difference >= 0 (e.g. 1e-6)")
    # everything that can be checked without weights is checked before any model loads
    reward = build_reward(rewards)
    settings = sampler_settings(first)
    reward.check(prompt_list, settings["height"], settings["width"])
    n = _candidates(best_of_n, first)
    matched = n > 0 and n == _matched_or_none(first)
    selector = _selector(selection_reward, first, reward) if n else None
    pipeline_config(first, model)  # the model exists and is of the tokens' family (all methods share it)
    for tokens in token_files.values():
        check_prompts_fit(tokens, prompt_list, model)
    reward = reward.to(device)
    reward.load()  # before the pipeline: a missing reward model is reported without a long wait
    pipe = load_pipeline(first, model, device, dtype)
    for tokens in token_files.values():
        check_tokens(pipe, tokens)
    out_dir = Path(out)

    renders = len(prompt_list) * len(seed_list) * (1 + len(token_files) + len(start) + max(n - 1, 0))
    with progress_bar(renders, "ipgo.evaluate") as progress:
        scores, images = {}, {}  # images: of the first GRID_PROMPTS prompts only, for the grids
        renderings = [("raw", first, False), *((name, t, True) for name, t in {**token_files, **start}.items())]
        for name, tokens, tuned in renderings:
            scores[name], images[name] = _render_and_score(pipe, tokens, tuned, reward, prompt_list, seed_list,
                                                           progress, batch_size)
        chosen: dict[tuple[int, int], int] = {}
        if n:
            images[f"best_of_{n}"], scores[f"best_of_{n}"], chosen = _best_of_n(
                pipe, first, reward, prompt_list, seed_list, n, selector, images["raw"], scores["raw"], progress,
                batch_size
            )

    metrics = _metrics(named, token_files, scores, flags, prompt_list, seed_list, chosen, tie_tolerance, bootstrap)
    metrics["settings"] = {"prompts": prompt_list, "seeds": seed_list, "rewards": list(reward.names),
                           "reward_weights": {name: term.reward.weights for name, term in zip(reward.names,
                                                                                              reward.terms)},
                           "selection_reward": selector if n else None, "best_of_n": n,
                           "best_of_n_matches_compute": matched, "bootstrap": bootstrap,
                           "tie_tolerance": tie_tolerance}
    # Before any grid is replaced (with --overwrite): the earlier evaluation's other grids go, and metrics.json
    # names, without figures, the methods whose grids this run writes. A write that fails part-way then leaves no
    # report that the new grids would contradict, and the next run still finds every grid to remove.
    methods = [name for name in images if name != "raw"]
    for path in _earlier_grids(out_dir) - {out_dir / f"grid_{name}.png" for name in methods}:
        path.unlink(missing_ok=True)
    (out_dir / "report.md").unlink(missing_ok=True)
    write_text(out_dir / "metrics.json", json.dumps({"writing": True, "methods": dict.fromkeys(methods, {})}) + "\n")
    for name in methods:
        save_before_after(images["raw"] / 255, images[name] / 255, out_dir / f"grid_{name}.png")
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    report = report_markdown(metrics)
    write_text(out_dir / "report.md", report)
    print(report)
    return metrics


def _earlier_grids(out: Path) -> set[Path]:
    """The grids an earlier evaluation in `out` wrote, as its metrics.json names them (nothing else is removed)."""
    try:
        methods = json.loads((out / "metrics.json").read_text())["methods"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {out / f"grid_{name}.png" for name in methods if name != "raw" and "/" not in name} if isinstance(
        methods, dict) else set()


def _selector(selection_reward: str | None, tokens: TokenFile, reward: CombinedReward) -> str:
    """The scored reward best-of-N selects with: the one given, or the one the run optimised, with the same weights
    where the token file records them (a held-out judge of the same kind, another CLIP say, is never picked)."""
    if selection_reward is not None:
        if selection_reward not in reward.names:
            raise UserError(f"--selection_reward {selection_reward}: not among the rewards scored "
                            f"({', '.join(reward.names)})")
        return selection_reward
    optimised = json.loads(tokens.extra.get("rewards", "[]"))
    if len(optimised) != 1:
        what = f"a combination of rewards ({', '.join(optimised)})" if optimised else "no recorded reward"
        raise UserError(f"the run optimised {what}; best-of-N selects with one: set --selection_reward NAME")
    kind = re.sub(r"_\d+$", "", optimised[0])  # a combination names a second reward of one kind clip_score_2
    weights = json.loads(tokens.extra.get("reward_weights", "{}")).get(optimised[0])
    same_kind = {name: term.reward.weights for name, term in zip(reward.names, reward.terms)
                 if term.reward.name == kind}
    same = [name for name, scored in same_kind.items() if weights is None or scored == weights]
    if not same_kind:
        raise UserError(f"best-of-N selects with the optimised reward {kind!r}, which is not among the rewards scored "
                        f"({', '.join(reward.names)}): add it to --rewards or set --selection_reward")
    if not same:
        scored = "; ".join(f"{name}: {source}" for name, source in same_kind.items())
        raise UserError(f"best-of-N selects with the reward the run optimised, {kind} with weights {weights}, but "
                        f"--rewards scores {kind} with other weights ({scored}): add {kind} with the run's weights "
                        "to --rewards, or choose the selector with --selection_reward")
    if not weights and len(same) > 1:
        raise UserError(f"--rewards scores {kind} more than once ({', '.join(same)}) and the token file does not "
                        "record which weights the run optimised: choose the selector with --selection_reward")
    return same[0]


def _matched_or_none(tokens: TokenFile) -> int | None:
    """`matched_n`, or None for a token file that records no compute."""
    try:
        return matched_n(tokens)
    except UserError:
        return None


def _candidates(best_of_n: int | str, tokens: TokenFile) -> int:
    """N of best-of-N: a number >= 0 (0: off), "auto" (matched to the run's sampler calls) or "off"."""
    if best_of_n == "off":
        return 0
    if best_of_n == "auto":
        n = matched_n(tokens)
        if n < 2:  # best-of-1 would be the raw prompt itself
            warnings.warn(f"the run spent {n} sampler call per prompt, so best-of-N at matched compute is the raw "
                          "prompt itself: left out (give --best_of_n N to compare with N candidates anyway)",
                          stacklevel=3)
            return 0
        return n
    try:
        n = int(best_of_n)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise UserError(f"best_of_n={best_of_n!r}: give a number of candidates (0 for none), 'auto' or 'off'")
    if n == 1:
        raise UserError("best_of_n=1 would pick the raw prompt's own image: give 2 or more candidates, or 'off'")
    return n


def _parse_methods(methods: list[str] | str) -> dict[str, str]:
    named = {}
    for item in [methods] if isinstance(methods, str) else methods:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name == "raw" or name.startswith("best_of_") or name.endswith("_start"):
            raise UserError(f"cannot read the method {item!r}: write NAME=PATH (NAME not 'raw', 'best_of_*' or "
                            "'*_start', which name the baselines)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise UserError(f"the method name {name!r} names its grid file grid_<name>.png: use letters, digits and "
                            "_ . + - only")
        if name in named:
            raise UserError(f"the method name {name!r} is given twice")
        named[name] = path
    if not named:
        raise UserError("no methods to evaluate: give --methods '[NAME=PATH, ...]'")
    return named


RENDER_SETTINGS = ("scheduler", "num_steps", "guidance_scale", "height", "width")


def _check_same_model(token_files: dict[str, TokenFile]) -> None:
    """Methods compared on the same seeds must share the model and the sampler that renders them (the raw
    prompt and best-of-N render with the first method's)."""
    models = {(t.family, portable_model_name(t.base_model), t.extra.get("revision"), t.extra.get("variant"))
              for t in token_files.values()}
    if len(models) > 1:
        listed = "; ".join(f"{family} {model} (revision {revision}, variant {variant})"
                           for family, model, revision, variant in sorted(models, key=str))
        raise UserError(f"the methods were made for different models: {listed}; evaluate them separately")
    samplers = {name: {**{k: sampler_settings(t)[k] for k in RENDER_SETTINGS},
                       **{k: t.extra[k] for k in ("max_sequence_length",) if k in t.extra}}  # SD 3's T5 length
                for name, t in token_files.items()}
    if len({json.dumps(s, sort_keys=True) for s in samplers.values()}) > 1:
        listed = "; ".join(f"{name}: {settings}" for name, settings in samplers.items())
        raise UserError(
            f"the methods were trained with different sampler settings ({listed}), so their images on the same "
            "seeds are not paired with each other or with the raw prompt: evaluate them separately"
        )


def _prompts(path: str | None, column: str | None, token_files: dict[str, TokenFile]) -> list[str]:
    if path is not None:
        return read_prompts(path, column)
    if column is not None:
        raise UserError(f"--column {column} names a column of a prompt file: give the file with --prompts FILE")
    for tokens in token_files.values():
        if tokens.prompts is not None:
            return list(tokens.prompts)
    raise UserError("give the prompts to evaluate on with --prompts FILE (the methods hold shared tokens)")


def _render_and_score(pipe: Any, tokens: TokenFile, tuned: bool, reward: CombinedReward, prompts: list[str],
                      seeds: list[int], progress: tqdm | None, batch_size: int) -> tuple[dict[str, Tensor], Tensor]:
    """Every reward's scores (prompts, seeds) of the renders, and the renders of the first GRID_PROMPTS prompts as
    uint8 (kept for the grids: all of them would not fit in memory for a large prompt set at 1024 px)."""
    parts, kept = [], torch.zeros(0, dtype=torch.uint8)
    for first in range(0, len(prompts), GRID_PROMPTS):
        chunk = prompts[first : first + GRID_PROMPTS]
        images = render(pipe, tokens, chunk, seeds, tuned, progress, batch_size)
        parts.append(score(reward, images, chunk, batch_size))
        if first == 0:
            kept = as_uint8(images)
    return {name: torch.cat([part[name] for part in parts]) for name in reward.names}, kept


def _best_of_n(pipe: Any, tokens: TokenFile, reward: CombinedReward, prompts: list[str], seeds: list[int], n: int,
               selector: str, raw: Tensor, raw_scores: dict[str, Tensor], progress: tqdm | None = None,
               batch_size: int = 8) -> tuple[Tensor, dict[str, Tensor], dict[tuple[int, int], int]]:
    """Per (prompt, seed): the best by `selector` of the raw prompt's image on the seed itself (the raw method's
    very image and scores, so a pick of it is an exact tie) and on N - 1 more seeds. `raw`: the raw renders (uint8)
    of the first prompts; the picks are returned for as many."""
    rows, row_scores, chosen = [], {name: torch.zeros(len(prompts), len(seeds)) for name in reward.names}, {}
    for i, prompt in enumerate(prompts):
        picked = []
        for j, seed in enumerate(seeds):
            candidates = candidate_seeds(seed, n)
            candidate_scores = {name: values[i : i + 1, j : j + 1] for name, values in raw_scores.items()}
            more = torch.zeros(0)
            if n > 1:
                more = render(pipe, tokens, [prompt], candidates[1:], False, progress, batch_size)  # (1, n - 1, ...)
                more_scores = score(reward, more, [prompt], batch_size)
                candidate_scores = {name: torch.cat([values, more_scores[name]], dim=1)
                                    for name, values in candidate_scores.items()}
            best = int(candidate_scores[selector][0].argmax())
            chosen[(i, j)] = candidates[best]
            if i < len(raw):
                picked.append(raw[i, j] if best == 0 else as_uint8(more[0, best - 1]))
            for name in reward.names:
                row_scores[name][i, j] = candidate_scores[name][0, best]
        if picked:
            rows.append(torch.stack(picked))
    return torch.stack(rows), row_scores, chosen


def _metrics(named: dict[str, str], token_files: dict[str, TokenFile], scores: dict[str, dict[str, Tensor]],
             flags: dict[str, list[str]], prompts: list[str], seeds: list[int], chosen: dict[tuple[int, int], int],
             tie_tolerance: float, bootstrap: int) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    images = []
    for method, by_reward in scores.items():
        kind = ("raw" if method == "raw" else "best_of_n" if method.startswith("best_of_") else
                "ipgo" if method in named else "start")
        entry: dict[str, Any] = {"kind": kind, "rewards": {}, "flags": flags.get(method, [])}
        if kind == "start":
            entry["tokens"] = f"{named[method.removesuffix('_start')]}, as initialised"
        if kind == "ipgo":
            entry["tokens"] = named[method]
            entry["compute"] = json.loads(token_files[method].extra.get("compute", "{}"))
        for reward_name, values in by_reward.items():
            stats = summary_statistics(values)
            if kind != "raw":
                stats.update(win_statistics(values, scores["raw"][reward_name], tie_tolerance, bootstrap))
            entry["rewards"][reward_name] = stats
        methods[method] = entry
        for i, prompt in enumerate(prompts):
            for j, seed in enumerate(seeds):
                record = {"method": method, "prompt": prompt, "seed": seed,
                          "scores": {r: float(v[i, j]) for r, v in by_reward.items()}}
                if kind == "best_of_n":
                    record["candidate_seed"] = chosen[(i, j)]
                images.append(record)
    return {"schema_version": 2, "methods": methods, "images": images}


def report_markdown(metrics: dict[str, Any]) -> str:
    """The evaluation as a Markdown report (also printed)."""
    settings = metrics["settings"]
    lines = [
        "# ipgo evaluation", "",
        f"{len(settings['prompts'])} prompts x {len(settings['seeds'])} seeds {settings['seeds']}; every method "
        "renders the same prompts and seeds. Win rates compare with the raw prompt on the same prompt and seed "
        f"(ties: |difference| <= {settings['tie_tolerance']}); the win rate is wins / images, so a tie counts as "
        f"no win. Its 95% intervals resample prompts ({settings['bootstrap']} resamples; never narrower than the "
        "Wilson interval over prompts). Standard errors are over prompt means. Each grid `grid_<method>.png` holds "
        f"the first {min(GRID_PROMPTS, len(settings['prompts']))} prompts, a row each: the raw prompt's images on "
        "the left, the method's on the right, seed by seed.",
    ]
    if settings["best_of_n"]:
        matching = ("N = the optimisation's sampler calls per prompt, spent at every seed"
                    if settings.get("best_of_n_matches_compute", True) else
                    "N given by hand: not matched to the optimisation's sampler calls per prompt")
        lines.append(f"best_of_{settings['best_of_n']}: the raw prompt's best of {settings['best_of_n']} samples "
                     f"by `{settings['selection_reward']}` ({matching}), its own seed's image among them.")
    for reward in settings["rewards"]:
        weights = settings.get("reward_weights", {}).get(reward)
        lines += ["", f"## {reward}", "", *([f"Weights: `{weights}`", ""] if weights else []),
                  "| method | mean ± s.e. | wins / ties / losses | win rate [95% CI] |", "|---|---:|---:|---:|"]
        for method, entry in metrics["methods"].items():
            stats = entry["rewards"][reward]
            stderr = "—" if stats["stderr"] is None else f"{stats['stderr']:.4f}"
            row = f"| {method} | {stats['mean']:.4f} ± {stderr} | "
            if "wins" in stats:
                low, high = stats["win_rate_ci"]
                row += (f"{stats['wins']} / {stats['ties']} / {stats['losses']} | "
                        f"{stats['win_rate']:.2f} [{low:.2f}, {high:.2f}] |")
            else:
                row += "— | — |"
            lines.append(row)
    lines += ["", "## Methods", ""]
    for method, entry in metrics["methods"].items():
        if entry["kind"] == "raw":
            continue
        detail = f"- **{method}** ({entry['kind']}): grid `grid_{method}.png`"
        if entry["kind"] == "start":
            detail += f"; {entry['tokens']}, before the first step: what adding tokens at all does"
        compute = entry.get("compute") or {}
        if "fit_seconds" in compute:
            where = compute.get("device") if compute.get("processes", 1) == 1 else \
                f"{compute['processes']} processes ({compute.get('device')} and others)"
            detail += (f"; optimisation {compute['fit_seconds']:.1f} s on {where}, peak memory "
                       f"{compute.get('peak_memory_bytes', 0) / 2**20:.0f} MiB ({compute.get('memory_kind')}), "
                       f"{compute.get('sampler_calls_per_prompt', 0):.0f} sampler calls per prompt")
        if entry["flags"]:
            detail += "; **flagged: " + "; ".join(entry["flags"]) + "**"
        lines.append(detail)
    return "\n".join(lines) + "\n"


def main(args: list[str] | None = None) -> None:
    """Command line of `python -m ipgo.evaluate`; bad input ends with its message and exit code 2."""
    from jsonargparse import auto_cli

    with reported("ipgo.evaluate"):
        auto_cli(evaluate, args=args, as_positional=False, prog="python -m ipgo.evaluate")


if __name__ == "__main__":
    main()
