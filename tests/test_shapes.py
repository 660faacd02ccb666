import json
from pathlib import Path

import pytest
import torch

import ipgo.shapes
from ipgo.shapes import all_scenes, caption, caption_split, parse, read, render, score


def test_oracle_is_exact_on_rendered_scenes():
    generator = torch.Generator().manual_seed(3)
    for scene in all_scenes():
        for _ in range(3):  # different jitter each time
            result = score(render(scene, generator), caption(scene))
            assert result.all_correct == 1.0, caption(scene)


def test_oracle_reads_colours_at_any_brightness_it_sees():
    """Colours are read by hue: a dim shape (still above the foreground threshold) keeps its colour."""
    for colour in ("red", "green", "blue", "yellow"):
        image = render(parse(f"a {colour} square on the left")) * 0.45
        assert read(image)["left"].colour == colour


def test_oracle_reads_white_and_grey_as_no_palette_colour():
    """White or grey is no colour of the world; the nearest hue would call it yellow, so a washed-out sample
    would pass for "a yellow square"."""
    square = render(parse("a yellow square on the left"))
    for grey in (1.0, 0.6):
        washed = square.max(dim=0, keepdim=True).values.expand(3, -1, -1) * grey
        assert read(washed)["left"] == read(square)["left"].__class__("grey", "square")
        assert score(washed, "a yellow square on the left").colours == 0.0
    pale = square * 0.7 + 0.25 * (square.max(dim=0).values > 0)  # a pale yellow is still yellow
    assert read(pale.clamp(0, 1))["left"].colour == "yellow"
    for bad in (torch.zeros(1, 3, 32, 32), torch.zeros(3, 64, 64), torch.zeros(3, 32, 32, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="the oracle reads one image of shape \\(3, 32, 32\\)"):
            read(bad)


def test_oracle_scores_each_aspect():
    image = render(parse("a red circle on the left and a blue square on the right"))
    assert score(image, "a red circle on the left and a blue triangle on the right").__dict__ == {
        "colours": 1.0, "positions": 1.0, "shapes": 0.0, "all_correct": 0.0}
    assert score(image, "a green circle on the left and a blue square on the right").colours == 0.0
    assert score(image, "a red circle on the left").positions == 0.0  # the right half is not empty
    assert read(torch.zeros(3, 32, 32))["left"].colour is None


def test_captions_and_split():
    scenes = all_scenes()
    assert len(scenes) == 168 and len({caption(s) for s in scenes}) == 168
    assert all(parse(caption(s)) == s for s in scenes)
    train, held_out = caption_split()
    assert len(train) + len(held_out) == 168 and not set(train) & set(held_out) and caption_split() == (train, held_out)
    # held out: exactly the two-shape captions with a red circle, a green square or a blue triangle, which
    # training shows only alone
    unpaired = {("red", "circle"), ("green", "square"), ("blue", "triangle")}
    assert held_out == sorted(c for c in map(caption, scenes)
                              if len(p := parse(c)) == 2 and {(i.colour, i.shape) for i in p} & unpaired)
    assert len(held_out) == 63 and "a red circle on the left and a red square on the right" in held_out
    assert "a red circle on the left" in train and "a blue triangle on the right" in train
    for bad, message in (("a purple circle on the left", "not a shapes-world caption"),
                         ("a red circle on the left and a red square on the left", "two shapes on one side"),
                         ("a cat", "not a shapes-world caption")):
        with pytest.raises(ValueError, match=message):
            parse(bad)


def test_hard_negatives_differ_in_one_aspect():
    import random

    from ipgo.shapes.clip import hard_negatives

    rng = random.Random(0)
    train, held_out = caption_split()
    for text in train:
        negatives = hard_negatives(text, rng, set(train))
        assert len(negatives) == 3 and text not in negatives and len(set(negatives)) == 3
        # one aspect changed: one side's colour or shape, or the two sides swapped
        differences = {sum(a != b for a, b in zip(parse(text), parse(n))) for n in negatives}
        assert differences <= {1, 2} and not set(negatives) & set(held_out)  # held-out captions never trained on
    assert hard_negatives("a red square on the left", rng, set(train))[0] == "a red square on the right"  # the swap
    # a change that would make a held-out caption is not offered
    text = "a red square on the left and a yellow square on the right"
    assert "a red circle on the left and a yellow square on the right" not in {
        n for _ in range(50) for n in hard_negatives(text, rng, set(train))}


def test_generated_samples_read_as_held_out_captions_stay_out_of_clip_training():
    from ipgo.shapes.clip import oracle_pairs

    train, held_out = caption_split()
    images = [render(parse(train[0])), render(parse(held_out[0])), torch.zeros(3, 32, 32)]
    assert [text for _, text in oracle_pairs(images, set(train))] == [train[0]]


@pytest.mark.slow
def test_training_smoke_run_gives_loadable_models(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    from ipgo.backbones import StableDiffusion
    from ipgo.rewards import ClipScore
    from ipgo.shapes.clip import oracle_caption, train_clip
    from ipgo.shapes.measure import auc
    from ipgo.shapes.train import to_latents, train

    path = train(str(tmp_path / "sd"), steps=2, decoder_steps=2, batch_size=4)
    # the split is recorded, so that build() keeps a finished model only for the same held-out captions
    assert json.loads((path / "training.json").read_text())["held_out"] == caption_split()[1]
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    images = pipe(["a red circle on the left"], num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    backbone = StableDiffusion(str(path))
    backbone.load()
    assert backbone.latent_shape(1, 32, 32) == (1, 12, 16, 16)
    image = render(parse("a blue square on the right"))
    assert torch.allclose(torch.nn.functional.pixel_shuffle(to_latents(image[None]), 2)[0], image * 2 - 1)
    assert oracle_caption(image) == "a blue square on the right" and oracle_caption(torch.zeros(3, 32, 32)) is None
    clip = train_clip(tmp_path / "clip", generated=[image], steps=2, batch_size=8)
    reward = ClipScore(str(clip))
    reward.load()
    assert reward(image[None], ["a blue square on the right"]).shape == (1,)
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0 and auc([0.1, 0.9], [True, False]) == 0.0
    assert auc([0.1, 0.9], [True, True]) is None  # no incorrect sample: no AUC (null in metrics.json, not NaN)


def test_the_training_command_refuses_a_folder_it_cannot_use(tmp_path, monkeypatch, capsys):
    from ipgo.shapes.train import main

    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    cases = [(["--out", str(tmp_path / "empty"), "--measure"], "holds no trained sd/ or clip/"),
             (["--out", str(afile)], f"--out {afile} is a file, not a folder"),
             (["--steps", "0"], "argument --steps: '0' is not a whole number >= 1"),
             (["--seed", str(2**64)], f"argument --seed: '{2**64}' is not a seed")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert afile.read_text() == "mine"
    assert not (tmp_path / "empty").exists()


def test_a_rebuild_trains_every_stage_unless_asked_to_keep_the_model(tmp_path, monkeypatch):
    """The recorded command retrains the text-to-image model even where a finished one with the same settings lies
    (code outside those settings may have changed); --keep-model keeps it."""
    import diffusers

    import ipgo.shapes.train as shapes_train

    class Reached(Exception):
        pass

    def stage(name):
        def reached(*args, **kwargs):
            raise Reached(name)
        return reached

    shipped = (Path(ipgo.shapes.__file__).parent / "weights/sd/training.json").read_text()
    monkeypatch.setattr(shapes_train, "model_settings", lambda *args: json.loads(shipped))  # what lies there
    monkeypatch.setattr("ipgo.shapes.clip.train_clip", lambda folder, **kwargs: folder)
    monkeypatch.setattr(shapes_train, "train", stage("model trained"))
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", stage("model kept"))
    for keep, reached in ((False, "model trained"), (True, "model kept")):
        out = tmp_path / f"keep_{keep}"
        (out / "sd").mkdir(parents=True)
        (out / "sd" / "training.json").write_text(shipped)
        with pytest.raises(Reached, match=reached):
            shapes_train.build(str(out), keep_model=keep)


def test_a_rebuild_keeps_only_a_model_trained_the_same_way(tmp_path):
    """build() keeps a finished text-to-image model only if every setting it records matches, the steps of the
    text tower it started from included."""
    from ipgo.shapes.train import finished_model, model_settings

    settings = {**model_settings(1200, 0, 300), "torch_threads": 2}  # the shipped build ran on 2 threads
    assert finished_model(tmp_path, settings) is None
    shipped = json.loads((Path(ipgo.shapes.__file__).parent / "weights/sd/training.json").read_text())
    (tmp_path / "training.json").write_text(json.dumps(shipped))
    assert finished_model(tmp_path, settings) == shipped  # the shipped model records the build's settings
    assert finished_model(tmp_path, {**settings, "text_steps": 100}) is None
    assert finished_model(tmp_path, {**settings, "seed": 1}) is None
    assert finished_model(tmp_path, {**settings, "decoder_steps": 600}) is None  # another recipe
    assert finished_model(tmp_path, {**settings, "torch_threads": 16}) is None  # other float sums, other weights


def test_oracle_judges_but_cannot_be_optimised():
    from ipgo.errors import UserError
    from ipgo.rewards import RewardSpec, ShapesOracle, build_reward

    image = render(parse("a red circle on the left and a blue square on the right"))
    oracle = ShapesOracle()
    oracle.load()
    texts = ["a red circle on the left and a blue square on the right", "a red square on the left",
             "a red circle on the left and a blue triangle on the right"]
    assert oracle(image.expand(3, -1, -1, -1), texts).tolist() == [1.0, 0.0, 0.0]
    positions = ShapesOracle("positions")
    positions.load()
    assert positions(image.expand(3, -1, -1, -1), texts).tolist() == [1.0, 0.0, 1.0]
    assert not build_reward([RewardSpec("shapes_oracle"), RewardSpec("clip_score", args={"model": "tiny:clip"})]
                            ).differentiable
    with pytest.raises(UserError, match="shapes-world captions only"):
        oracle(image[None], ["a cat"])
    with pytest.raises(UserError, match="32 x 32"):
        oracle(torch.zeros(1, 3, 64, 64), texts[:1])


def test_module_refuses_oracle_reward_and_reports_judges(tiny_sd_dir, tiny_clip_dir, tmp_path):
    import json

    import lightning as L

    from ipgo.backbones import StableDiffusion
    from ipgo.data import PromptDataModule
    from ipgo.module import IPGOModule, SeedConfig
    from ipgo.rewards import ClipScore, RewardSpec, ShapesOracle
    from ipgo.rewards.combine import RewardConfigError
    from ipgo.sampling import SamplerConfig

    with pytest.raises(RewardConfigError, match="not differentiable"):
        IPGOModule(StableDiffusion(str(tiny_sd_dir)), ShapesOracle())
    module = IPGOModule(
        StableDiffusion(str(tiny_sd_dir)), ClipScore(str(tiny_clip_dir)),
        sampler=SamplerConfig(scheduler="ddim", num_steps=2, grad_steps=1, height=32, width=32),
        seeds=SeedConfig(train=[0], eval=[100, 101]), judges=[RewardSpec("shapes_oracle")], report_prompts=2,
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square on the right\n")
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(module, PromptDataModule(str(prompts)))
    judge = json.loads((tmp_path / "summary.json").read_text())["judges"]["shapes_oracle"]
    # the oracle's all-correct rate over the raw renders and over the renders with the file's tokens
    from ipgo.export import load_tokens
    from ipgo.shapes.world import score

    names = prompts.read_text().split("\n")[:2]
    tokens = load_tokens(tmp_path / "tokens.safetensors")
    for when, extra in (("before", ()), ("after", tokens.tokens_for(names))):
        images = module.render(names, module.seeds.eval, *extra)
        captions = [n for n in names for _ in module.seeds.eval]
        correct = [score(image, name).all_correct for image, name in zip(images, captions)]
        assert judge[when] == pytest.approx(sum(correct) / 4), when
    assert judge["start"] == judge["after"]  # one step with select best exports the starting tokens
    assert judge["images"] == 4
    assert "Judge `shapes_oracle`" in (tmp_path / "summary.md").read_text()


def test_shipped_shapes_models_load_and_are_deterministic():
    from diffusers import StableDiffusionPipeline

    from ipgo.backbones import StableDiffusion
    from ipgo.rewards import ClipScore
    from ipgo.testing import resolve_source

    path = resolve_source("tiny:shapes-sd")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    text = "a red circle on the left and a blue square on the right"

    def sample() -> torch.Tensor:
        return pipe([text], generator=torch.Generator().manual_seed(0), height=32, width=32, num_inference_steps=20,
                    guidance_scale=3.0, output_type="pt").images

    first = sample()
    assert first.shape == (1, 3, 32, 32) and torch.equal(first, sample())
    backbone = StableDiffusion("tiny:shapes-sd")
    backbone.load()
    assert backbone.latent_shape(1, 32, 32) == (1, 12, 16, 16)
    reward = ClipScore("tiny:shapes-clip")
    reward.load()
    image = render(parse(text))
    scores = reward(image.expand(2, -1, -1, -1), [text, "a blue square on the left and a red circle on the right"])
    assert scores[0] > scores[1] and torch.equal(scores, reward(image.expand(2, -1, -1, -1),
                                                                [text, "a blue square on the left and a red "
                                                                 "circle on the right"]))


def _hand_label_agreement(name: str) -> dict[str, tuple[int, int]]:
    """(agreeing, called) per aspect between the oracle and the hand labels of fixtures/`name`.{json,png}."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    fixtures = Path(__file__).parent / "fixtures"
    labels = json.loads((fixtures / f"{name}.json").read_text())["samples"]
    strip = torch.from_numpy(np.array(Image.open(fixtures / f"{name}.png").convert("RGB")))
    images = strip.permute(2, 0, 1).float().div(255).split(32, dim=2)
    assert len(images) == len(labels) == 50
    counts = {"occupancy": [0, 0], "colour": [0, 0], "shape": [0, 0]}
    for image, label in zip(images, labels):
        seen = read(image)
        for side in ("left", "right"):
            truth = label[side]
            counts["occupancy"][0] += (truth is None) == (seen[side].colour is None)
            counts["occupancy"][1] += 1
            if truth is None or seen[side].colour is None:
                continue
            for aspect, called in (("colour", seen[side].colour), ("shape", seen[side].shape)):
                if truth[aspect] != "unclear":
                    counts[aspect][0] += truth[aspect] == called
                    counts[aspect][1] += 1
    return {aspect: (agree, total) for aspect, (agree, total) in counts.items()}


def test_oracle_agrees_with_hand_labels_on_generated_samples():
    """Four sets of 50 generated samples, each labelled by eye before the oracle was run on them: the
    first model's (shapes_hand_labels), two of a later model's, and the shipped model's held-out samples
    that the CLIP AUC is measured on (shapes_hand_labels_4). The shape rule was chosen on the first two;
    the third and fourth were labelled after it and are out of sample (docs/SHAPES.md)."""
    first = _hand_label_agreement("shapes_hand_labels")
    assert first["occupancy"] == (100, 100) and first["colour"][1] >= 80 and first["colour"][0] == first["colour"][1]
    agree, called = first["shape"]  # measured 89 / 91
    assert called >= 80 and agree / called >= 0.95, first
    second = _hand_label_agreement("shapes_hand_labels_2")
    assert second["occupancy"] == (100, 100) and second["colour"][0] == second["colour"][1] >= 80, second
    agree, called = second["shape"]  # measured 76 / 82
    assert called >= 70 and agree / called >= 0.9, second
    third = _hand_label_agreement("shapes_hand_labels_3")
    assert third["occupancy"] == (100, 100) and third["colour"][0] == third["colour"][1] >= 80, third
    agree, called = third["shape"]  # measured 67 / 82: 12 of the 15 misses are soft squares called circles
    assert called >= 70 and agree / called >= 0.8, third
    fourth = _hand_label_agreement("shapes_hand_labels_4")
    assert fourth["occupancy"] == (100, 100) and fourth["colour"] == (100, 100), fourth
    agree, called = fourth["shape"]  # measured 66 / 79; 21 of 100 shapes unclear (hybrids of two shapes)
    assert called >= 70 and agree / called >= 0.8, fourth


def test_prompt_wise_fit_on_the_shapes_world_raises_the_clip_reward(tmp_path):
    import lightning as L

    from ipgo.backbones import StableDiffusion
    from ipgo.data import PromptDataModule
    from ipgo.module import IPGOModule, SeedConfig
    from ipgo.rewards import ClipScore
    from ipgo.sampling import SamplerConfig
    from ipgo.tokens import TokenConfig

    module = IPGOModule(
        StableDiffusion("tiny:shapes-sd"), ClipScore("tiny:shapes-clip"),
        tokens=TokenConfig(n_prefix=4, n_suffix=4, rank=8),
        sampler=SamplerConfig(scheduler="ddim", num_steps=10, grad_steps=2, guidance_scale=3.0, height=32, width=32),
        seeds=SeedConfig(train=[0], eval=[1000]), optimizer=lambda params: torch.optim.Adam(params, lr=0.05),
        report_prompts=0,
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green square on the left and a yellow triangle on the right\n"
                       "a green square on the left and a yellow circle on the right\n")  # lowest rewards at seed 0
    L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(
        module, PromptDataModule(str(prompts), batch_size=2))
    # the last step's reward, not only the best one (which includes the first step, so is never below it)
    assert (module.best.last > module.best.first + 0.01).all(), (module.best.first, module.best.last)
