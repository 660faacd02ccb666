import os
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from ipgo import testing
from ipgo.testing import clip_tokenizer, tiny_aesthetic_head_path, tiny_clip_path, tiny_sd_path

PROMPTS = ["a photo of a cat", "An astronaut riding a horse, 4k!!", "don't  stop  émigré 123", "🐱 ü"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_open_clip(prompt: str) -> None:
    ids = clip_tokenizer()(prompt).input_ids
    ref = open_clip.tokenize([prompt])[0]
    assert ids == ref[: int((ref != 0).sum())].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407


def test_tokenizer_settings_and_round_trip(tmp_path: Path) -> None:
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    batch = dict(padding="max_length", max_length=77, truncation=True)
    assert again(PROMPTS, **batch).input_ids == tok(PROMPTS, **batch).input_ids


def test_tokenizer_calls_are_independent() -> None:
    first = clip_tokenizer()
    first.add_tokens(["<ipgo-placeholder>"])
    assert len(first) == 49409 and len(clip_tokenizer()) == 49408


def test_tiny_sd_renders(tiny_sd_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.clip_sample is False
    out = pipe(
        "a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.rglob("*.safetensors"))
    assert files
    return {f"{f.relative_to(folder)}:{k}": v for f in files for k, v in load_file(f).items()}


def test_builds_are_bit_identical_and_leave_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = [build(tmp_path / "a") for build in (tiny_sd_path, tiny_clip_path, tiny_aesthetic_head_path)]
    assert torch.equal(torch.rand(3), expected_next)
    b = [build(tmp_path / "b") for build in (tiny_sd_path, tiny_clip_path, tiny_aesthetic_head_path)]
    for folder_a, folder_b in zip(a[:2], b[:2]):
        wa, wb = _weights(folder_a), _weights(folder_b)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = torch.load(a[2], weights_only=True), torch.load(b[2], weights_only=True)
    assert all(torch.equal(ha[k], hb[k]) for k in ha) and ha["layers.0.weight"].std() > 0


def test_cache_reused_and_incomplete_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPGO_CACHE", str(tmp_path))
    head = tiny_aesthetic_head_path()
    assert head.parent.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [head.parent.name]  # no temp dirs left behind
    stamp = head.stat().st_mtime_ns
    assert tiny_aesthetic_head_path() == head and head.stat().st_mtime_ns == stamp
    (head.parent / testing._COMPLETE).unlink()  # as if a build had been interrupted
    assert tiny_aesthetic_head_path() == head and (head.parent / testing._COMPLETE).exists()


def test_tiny_clip_loads(tiny_clip_dir: Path) -> None:
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    assert model.config.projection_dim == 768 and model.config.vision_config.image_size == 32
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert processor.crop_size.height == 32 and processor.size.shortest_edge == 32
    assert os.path.isfile(tiny_clip_dir / "preprocessor_config.json")
