from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipgo.errors import UserError
from ipgo.module import BestTokens
from ipgo.rewards import (
    REWARDS,
    Aesthetic,
    ClipScore,
    CombinedReward,
    HPSv2,
    PickScore,
    Reward,
    RewardTerm,
    ShapesOracle,
    UnknownRewardError,
    differentiable_preprocess,
    reward_class,
)
from ipgo.rewards.combine import RunningStats, frozen_statistics
from ipgo.testing import TINY_OPEN_CLIP_NAME, TINY_SOURCES, tiny_hps_checkpoint_path

PROMPTS = ["a photo of a cat", "a dog on the moon", "an oil painting of a lighthouse"]


@pytest.fixture(scope="module")
def hps_file(ipgo_cache: Path) -> Path:
    return tiny_hps_checkpoint_path(ipgo_cache)


@pytest.fixture(scope="module")
def hps(hps_file: Path) -> HPSv2:
    reward = HPSv2(str(hps_file), model_name=TINY_OPEN_CLIP_NAME)
    reward.load()
    return reward


@pytest.fixture(scope="module")
def pick(tiny_clip_dir: Path) -> PickScore:
    reward = PickScore(str(tiny_clip_dir), str(tiny_clip_dir))
    reward.load()
    return reward


@pytest.fixture(scope="module")
def clip_score(tiny_clip_dir: Path) -> ClipScore:
    reward = ClipScore(str(tiny_clip_dir))
    reward.load()
    return reward


@pytest.fixture(scope="module")
def aesthetic(tiny_clip_dir: Path, aesthetic_head_file: Path) -> Aesthetic:
    reward = Aesthetic(str(aesthetic_head_file), str(tiny_clip_dir))
    reward.load()
    return reward


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))


def _check_reward(reward: Reward, images: torch.Tensor) -> None:
    assert not any(p.requires_grad for p in reward.parameters())
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    reward.train()
    assert not any(m.training for m in reward.modules())
    with torch.no_grad():
        single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(reward(images, PROMPTS), single, atol=1e-5, rtol=0)


# --- registry -------------------------------------------------------------------------------------


def test_registry() -> None:
    assert {"clip_score", "aesthetic", "hpsv2", "pickscore"} <= REWARDS.keys()
    for name, cls in REWARDS.items():
        assert reward_class(name) is cls and cls.name == name


def test_unknown_reward_lists_known_names() -> None:
    with pytest.raises(UnknownRewardError, match=r"'pickscroe'.*clip_score, aesthetic, hpsv2, pickscore"):
        reward_class("pickscroe")
    assert issubclass(UnknownRewardError, UserError) and issubclass(UnknownRewardError, ValueError)


# --- combined -------------------------------------------------------------------------------------


def test_combined_is_the_weighted_sum(clip_score: ClipScore, aesthetic: Aesthetic, images: torch.Tensor) -> None:
    combined = CombinedReward(
        [RewardTerm(clip_score, weight=2.0), RewardTerm(aesthetic, weight=0.5, normalize="fixed", offset=1, scale=4)]
    )
    combined.load()
    assert combined.name == "combined"
    pixels = images.clone().requires_grad_(True)
    total = combined(pixels, PROMPTS)
    with torch.no_grad():
        a, b = clip_score(images, PROMPTS), aesthetic(images, PROMPTS)
    torch.testing.assert_close(total.detach(), 2.0 * a + 0.5 * (b - 1) / 4)
    assert set(combined.components) == {"clip_score", "aesthetic"}
    torch.testing.assert_close(combined.components["aesthetic"], b)  # raw, not normalised
    assert not combined.components["clip_score"].requires_grad
    total.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_combined_running_normalisation(clip_score: ClipScore, images: torch.Tensor) -> None:
    combined = CombinedReward([RewardTerm(clip_score, normalize="running"), RewardTerm(clip_score, weight=0.0)])
    combined.load()
    assert combined.names == ["clip_score", "clip_score_2"]
    first = combined(images, PROMPTS)
    raw1 = combined.components["clip_score"]
    torch.testing.assert_close(first, (raw1 - raw1.double().mean().float()) / raw1.double().std().float())
    second_images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    second = combined(second_images, PROMPTS[:2])
    seen = torch.cat([raw1, combined.components["clip_score"]]).double()
    stats = combined.stats["clip_score"]
    assert stats.count == 5
    assert stats.mean == pytest.approx(seen.mean().item()) and stats.std == pytest.approx(seen.std().item())
    expected = (combined.components["clip_score"].double() - seen.mean()) / seen.std()
    torch.testing.assert_close(second, expected.float())


def test_best_steps_and_reports_compare_on_one_scale(clip_score: ClipScore, images: torch.Tensor) -> None:
    """Running statistics move, so totals of different steps are on different scales: best-step selection
    compares raw components on the current scale, and frozen scoring leaves the statistics alone."""
    combined = CombinedReward([RewardTerm(clip_score, normalize="running")])
    best, token = BestTokens(1, 1, 1, 2), torch.zeros(1, 1, 2)
    for step, raw in enumerate([1.0, 5.0, 5.0, 5.0, 5.1]):
        components = torch.tensor([[raw]])
        combined.stats["clip_score"].update(components[:, 0])  # what a training call does
        total = combined.combine(components)  # the step's normalised reward: 0.71 at step 1, 0.49 at step 4
        best.update(torch.tensor([0]), total, components, token + step, token + step, combined.combine)
    assert best.prefix[0, 0, 0] == 4 and best.components[0, 0] == pytest.approx(5.1)  # the highest raw reward
    combined.load()
    count = combined.stats["clip_score"].count
    with frozen_statistics(combined):
        combined(images, PROMPTS)
    assert combined.stats["clip_score"].count == count
    combined(images, PROMPTS)
    assert combined.stats["clip_score"].count == count + len(PROMPTS)


class NaNReward(Reward):
    """Scores every image NaN, as a float16 overflow would."""

    name = "broken"

    def _load(self) -> None:
        pass

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.full((len(prompts),), float("nan"))


def test_a_zero_weight_term_is_only_logged(clip_score: ClipScore, images: torch.Tensor) -> None:
    """A logged-only term cannot poison the total, and non-finite scores do not enter running statistics."""
    combined = CombinedReward([RewardTerm(clip_score), RewardTerm(NaNReward(), weight=0.0, normalize="running")])
    combined.load()
    total = combined(images, PROMPTS)
    torch.testing.assert_close(total, combined.components["clip_score"])
    assert combined.components["broken"].isnan().all()
    assert torch.isfinite(combined.combine(torch.stack(list(combined.components.values()), dim=-1))).all()
    judged = CombinedReward([RewardTerm(clip_score), RewardTerm(ShapesOracle(), weight=0.0)])
    assert judged.differentiable  # an exact judge logged beside the optimised reward
    stats = RunningStats()
    stats.update(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert (stats.count, stats.mean, stats.std) == (2, 2.0, pytest.approx(2**0.5))


def test_running_stats_match_numpy() -> None:
    stats, values = RunningStats(), torch.randn(20, generator=torch.Generator().manual_seed(0))
    assert stats.std == 1.0
    for chunk in values.split([1, 7, 12]):
        stats.update(chunk)
    assert stats.mean == pytest.approx(values.double().mean().item())
    assert stats.std == pytest.approx(values.double().std().item())


def test_combined_term_validation(clip_score: ClipScore) -> None:
    with pytest.raises(UserError, match="normalize"):
        RewardTerm(clip_score, normalize="zscore")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="scale"):
        RewardTerm(clip_score, normalize="fixed", scale=0)
    with pytest.raises(UserError, match="at least one"):
        CombinedReward([])


def test_combined_loads_its_components(tiny_clip_dir: Path, images: torch.Tensor) -> None:
    inner = ClipScore(str(tiny_clip_dir))
    combined = CombinedReward([RewardTerm(inner)])
    combined.load()
    assert inner.loaded
    torch.testing.assert_close(combined(images, PROMPTS), combined.components["clip_score"])


# --- HPSv2 ----------------------------------------------------------------------------------------


def test_hps_shape_gradient_batch_invariance(hps: HPSv2, images: torch.Tensor) -> None:
    assert hps.name == "hpsv2" and hps._size == 32
    _check_reward(hps, images)


def test_hps_is_the_open_clip_cosine(hps: HPSv2, hps_file: Path, images: torch.Tensor) -> None:
    state = torch.load(hps_file, weights_only=True)
    torch.testing.assert_close(hps.model.state_dict()["text_projection"], state["text_projection"])
    with torch.no_grad():
        pixels = differentiable_preprocess(images, 32, hps._mean, hps._std, fit="pad")  # as HPSv2 scores
        image = F.normalize(hps.model.encode_image(pixels), dim=-1)
        text = F.normalize(hps.model.encode_text(hps.tokenizer(PROMPTS)), dim=-1)
        expected = torch.diagonal(image @ text.T)
        torch.testing.assert_close(hps(images, PROMPTS), expected)


def test_hps_wrapped_state_dict_loads(tmp_path: Path, hps: HPSv2, hps_file: Path, images: torch.Tensor) -> None:
    state = torch.load(hps_file, weights_only=True)
    wrapped = tmp_path / "hps.pt"
    torch.save({"state_dict": state}, wrapped)
    (tmp_path / f"{TINY_OPEN_CLIP_NAME}.json").write_text(hps_file.with_name(f"{TINY_OPEN_CLIP_NAME}.json").read_text())
    other = HPSv2(str(wrapped), model_name=TINY_OPEN_CLIP_NAME)
    other.load()
    with torch.no_grad():
        torch.testing.assert_close(other(images, PROMPTS), hps(images, PROMPTS))


def test_hps_tiny_name(monkeypatch: pytest.MonkeyPatch, ipgo_cache: Path, images: torch.Tensor) -> None:
    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))  # the session's cache, not ~/.cache/ipgo
    assert "tiny:hps" in TINY_SOURCES
    reward = HPSv2("tiny:hps", model_name=TINY_OPEN_CLIP_NAME)
    reward.load()
    assert torch.isfinite(reward(images, PROMPTS)).all()


def test_hps_preprocess_matches_open_clip(hps: HPSv2) -> None:
    import open_clip

    smooth = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    smooth = F.interpolate(smooth, (40, 48), mode="bilinear")[0]
    image = Image.fromarray((smooth * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    transform = open_clip.image_transform(hps.model.visual.image_size, is_train=False, mean=hps._mean, std=hps._std)
    expected = transform(image)[None]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    ours = differentiable_preprocess(pixels, hps._size, hps._mean, hps._std)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    diff = (ours - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1


def test_hps_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no-hps\.pt.*HPSv2"):
        HPSv2(str(tmp_path / "no-hps.pt"))


def test_hps_unknown_architecture(hps_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-arch"):
        HPSv2(str(hps_file), model_name="no-such-arch")  # at construction, before any model loads


def test_hps_checkpoint_of_another_architecture(hps_file: Path) -> None:
    with pytest.raises(UserError, match=r"(?s)hps\.pt.*does not fit.*ViT-H-14"):
        HPSv2(str(hps_file), model_name="ViT-B-32").load()  # small enough to build in a test


# --- PickScore ------------------------------------------------------------------------------------


def test_pickscore_is_scaled_cosine(pick: PickScore, images: torch.Tensor) -> None:
    assert pick.name == "pickscore"
    with torch.no_grad():
        image = pick.clip.get_image_features(pixel_values=differentiable_preprocess(images, 32, pick._mean, pick._std))
        tokens = pick.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        text = pick.clip.get_text_features(**tokens)
        image, text = F.normalize(image.pooler_output, dim=-1), F.normalize(text.pooler_output, dim=-1)
        expected = pick.clip.logit_scale.exp() * (image * text).sum(-1)
        torch.testing.assert_close(pick(images, PROMPTS), expected)
    assert pick.clip.logit_scale.exp() > 1  # a scaled score, not the bare cosine


def test_pickscore_gradient_batch_invariance(pick: PickScore, images: torch.Tensor) -> None:
    _check_reward(pick, images)


def test_pickscore_missing_processor(tmp_path: Path, tiny_clip_dir: Path, monkeypatch) -> None:
    from transformers import CLIPModel

    def no_loading(*args, **kwargs):
        raise AssertionError("the PickScore weights loaded before the processor files were found")

    monkeypatch.setattr(CLIPModel, "from_pretrained", no_loading)
    with pytest.raises(FileNotFoundError, match="no-processor"):
        PickScore(str(tiny_clip_dir), str(tmp_path / "no-processor"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="(?s)Could not load the CLIP model .*empty.* a local folder holding config.json"):
        PickScore(str(tiny_clip_dir), str(empty)).load()
