from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from ipgo.errors import UserError
from ipgo.rewards import Aesthetic, ClipScore, Reward, differentiable_preprocess
from ipgo.rewards.aesthetic import AestheticHead
from ipgo.rewards.base import load_clip

LAION_HEAD = Path(__file__).resolve().parents[2] / "shared/data/weights/sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a photo of a cat", "a dog on the moon", "an oil painting of a lighthouse"]


@pytest.fixture(scope="module")
def rewards(tiny_clip_dir: Path, aesthetic_head_file: Path) -> dict[str, Reward]:
    loaded = {
        "clip_score": ClipScore(str(tiny_clip_dir)),
        "aesthetic": Aesthetic(str(aesthetic_head_file), str(tiny_clip_dir)),
    }
    for reward in loaded.values():
        reward.load()
        reward.load()  # idempotent
    return loaded


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["clip_score", "aesthetic"])
def test_shape_gradient_and_frozen(rewards: dict[str, Reward], images: torch.Tensor, name: str) -> None:
    reward = rewards[name]
    assert reward.name == name
    assert sum(p.numel() for p in reward.parameters()) > 0
    assert not any(p.requires_grad for p in reward.parameters())
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["clip_score", "aesthetic"])
def test_batch_invariance_and_eval_mode(rewards: dict[str, Reward], images: torch.Tensor, name: str) -> None:
    reward = rewards[name]
    reward.train()  # a parent's .train() must not switch on the head's dropout
    assert not any(m.training for m in reward.modules())
    with torch.no_grad():
        batch = reward(images, PROMPTS)
        single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_clip_score_and_aesthetic_match_their_formulas(rewards: dict[str, Reward], tiny_clip_dir: Path,
                                                       aesthetic_head_file: Path) -> None:
    """Recomputed with the CLIP model's own processor and forward pass and the head file, apart from ipgo's code.
    The images are 32 x 32 (the processor's size) and in steps of 1/255, so both preprocess them exactly alike."""
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2)).float() / 255
    pictures = [Image.fromarray((p * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for p in pixels]
    with torch.no_grad():
        out = clip(**tokenizer(PROMPTS, padding=True, return_tensors="pt"),
                   pixel_values=processor(images=pictures, return_tensors="pt").pixel_values)
        cosine = out.logits_per_image.diagonal() / clip.logit_scale.exp()  # CLIP's cosine of each image-prompt pair
        torch.testing.assert_close(rewards["clip_score"](pixels, PROMPTS), cosine, atol=1e-4, rtol=0)
        head = AestheticHead(out.image_embeds.shape[-1]).eval()  # its dropout off
        head.load_state_dict(torch.load(aesthetic_head_file, weights_only=True))
        unit = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)  # the LAION head takes unit vectors
        torch.testing.assert_close(rewards["aesthetic"](pixels, PROMPTS), head(unit).squeeze(-1), atol=1e-4, rtol=0)


def _test_image() -> Image.Image:
    smooth = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    smooth = torch.nn.functional.interpolate(smooth, (40, 48), mode="bilinear")[0]  # H 40, W 48
    return Image.fromarray((smooth * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_preprocess_matches_image_processor(tiny_clip_dir: Path, backend: str) -> None:
    from transformers import CLIPImageProcessorPil

    cls = CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil
    processor = cls.from_pretrained(tiny_clip_dir)
    image = _test_image()
    expected = processor(images=image, return_tensors="pt").pixel_values
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    ours = differentiable_preprocess(pixels, 32, processor.image_mean, processor.image_std)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    diff = (ours - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1  # uint8 rounding inside the processor


def test_preprocess_crops_like_torchvision_and_stretches_like_transformers() -> None:
    """ImageReward and the aesthetic head were trained on torchvision's CenterCrop, which rounds its offset to nearest;
    a processor sized by height and width alone stretches the image, keeping no aspect ratio."""
    from torchvision import transforms

    from ipgo.rewards.base import image_resize

    pixels = torch.rand(1, 3, 40, 49, generator=torch.Generator().manual_seed(0))  # resized to 32 x 39: margin 15
    reference = transforms.Compose([transforms.Resize(32, transforms.InterpolationMode.BICUBIC, antialias=True),
                                    transforms.CenterCrop(24), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])(pixels)
    nearest = differentiable_preprocess(pixels, 32, (0.5,) * 3, (0.5,) * 3, 24, crop_rounding="nearest")
    torch.testing.assert_close(nearest, reference, atol=1e-4, rtol=0)
    down = differentiable_preprocess(pixels, 32, (0.5,) * 3, (0.5,) * 3, 24)  # CLIPImageProcessor's offset
    assert (down - reference).abs().mean() > 0.1

    processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    image = _test_image()
    expected = processor(images=image, return_tensors="pt").pixel_values
    assert image_resize(processor) == (32, 32, "stretch")
    ours = differentiable_preprocess(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255, 32,
                                     processor.image_mean, processor.image_std, 32, "stretch")
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.02  # uint8 rounding inside the processor
    with pytest.raises(UserError, match="resizes to 32 x 48, not a square"):
        image_resize(CLIPImageProcessor(size={"height": 32, "width": 48}))


def test_preprocess_pads_like_open_clip_resize_longest() -> None:
    """HPSv2 scores with open_clip's resize-longest transform: the whole image, padded with black to a square."""
    import open_clip

    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    image = _test_image()  # H 40, W 48: resized to 27 x 32, padded by 2 and 3 rows
    expected = open_clip.image_transform(32, is_train=False, mean=mean, std=std, resize_mode="longest")(image)[None]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    ours = differentiable_preprocess(pixels, 32, mean, std, fit="pad")
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    diff = (ours - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1  # uint8 rounding inside the transform
    black = torch.tensor(mean).view(3, 1) / torch.tensor(std).view(3, 1)
    torch.testing.assert_close(ours[0, :, 0], -black.expand(3, 32))  # a padded row
    with pytest.raises(ValueError, match="crop_size applies to fit='crop' only"):
        differentiable_preprocess(pixels, 32, mean, std, crop_size=24, fit="pad")


def test_preprocess_square_and_crop_size() -> None:
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    out = differentiable_preprocess(images, 32, (0.5,) * 3, (0.5,) * 3, crop_size=24)
    assert out.shape == (2, 3, 24, 24)
    out.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="crop_size"):
        differentiable_preprocess(images, 16, (0.5,) * 3, (0.5,) * 3, crop_size=24)


def test_real_laion_head_loads(tiny_clip_dir: Path, images: torch.Tensor) -> None:
    if not LAION_HEAD.is_file():
        pytest.skip(f"{LAION_HEAD} not present")
    reward = Aesthetic(str(LAION_HEAD), str(tiny_clip_dir))  # the tiny CLIP projects to 768 like ViT-L/14
    reward.load()
    assert reward.head.layers[0].weight.shape == (1024, 768)
    assert torch.isfinite(reward(images, PROMPTS)).all()


def _save_head(path: Path, state: dict[str, torch.Tensor]) -> str:
    torch.save(state, path)
    return str(path)


def test_corrupted_head_names_the_key(tmp_path: Path, aesthetic_head_file: Path, tiny_clip_dir: Path) -> None:
    state = torch.load(aesthetic_head_file, weights_only=True)
    state["layers.2.weight"] = torch.zeros(128, 999)
    with pytest.raises(ValueError, match=r"layers\.2\.weight.*\(128, 999\).*\(128, 1024\)"):
        Aesthetic(_save_head(tmp_path / "shape.pth", state), str(tiny_clip_dir)).load()
    del state["layers.7.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['layers\.7\.bias'\]"):
        Aesthetic(_save_head(tmp_path / "keys.pth", state), str(tiny_clip_dir)).load()


def test_head_width_must_match_clip(tmp_path: Path, tiny_clip_dir: Path, monkeypatch) -> None:
    from transformers import CLIPModel

    def no_loading(*args, **kwargs):
        raise AssertionError("the CLIP weights loaded before the head's width was checked")

    monkeypatch.setattr(CLIPModel, "from_pretrained", no_loading)
    head = _save_head(tmp_path / "narrow.pth", AestheticHead(512).state_dict())
    with pytest.raises(ValueError, match="512-dim.*768-dim"):
        Aesthetic(head, str(tiny_clip_dir)).load()


def test_missing_local_paths_fail_at_construction(tmp_path: Path, aesthetic_head_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ClipScore(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match=r"improved-aesthetic-predictor and pass its path \(ipgo.fit: "
                                                r"--model.reward.init_args.head PATH"):
        Aesthetic(str(tmp_path / "head.pth"))
    with pytest.raises(FileNotFoundError, match="clip-folder"):
        Aesthetic(str(aesthetic_head_file), "./clip-folder")
    ClipScore("someone/some-clip")  # a Hub id: nothing checked or loaded yet


def test_forward_before_load_raises(tiny_clip_dir: Path, images: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match=r"\.load\(\)"):
        ClipScore(str(tiny_clip_dir))(images, PROMPTS)


def test_unknown_hub_model_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"(?s)ipgo-test/no-such-clip.*offline.*hf download"):
        ClipScore("ipgo-test/no-such-clip").load()


def test_folder_without_tokenizer_fails(tmp_path: Path, tiny_clip_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).symlink_to(tiny_clip_dir / name)
    with pytest.raises(OSError, match="no tokenizer files"):
        load_clip(str(tmp_path))


def test_load_follows_device_and_dtype(tiny_clip_dir: Path, images: torch.Tensor) -> None:
    reward = ClipScore(str(tiny_clip_dir)).double()
    reward.load()
    assert reward.clip.dtype == torch.float64
    assert reward(images, PROMPTS).dtype == torch.float32
    assert not any(k.startswith("_where") for k in reward.state_dict())


def test_a_rewards_weights_name_what_from_pretrained_reads(tmp_path, monkeypatch):
    """Recorded in token files to match evaluate's selector: an existing folder absolute however it was given (a
    relative `models/clip` is read before the Hub), Hub and tiny ids as they are."""
    from ipgo.rewards import PickScore
    from ipgo.rewards.base import weights_source

    (tmp_path / "models" / "clip").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert weights_source("models/clip") == str(tmp_path.resolve() / "models" / "clip")
    assert weights_source("./models/clip") == weights_source(str(tmp_path / "models" / "clip"))
    assert weights_source("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    assert ClipScore("tiny:clip").weights == "tiny:clip"
    assert PickScore().weights != PickScore(processor="openai/clip-vit-large-patch14").weights  # scored differently
