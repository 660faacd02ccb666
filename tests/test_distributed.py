"""Prompt-wise jobs over several processes (DDP, gloo on CPU) give each prompt its single-process tokens."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_two_process_prompt_batch_equals_one_process_with_the_whole_batch(tmp_path, ipgo_cache):
    """DDP averages the two ranks' gradients of 2 prompts each: the step of one process with all 4. No suffix and
    no rotation: DDP fails on parameters that get no gradient, so the tokens must have none."""
    args = ["--model.mode", "prompt-batch", "--data.limit", "4", "--data.val_fraction", "0", "--trainer.max_epochs",
            "2", "--model.tokens.n_suffix", "0", "--model.tokens.rotation_angles", "0"]
    fit(tmp_path / "one", *args, "--data.batch_size", "4", cache=ipgo_cache)
    fit(tmp_path / "two", *args, "--data.batch_size", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        cache=ipgo_cache)
    one, two = load_file(tmp_path / "one/tokens.safetensors"), load_file(tmp_path / "two/tokens.safetensors")
    assert one["prefix"].shape == (4, 32) and one["suffix"].shape == (0, 32)
    assert (one["prefix"] - two["prefix"]).abs().max() < 1e-5
