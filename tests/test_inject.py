import pytest
import torch

from ipgo.inject import conditioning, conformity, inject, sequence_length


def hand_built(hidden, length, prefix, suffix, total):
    n_p, n_s = prefix.shape[0], suffix.shape[0]
    pad = hidden[length : length + total - n_p - length - n_s]
    return torch.cat([prefix, hidden[:length], suffix, pad])


def test_inject_places_tokens_around_real_tokens():
    hidden = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    lengths = torch.tensor([3, 5])
    prefix, suffix = -torch.rand(2, 2, 3) - 100, -torch.rand(2, 1, 3) - 200
    padded = inject(hidden, lengths, prefix, suffix, total=10)
    for b in range(2):
        assert torch.equal(padded[b], hand_built(hidden[b], int(lengths[b]), prefix[b], suffix[b], 10))
    total = sequence_length(lengths, 2, 1, 10, "unpadded")
    assert total == 2 + 5 + 1
    unpadded = inject(hidden, lengths, prefix, suffix, total)
    assert torch.equal(unpadded[1], torch.cat([prefix[1], hidden[1, :5], suffix[1]]))  # the notebook's [P; S; Q]
    assert torch.equal(unpadded[0], hand_built(hidden[0], 3, prefix[0], suffix[0], total))
    assert sequence_length(lengths, 2, 1, 10, "padded") == 10
    with pytest.raises(ValueError, match="layout"):
        sequence_length(lengths, 2, 1, 10, "diagonal")


def test_inject_without_tokens_is_identity_and_gradients_flow():
    hidden = torch.randn(2, 7, 4)
    lengths = torch.tensor([2, 7])
    empty = torch.zeros(2, 0, 4)
    assert torch.equal(inject(hidden, lengths, empty, empty, 7), hidden)
    prefix = torch.randn(2, 1, 4, requires_grad=True)
    with pytest.raises(ValueError, match="do not fit"):
        inject(hidden, lengths, prefix, empty, 7)
    inject(hidden, torch.tensor([2, 3]), prefix, empty, 7).sum().backward()
    assert torch.equal(prefix.grad, torch.ones_like(prefix))


def test_conformity_matches_formula_on_hand_example():
    # one prompt of 2 real tokens (D = 2) plus one padding state that must be ignored
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    prefix = torch.tensor([[[5.0, 0.0]]])
    suffix = torch.tensor([[[0.0, -6.0]]])
    # mean of [P; S; Q] = ((5+1+3+0)/4, (0+2+4-6)/4) = (2.25, 0); mean of S = (2, 3)
    # mean_d |(0.25, -3)| = 1.625
    value = conformity(hidden, torch.tensor([2]), prefix, suffix)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(1.625)


def test_states_after_the_clip_part_keep_their_place():
    """SD 3's sequence is [77 CLIP states ; T5 states]: the tokens take CLIP padding positions, every T5 state stays."""
    from types import SimpleNamespace

    from ipgo.backbones.base import Conditioning, PromptEmbeds

    clip, t5 = 6, 4
    hidden = torch.arange(clip + t5, dtype=torch.float32).view(1, -1, 1).expand(1, -1, 2)  # state k holds k
    backbone = SimpleNamespace(
        max_length=clip, sequence_length=clip + t5,
        encode=lambda prompts, reserved, too_long: PromptEmbeds(hidden, torch.tensor([3])),
        negative=lambda batch, total, prompts: Conditioning(torch.zeros(batch, total, 2)))
    prefix, suffix = torch.full((1, 1, 2), -1.0), torch.full((1, 2, 2), -2.0)
    cond, *_ = conditioning(backbone, ["a cat"], prefix, suffix)
    assert cond.hidden[0, :, 0].tolist() == [-1, 0, 1, 2, -2, -2, 6, 7, 8, 9]
