"""The CUDA path: frozen weights in float16, tokens in float32 (skipped without CUDA; see conftest.py)."""

import json

import pytest
import torch
from safetensors import safe_open

from ipgo.cli import main
from ipgo.export import load_tokens, starting_tokens


@pytest.mark.gpu
def test_a_float16_run_on_cuda_learns_float32_tokens(tmp_path, ipgo_cache, monkeypatch):
    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    run = tmp_path / "run"
    main(["--config", "configs/tiny.yaml", "--trainer.accelerator", "gpu", "--trainer.max_epochs", "3",
          "--model.backbone.init_args.dtype", "float16", "--model.select", "last",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)])
    tokens = load_tokens(run / "tokens.safetensors")
    assert tokens.prefix.dtype == torch.float32 and torch.isfinite(tokens.prefix).all()
    metadata = safe_open(run / "tokens.safetensors", "pt").metadata()
    assert metadata["dtype"] == "float16"
    compute = json.loads(metadata["compute"])
    assert compute["memory_kind"] == "cuda max allocated" and compute["peak_memory_bytes"] > 0
    initial = starting_tokens(tokens, tokens.prompts)
    assert not torch.equal(tokens.prefix, initial.prefix)  # the last tokens: three steps moved them
    summary = json.loads((run / "summary.json").read_text())
    assert all(row["after"] is not None for row in summary["per_prompt"])  # the report writes NaN figures as null
