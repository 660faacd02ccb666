"""Prompt-wise jobs over several processes (DDP, gloo on CPU) give each prompt its single-process tokens."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
ARGS = ["--config", "configs/tiny.yaml", "--data.limit", "3", "--data.batch_size", "1", "--model.sampler.num_steps",
        "3", "--model.report_prompts", "1", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"]


def fit(run_dir: Path, *extra: str, cache: Path) -> None:
    env = {**os.environ, "IPGO_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "ipgo.fit", *ARGS, "--trainer.default_root_dir", str(run_dir),
                             *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_prompt_wise_equals_one_process(tmp_path, ipgo_cache):
    fit(tmp_path / "one", cache=ipgo_cache)
    stale = tmp_path / "two/shards/rank2.pt"  # left by a crashed three-process run: must not be merged
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp", cache=ipgo_cache)
    assert sorted(p.name for p in (tmp_path / "two/shards").iterdir()) == ["rank0.pt", "rank1.pt", "rank2.pt"]
    one, two = load_file(tmp_path / "one/tokens.safetensors"), load_file(tmp_path / "two/tokens.safetensors")
    assert one["prefix"].shape[0] == 3
    for key in ("prefix", "suffix"):
        assert (one[key] - two[key]).abs().max() < 1e-5  # every prompt, whichever rank optimised it
    assert (tmp_path / "two/summary.md").is_file() and (tmp_path / "two/before_after.png").is_file()
    # the training curves too: at each step the mean over the 3 prompts, of which the ranks optimised 2 and 1
    for key in ("train/reward", "train/conformity", "train/loss", "train/grad_norm"):
        assert logged(tmp_path / "two", key) == pytest.approx(logged(tmp_path / "one", key), abs=1e-5), key
        assert len(logged(tmp_path / "one", key)) == 3


def logged(run: Path, key: str) -> list[float]:
    rows = list(csv.DictReader((run / "csv/version_0/metrics.csv").open()))
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.mark.slow
def test_two_process_prompt_batch_equals_one_process_with_both_shares(tmp_path, ipgo_cache):
    """DDP averages the two ranks' gradients of a prompt each: the step of one process with both. No suffix and
    no rotation: DDP fails on parameters that get no gradient, so the tokens must have none. The 3 validation
    prompts are padded to 2 x 2 by Lightning; val/reward still counts each once."""
    prompts = tmp_path / "prompts.txt"
    names = [f"a {colour} {shape}" for colour in ("red", "green") for shape in ("cat", "dog", "cup")] + ["a blue cat"]
    prompts.write_text("\n".join(names) + "\n")
    # plain SGD with a large step: Adam's first steps follow the gradient's sign and would hide a wrong average
    args = ["--data.prompts", str(prompts), "--model.mode", "prompt-batch", "--data.limit", "7",
            "--data.val_fraction", "0.43", "--trainer.max_epochs", "2", "--model.tokens.n_suffix", "0",
            "--model.tokens.rotation_angles", "0", "--model.optimizer.class_path", "torch.optim.SGD",
            "--model.optimizer.init_args.lr", "1000"]
    # two steps an epoch, prompts {0, 1} then {2, 3} (data.shuffle is false: the processes' shares keep that order)
    fit(tmp_path / "one", *args, "--data.batch_size", "2", cache=ipgo_cache)
    fit(tmp_path / "two", *args, "--data.batch_size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        cache=ipgo_cache)
    one, two = load_file(tmp_path / "one/tokens.safetensors"), load_file(tmp_path / "two/tokens.safetensors")
    assert one["prefix"].shape == (4, 32) and one["suffix"].shape == (0, 32)
    assert (one["prefix"] - two["prefix"]).abs().max() < 1e-5
    computes = [json.loads(safe_open(tmp_path / run / "tokens.safetensors", "pt").metadata()["compute"])
                for run in ("one", "two")]
    assert [c["sampler_calls_per_prompt"] for c in computes] == [2, 2]  # best-of-N's budget: both ranks' renders
    assert [c["processes"] for c in computes] == [1, 2]
    assert len(logged(tmp_path / "one", "val/reward")) == 2
    assert logged(tmp_path / "two", "val/reward") == pytest.approx(logged(tmp_path / "one", "val/reward"), abs=1e-5)
