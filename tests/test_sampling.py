import pytest
import torch

from ipgo.backbones import Conditioning
from ipgo.sampling import SCHEDULERS, SamplerConfig, TruncatedSampler, initial_noise, make_scheduler


def embeddings(backbone, batch=1):
    cond = Conditioning(backbone.encode(["a red circle"] * batch).hidden.clone().requires_grad_())
    return cond, backbone.negative(batch, backbone.sequence_length)


def count_saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, len(saved)


def test_no_graph_for_the_first_steps(tiny_backbone):
    cond, uncond = embeddings(tiny_backbone)

    def run(num_steps, grad_steps):
        config = SamplerConfig(scheduler="ddim", num_steps=num_steps, grad_steps=grad_steps, height=32, width=32)
        noise = initial_noise(tiny_backbone, config, [0], "cpu")
        return count_saved_tensors(lambda: TruncatedSampler(config)(tiny_backbone, cond, uncond, noise))

    (_, short), (_, long), (image, two) = run(3, 1), run(9, 1), run(9, 2)
    assert short == long  # six more steps without autograd save nothing
    assert two > long  # one more gradient step saves one more denoiser call
    image.mean().backward()
    assert cond.hidden.grad is not None and cond.hidden.grad.abs().sum() > 0


def test_gradient_comes_only_from_last_steps(tiny_backbone):
    """Changing the conditioning used in the first T-K steps leaves the gradient graph empty there."""
    cond, uncond = embeddings(tiny_backbone)
    config = SamplerConfig(scheduler="ddim", num_steps=4, grad_steps=1, height=32, width=32)
    noise = initial_noise(tiny_backbone, config, [0], "cpu")
    calls = []
    original = tiny_backbone.denoise

    def spy(latents, t, cond):
        calls.append(torch.is_grad_enabled() and cond.hidden.requires_grad)
        return original(latents, t, cond)

    tiny_backbone.denoise = spy
    try:
        TruncatedSampler(config)(tiny_backbone, cond, uncond, noise)
    finally:
        del tiny_backbone.denoise
    assert calls == [False] * 3 + [False, True]  # the last: its unconditional half apart, without a graph


def saved_elements(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, sum(saved)


def test_the_first_gradient_step_keeps_no_graph_of_the_unconditional_half(tiny_backbone):
    """Its latents carry no gradient yet, so the unconditional half cannot reach the tokens: it runs apart, without a
    graph, and gives the image and gradient of one batched call."""
    config = SamplerConfig(scheduler="ddim", num_steps=4, grad_steps=2, guidance_scale=4.0, height=32, width=32)
    noise = initial_noise(tiny_backbone, config, [0], "cpu")
    results = []
    for batched in (False, True):
        cond, uncond = embeddings(tiny_backbone)
        if batched:  # a differentiable unconditional branch stays in the batched call
            uncond = Conditioning(uncond.hidden.clone().requires_grad_())
        image, saved = saved_elements(lambda: TruncatedSampler(config)(tiny_backbone, cond, uncond, noise))
        image.mean().backward()
        results.append((image.detach(), cond.hidden.grad, saved))
    (split, split_grad, split_saved), (batched, batched_grad, batched_saved) = results
    torch.testing.assert_close(split, batched, atol=1e-5, rtol=0)
    torch.testing.assert_close(split_grad, batched_grad, atol=1e-7, rtol=1e-4)
    assert split_saved < 0.9 * batched_saved, (split_saved, batched_saved)


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"flow_euler"}))
def test_every_scheduler_samples_with_gradients(tiny_backbone, name):
    cond, uncond = embeddings(tiny_backbone, batch=2)
    config = SamplerConfig(scheduler=name, num_steps=4, grad_steps=2, guidance_scale=3.0, height=32, width=32)
    noise = initial_noise(tiny_backbone, config, [0, 1], "cpu")
    images = TruncatedSampler(config)(tiny_backbone, cond, uncond, noise)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert torch.isfinite(cond.hidden.grad).all() and cond.hidden.grad.abs().sum() > 0


def test_noise_is_per_seed(tiny_backbone):
    config = SamplerConfig(height=32, width=32)
    both = initial_noise(tiny_backbone, config, [3, 4], "cpu")
    assert torch.equal(both[1:], initial_noise(tiny_backbone, config, [4], "cpu"))
    assert not torch.equal(both[0], both[1])


def test_config_errors():
    with pytest.raises(ValueError, match="unknown scheduler 'heunn'.*ddim"):
        SamplerConfig(scheduler="heunn")
    with pytest.raises(ValueError, match="grad_steps"):
        SamplerConfig(num_steps=3, grad_steps=4)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("nope", {})
    with pytest.raises(ValueError, match="flow-matching model .SD 3.: use scheduler flow_euler"):
        make_scheduler("lms", {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="flow_euler is for flow-matching models"):
        make_scheduler("flow_euler", {"_class_name": "PNDMScheduler"})
    with pytest.raises(ValueError, match="zero-terminal-SNR.*ddim"):
        make_scheduler("lms", {"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True})
    zero_snr = make_scheduler("ddim", {"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True})
    assert zero_snr.alphas_cumprod[-1] < 1e-6


def test_gradient_checkpointing_gives_the_same_gradient(tiny_sd_dir, tiny_backbone):
    from ipgo.backbones import StableDiffusion

    checkpointed = StableDiffusion(str(tiny_sd_dir), gradient_checkpointing=True)
    checkpointed.load()
    config = SamplerConfig(scheduler="euler", num_steps=3, grad_steps=2, height=32, width=32)
    grads = []
    for backbone in (tiny_backbone, checkpointed):
        cond, uncond = embeddings(backbone)
        noise = initial_noise(backbone, config, [0], "cpu")
        TruncatedSampler(config)(backbone, cond, uncond, noise).mean().backward()
        grads.append(cond.hidden.grad)
    assert checkpointed.unet.is_gradient_checkpointing
    assert grads[0].abs().max() > 1e-6  # a gradient to compare (its entries are ~1e-5 here)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-9)  # recomputation: the same up to rounding
