"""The benchmark script (`scripts/benchmark.py`): tiny runs of every variant and of the SD 1.5-shaped path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script, imported as a module."""
    spec = importlib.util.spec_from_file_location("ipgo_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_table(text: str) -> None:
    for variant in ("| floor |", "| ipgo |", "| notebook |", "| full |"):
        assert variant in text
    for ratio in ("b/a (ipgo / floor) = ", "c/b (notebook / ipgo) = ", "d/b (full / ipgo) = "):
        value = text.split(ratio, 1)[1].split(";")[0].split("\n")[0].rstrip(".")
        assert float(value) > 0, ratio
    assert "failed" not in text


@pytest.mark.slow
def test_tiny_run_writes_all_variants_and_throughput(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n<!-- cpu-tiny:start -->\nold\n<!-- cpu-tiny:end -->\ntail\n")
    text = bench.main(["--steps", "3", "--grad-steps", "1", "--repeats", "1", "--throughput", "1,2",
                           "--device", "cpu", "--in-process", "--out", str(out)])
    _check_table(text)
    assert "| 1 (notebook way) |" in text and "| 2 |" in text
    written = out.read_text()
    assert text in written and "old" not in written
    assert written.startswith("# Benchmarks\n\nkept\n") and written.endswith("<!-- cpu-tiny:end -->\ntail\n")


def test_hpsv2_reward_option(bench: ModuleType, ipgo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    text = bench.main(["--steps", "2", "--grad-steps", "1", "--repeats", "1", "--throughput", "", "--reward", "hpsv2",
                       "--device", "cpu", "--in-process", "--out", ""])
    _check_table(text)
    assert "HPSv2 reward" in text


@pytest.mark.slow
def test_sd15_shaped_path_scaled_down(bench: ModuleType, tmp_path: Path) -> None:
    """The --full-size path (save_pretrained, then StableDiffusion / ClipScore loading) with small configs."""
    out = tmp_path / "results.md"
    text = bench.main(["--full-size", "--small", "--steps", "2", "--grad-steps", "1", "--size", "64",
                           "--repeats", "1", "--throughput", "", "--device", "cpu", "--in-process",
                           "--cache", str(tmp_path / "models"), "--out", str(out), "--section", "none"])
    _check_table(text)
    assert "SD 1.5-shaped" in text and out.read_text() == text


@pytest.mark.slow
def test_variant_in_a_fresh_process(bench: ModuleType) -> None:
    """The default mode: one variant measured in a child process, its peak memory its own."""
    args = bench.parse_args(["--steps", "2", "--grad-steps", "1", "--repeats", "1", "--device", "cpu"])
    row = bench.measure(args, "ipgo", 2)
    assert row["note"] == "" and row["seconds"] > 0 and row["memory"] > 0
    assert (row["variant"], row["batch"], row["knob"]) == ("ipgo", 2, None)


def test_notebook_way_gives_the_truncated_gradient(bench: ModuleType, tiny_backbone) -> None:  # noqa: ANN001
    """Variant (c) pays for graphs of every step but must carry the same gradient as (b), LMS history included."""
    import torch

    from ipgo.inject import conditioning
    from ipgo.sampling import SamplerConfig, TruncatedSampler, initial_noise
    from ipgo.tokens import TokenConfig, TokenSets

    config = SamplerConfig(scheduler="lms", num_steps=6, grad_steps=2, height=32, width=32)
    sampler, tokens = TruncatedSampler(config), TokenSets(TokenConfig(rank=8), tiny_backbone.hidden_size, 1)
    noise = initial_noise(tiny_backbone, config, [0], "cpu")

    def gradient(notebook: bool) -> torch.Tensor:
        tokens.zero_grad()
        prefix, suffix = tokens([0])
        cond, uncond, *_ = conditioning(tiny_backbone, ["a cat"], prefix, suffix)
        sample = bench.notebook_sample(sampler, tiny_backbone, cond, uncond, noise) if notebook else sampler(
            tiny_backbone, cond, uncond, noise)
        sample.sum().backward()
        return torch.cat([p.grad.flatten() for p in tokens.parameters() if p.grad is not None])

    truncated = gradient(False)
    assert truncated.abs().max() > 0
    torch.testing.assert_close(gradient(True), truncated)


def test_sd15_configs_have_sd15_sizes(bench: ModuleType) -> None:
    """The full-size configs build SD 1.5's and CLIP ViT-L/14's parameter counts (on the meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    c = bench.sd15_configs()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(c["unet"])
        vae = AutoencoderKL.from_config(c["vae"])
        text = CLIPTextModel(CLIPTextConfig(**c["text"]))
        clip = CLIPModel(CLIPConfig(text_config=c["text"], vision_config=c["vision"], projection_dim=768))

    def millions(module: object) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6  # type: ignore[attr-defined]

    assert millions(unet) == pytest.approx(859.52, abs=0.1)
    assert millions(vae) == pytest.approx(83.65, abs=0.1)
    assert millions(text) == pytest.approx(123.06, abs=0.1)
    assert millions(clip) == pytest.approx(427.62, abs=0.1)
