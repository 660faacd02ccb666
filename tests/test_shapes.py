import pytest
import torch

from ipgo.shapes import all_scenes, caption, caption_split, parse, read, render, score


def test_oracle_is_exact_on_rendered_scenes():
    generator = torch.Generator().manual_seed(3)
    for scene in all_scenes():
        for _ in range(3):  # different jitter each time
            result = score(render(scene, generator), caption(scene))
            assert result.all_correct == 1.0, caption(scene)


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
    assert len(held_out) == 34 and not set(train) & set(held_out) and caption_split() == (train, held_out)
    for bad in ("a purple circle on the left", "a red circle on the left and a red square on the left", "a cat"):
        with pytest.raises(ValueError):
            parse(bad)
