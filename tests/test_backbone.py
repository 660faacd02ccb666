import pytest
import torch

from ipgo.backbones import ModelNotFoundError, PromptTooLongError, StableDiffusion

LONG = "a cat " + "very " * 70  # 74 tokens with BOS and EOS


def test_model_source_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StableDiffusion(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="model_index.json is missing"):
        StableDiffusion(str(tmp_path))
    offline = StableDiffusion("nobody/no-such-model")  # a hub id passes the cheap check ...
    with pytest.raises(ModelNotFoundError, match="not found in the Hugging Face cache"):
        offline.load_tokenizer()  # ... and fails clearly at the first (cheap) load, offline


def test_encode_caches_and_applies_the_too_long_policy(tiny_backbone):
    calls = []
    handle = tiny_backbone.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = tiny_backbone.encode(["a cat", "a dog"], reserved=4)
        again = tiny_backbone.encode(["a dog", "a cat"], reserved=4)
    finally:
        handle.remove()
    assert len(calls) == 1  # each prompt encoded once
    assert torch.equal(first.hidden[0], again.hidden[1]) and first.lengths.tolist() == [4, 4]
    assert first.hidden.shape == (2, 77, 32)

    assert tiny_backbone.token_lengths([LONG]) == [74]
    with pytest.raises(PromptTooLongError, match="has 74 tokens but only 57 fit beside the 20 learned tokens"):
        tiny_backbone.encode([LONG], reserved=20)
    with pytest.warns(UserWarning, match="truncating to 57 tokens"):
        cut = tiny_backbone.encode([LONG], reserved=20, too_long="truncate")
    assert cut.lengths.tolist() == [57]
    # truncation keeps the end-of-text token, as the tokenizer does for a plain pipeline
    assert torch.equal(cut.hidden[0, 56], tiny_backbone.encode(["a cat " + "very " * 53]).hidden[0, 56])
