import json
from pathlib import Path

import pytest
import torch

from ipgo.backbones.base import ModelNotFoundError
from ipgo.errors import UserError
from ipgo.rewards.aesthetic import WeightsFormatError
from ipgo.rewards.image_reward import (
    CHECKPOINT_NAME,
    ImageReward,
    read_config,
    to_imagereward_key,
    to_module_key,
)
from ipgo.testing import tiny_image_reward_path

PROMPTS = ["a photo of a cat", "a dog on the moon", "an oil painting of a lighthouse"]


@pytest.fixture(scope="module")
def folder(ipgo_cache: Path) -> Path:
    return tiny_image_reward_path(ipgo_cache)


@pytest.fixture(scope="module")
def reward(folder: Path) -> ImageReward:
    loaded = ImageReward(str(folder))
    loaded.load()
    loaded.load()  # idempotent
    return loaded


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / CHECKPOINT_NAME, weights_only=True)


def _copy_folder(folder: Path, target: Path, state: dict[str, torch.Tensor]) -> str:
    """A folder like the tiny one with another ImageReward.pt."""
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (target / name).symlink_to(folder / name)
    torch.save(state, target / CHECKPOINT_NAME)
    return str(target)


def test_shape_gradient_and_frozen(reward: ImageReward, images: torch.Tensor) -> None:
    assert reward.name == "image_reward"
    assert sum(p.numel() for p in reward.parameters()) > 0
    assert not any(p.requires_grad for p in reward.parameters())
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_batch_invariance_and_eval_mode(reward: ImageReward, images: torch.Tensor) -> None:
    reward.train()
    assert not any(m.training for m in reward.modules())
    with torch.no_grad():
        batch = reward(images, PROMPTS)
        single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_scores_depend_on_prompt(reward: ImageReward, images: torch.Tensor) -> None:
    with torch.no_grad():
        same = images[:1].expand(3, -1, -1, -1)
        scores = reward(same, PROMPTS)
    assert len(set(scores.tolist())) == 3


def test_tiny_name_loads_the_same_model(
    reward: ImageReward, images: torch.Tensor, ipgo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    tiny = ImageReward("tiny:image-reward")
    tiny.load()
    with torch.no_grad():
        torch.testing.assert_close(tiny(images, PROMPTS), reward(images, PROMPTS), atol=0, rtol=0)


def test_normalisation_constants(reward: ImageReward, images: torch.Tensor) -> None:
    with torch.no_grad():
        raw = reward.model.mlp(reward.features(images, PROMPTS)).squeeze(-1)
        scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-6, rtol=0)
    assert not torch.allclose(scores, raw)


def test_tokens_as_in_image_reward_score(reward: ImageReward) -> None:
    ids, mask = reward.tokenize(["a photo of a cat", "a"])
    tok = reward.tokenizer
    assert ids.shape == mask.shape == (2, 35)
    assert (ids[:, 0] == tok.cls_token_id).all()  # ImageReward.score keeps [CLS]; it does not put [ENC] there
    assert ids[1, :3].tolist() == [tok.cls_token_id, tok.convert_tokens_to_ids("a"), tok.sep_token_id]
    assert mask[1].tolist() == [1] * 3 + [0] * 32 and (ids[1, 3:] == tok.pad_token_id).all()
    assert {"[DEC]", "[ENC]"} <= set(tok.get_vocab()) and tok.bos_token == "[DEC]"
    assert len(tok) == reward.model.text.config.vocab_size


def test_key_mapping_round_trips_and_covers_the_module(reward: ImageReward, folder: Path) -> None:
    ours = set(reward.model.state_dict())
    published = set(_checkpoint(folder))
    assert {to_imagereward_key(k) for k in ours} == published
    assert {to_module_key(k) for k in published} == ours
    assert all(to_module_key(to_imagereward_key(k)) == k for k in ours)
    assert all(to_imagereward_key(to_module_key(k)) == k for k in published)
    for name in (  # names of the published file (BLIP's timm-style ViT, med BERT, the MLP)
        "blip.visual_encoder.cls_token",
        "blip.visual_encoder.pos_embed",
        "blip.visual_encoder.patch_embed.proj.weight",
        "blip.visual_encoder.blocks.1.attn.qkv.bias",
        "blip.visual_encoder.blocks.0.attn.proj.weight",
        "blip.visual_encoder.blocks.0.norm2.weight",
        "blip.visual_encoder.norm.bias",
        "blip.text_encoder.embeddings.word_embeddings.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "mlp.layers.7.bias",
    ):
        assert name in published
    assert to_module_key("blip.visual_encoder.blocks.11.attn.proj.weight") == (
        "vision.encoder.layers.11.self_attn.projection.weight"
    )
    assert to_module_key("blip.itm_head.weight") is None


def test_unused_published_keys_are_accepted(folder: Path, tmp_path: Path, images: torch.Tensor) -> None:
    state = _checkpoint(folder)
    width = state["blip.visual_encoder.norm.weight"].shape[0]
    state["blip.vision_proj.weight"] = torch.zeros(256, width)
    state["blip.text_proj.bias"] = torch.zeros(256)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    extra = ImageReward(_copy_folder(folder, tmp_path / "extra", state))
    extra.load()
    assert torch.isfinite(extra(images, PROMPTS)).all()


def test_broken_checkpoints_fail_clearly(folder: Path, tmp_path: Path) -> None:
    state = _checkpoint(folder)
    state["blip.visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)
    with pytest.raises(
        WeightsFormatError, match=r"blocks\.0\.attn\.qkv\.weight has shape \(96, 31\), expected \(96, 32\)"
    ):
        ImageReward(_copy_folder(folder, tmp_path / "shape", state)).load()
    state = _checkpoint(folder)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"]
    state["blip.unknown.weight"] = torch.zeros(1)
    message = (
        r"missing keys \[blip\.text_encoder\.encoder\.layer\.1\.crossattention\.self\.value\.bias\]"
        r".*unexpected keys \[blip\.unknown\.weight\]"
    )
    with pytest.raises(WeightsFormatError, match=message):
        ImageReward(_copy_folder(folder, tmp_path / "keys", state)).load()
    (tmp_path / "list").mkdir()
    torch.save([1, 2], tmp_path / "list" / CHECKPOINT_NAME)
    with pytest.raises(WeightsFormatError, match="expected a state dict"):
        ImageReward(str(tmp_path / "list" / CHECKPOINT_NAME), config=str(folder / "config.json"),
                    tokenizer=str(folder)).load()


def test_missing_files_fail_at_construction(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"(?s)nothing\.pt.*THUDM/ImageReward.*ImageReward\.pt"):
        ImageReward(str(tmp_path / "nothing.pt"))
    with pytest.raises(ModelNotFoundError, match="has no ImageReward.pt"):
        ImageReward(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no-config.json"):
        ImageReward(str(folder), config=str(tmp_path / "no-config.json"))
    with pytest.raises(ModelNotFoundError, match="no-tokenizer"):
        ImageReward(str(folder), tokenizer=str(tmp_path / "no-tokenizer"))


def test_home_relative_paths_load(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  images: torch.Tensor) -> None:
    """`~` in the config and tokenizer paths works at load time too, not only in the construction checks."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(folder, home / "ir")
    monkeypatch.setenv("HOME", str(home))
    reward = ImageReward(str(folder / "ImageReward.pt"), tokenizer="~/ir", config="~/ir/config.json")
    reward.load()
    assert reward(images, ["a cat"] * len(images)).isfinite().all()


def test_missing_tokenizer_offline(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "weights").mkdir()
    for name in (CHECKPOINT_NAME, "config.json"):
        (tmp_path / "weights" / name).symlink_to(folder / name)
    reward = ImageReward(str(tmp_path / "weights"), tokenizer="ipgo-test/no-such-bert")
    with pytest.raises(ModelNotFoundError, match=r"(?s)ipgo-test/no-such-bert.*bert-base-uncased"):
        reward.load()


def test_config_defaults_and_med_config(tmp_path: Path) -> None:
    vision, text = read_config(None)
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"]) == (
        224,
        16,
        1024,
        24,
    )
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"], text["encoder_hidden_size"]) == (
        768,
        12,
        30524,
        1024,
    )
    med = {"hidden_size": 64, "num_hidden_layers": 3, "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    vision, text = read_config(tmp_path / "med_config.json")
    assert text["hidden_size"] == 64 and text["num_hidden_layers"] == 3 and text["encoder_hidden_size"] == 1024
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        read_config(tmp_path / "bad.json")
