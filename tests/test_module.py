import json

import lightning as L
import pytest
import torch

from ipgo.backbones import StableDiffusion
from ipgo.data import PromptDataModule
from ipgo.errors import ConfigError, NonFiniteGradientError, UserError
from ipgo.export import load_tokens
from ipgo.module import IPGOModule, NonFiniteRewardError, SeedConfig
from ipgo.rewards import ClipScore, CombinedReward, RewardTerm
from ipgo.rewards.combine import RewardSpec, RunningStats, build_reward
from ipgo.sampling import SamplerConfig
from ipgo.tokens import TokenConfig

PROMPTS = ["a red circle on the left", "a blue square", "a green triangle on the right"]


def prompt_file(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-wise", grad_clip=1.0, lr=0.05, seeds=None,
                optimizer=torch.optim.Adam, layout="padded"):
    return IPGOModule(
        StableDiffusion(str(tiny_sd_dir)),
        ClipScore(str(tiny_clip_dir)),
        mode=mode,
        tokens=TokenConfig(n_prefix=2, n_suffix=2, rank=4),
        sampler=SamplerConfig(scheduler="ddim", num_steps=4, grad_steps=2, guidance_scale=4.0, height=32, width=32),
        seeds=seeds or SeedConfig(train=[0], eval=[100]),
        grad_clip=grad_clip,
        optimizer=lambda params: optimizer(params, lr=lr),
        report_prompts=2,
        layout=layout,
    )


def fit(module, datamodule, tmp_path, epochs, **trainer_kwargs):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_prompt_wise_raises_each_prompts_reward(tiny_sd_dir, tiny_clip_dir, tmp_path):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.conformity_weight = 0.0  # the reward's gradient alone (the penalty's is larger on these tiny models)
    fit(module, PromptDataModule(prompt_file(tmp_path), batch_size=3), tmp_path, epochs=6)
    assert len(module.tokens) == 3  # one token set per prompt
    assert (module.best.last > module.best.first).all(), (module.best.first, module.best.last)
    # the file holds each prompt's best tokens, and they give the best reward again on the training seeds
    exported = load_tokens(tmp_path / "tokens.safetensors")
    assert exported.prompts == PROMPTS and torch.equal(exported.prefix, module.best.prefix.cpu())
    assert not torch.equal(exported.prefix, module.tokens(range(3))[0].detach())  # not simply the last tokens
    again = module.score(PROMPTS, module.seeds.train, exported.prefix, exported.suffix)[:, 0]
    torch.testing.assert_close(again, module.best.reward.cpu(), atol=1e-5, rtol=0)
    # the summary's before and after are the rewards of the raw prompts and of the file's tokens, on held-out seeds
    summary = json.loads((tmp_path / "summary.json").read_text())
    shown = PROMPTS[: module.report_prompts]
    before = module.score(shown, module.seeds.eval).mean(1)
    after = module.score(shown, module.seeds.eval, exported.prefix[:2], exported.suffix[:2]).mean(1)
    assert [row["prompt"] for row in summary["per_prompt"]] == shown
    torch.testing.assert_close(torch.tensor([row["before"] for row in summary["per_prompt"]]), before, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(torch.tensor([row["after"] for row in summary["per_prompt"]]), after, atol=1e-5,
                               rtol=0)
    # "start": the tokens as a fresh run initialises them, before its first step
    from ipgo.tokens import TokenSets

    with torch.no_grad():
        initial = TokenSets(module.token_config, exported.hidden_size, len(PROMPTS))(range(2))
    start = module.score(shown, module.seeds.eval, *initial).mean(1)
    torch.testing.assert_close(torch.tensor([row["start"] for row in summary["per_prompt"]]), start, atol=1e-5,
                               rtol=0)
    assert not torch.allclose(start, after, atol=1e-6)  # six steps moved the tokens
    assert (tmp_path / "before_after.png").is_file()


def test_the_conformity_penalty_is_in_the_loss_and_its_gradient(tiny_sd_dir, tiny_clip_dir):
    """loss_i = -reward_i + lambda * conformity_i: the difference of two weights is the penalty, in value and in
    the gradient that reaches the tokens."""
    from ipgo.inject import conditioning, conformity

    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.prepare(PROMPTS)
    index = torch.arange(len(PROMPTS))
    losses, grads = {}, {}
    for weight in (0.0, 3.0):
        module.conformity_weight = weight
        module.tokens.zero_grad()
        loss, _ = module._step_loss(PROMPTS, index, step=0)
        loss.backward()
        losses[weight], grads[weight] = loss.detach(), [q.grad.clone() for q in module.tokens.parameters()]
    module.tokens.zero_grad()
    _, _, embeds, prefix, suffix = conditioning(module.backbone, PROMPTS, *module.token_vectors(index), module.layout,
                                                module.too_long, masked=True)
    penalty = conformity(embeds.hidden, embeds.lengths, prefix, suffix)  # (prompts,), summed: prompt-wise
    assert (penalty > 0).all()
    torch.testing.assert_close(losses[3.0] - losses[0.0], 3.0 * penalty.sum().detach(), atol=1e-5, rtol=1e-4)
    (3.0 * penalty.sum()).backward()
    for with_penalty, without, q in zip(grads[3.0], grads[0.0], module.tokens.parameters()):
        torch.testing.assert_close(with_penalty - without, q.grad, atol=1e-5, rtol=1e-4)
    assert any(q.grad.abs().max() > 1e-4 for q in module.tokens.parameters())


@pytest.mark.parametrize("layout", ["padded", "unpadded"])
def test_batched_prompt_wise_equals_one_prompt_at_a_time(tiny_sd_dir, tiny_clip_dir, tmp_path, layout):
    """Independent token sets: batch composition changes nothing, gradient clipping included.

    SGD, unlike Adam, is not invariant to gradient scale, so a shared clip or a mean over the
    batch would show here. The prompts differ in length, so with the unpadded layout a batch
    stretched to its longest prompt would change the shorter ones' images.
    """
    results = []
    for batch_size in (3, 1):
        # reward gradients here are 6.5e-6 to 8.5e-6 per set (measured), so this clip is active, and a mean over
        # the batch (a third of that) would fall under it; steps are ~0.1
        module = make_module(tiny_sd_dir, tiny_clip_dir, grad_clip=5e-6, lr=2e4, optimizer=torch.optim.SGD,
                             layout=layout)
        module.report_prompts, module.conformity_weight = 0, 0.0
        fit(module, PromptDataModule(prompt_file(tmp_path), batch_size=batch_size), tmp_path / str(batch_size),
            epochs=3)
        results.append((*module.tokens(range(3)), module.best.first))
        assert (module.best.last != module.best.first).all()  # the tokens moved
    for batched, alone in zip(*results):
        assert torch.allclose(batched, alone, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unpadded_prompts_of_different_lengths_share_one_denoiser_batch(family, tiny_sd_dir, tiny_clip_dir,
                                                                         ipgo_cache):
    """Each row is masked to its own n_p + L + n_s states: one batch, the images of one prompt at a time."""
    from ipgo.backbones import StableDiffusionXL
    from ipgo.testing import tiny_sdxl_path

    module = make_module(tiny_sd_dir, tiny_clip_dir, layout="unpadded")
    if family == "sdxl":
        module.backbone = StableDiffusionXL(str(tiny_sdxl_path(ipgo_cache)))
    module.prepare(PROMPTS)
    assert len(set(module.backbone.encode(PROMPTS, 4).lengths.tolist())) > 1
    prefix, suffix = (t.detach() * 5 for t in module.tokens(range(3)))  # tokens that change the images
    batches = []
    hook = module.backbone.unet.register_forward_hook(lambda unet, args, out: batches.append(len(args[0])))
    try:
        together = module.render(PROMPTS, [7, 8], prefix, suffix)
        assert batches == [12] * 4  # 3 prompts x 2 seeds, with the unconditional half, at each of the 4 steps
        alone = torch.cat([module.render([p], [7, 8], prefix[i : i + 1], suffix[i : i + 1])
                           for i, p in enumerate(PROMPTS)])
    finally:
        hook.remove()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    padded = make_module(tiny_sd_dir, tiny_clip_dir)
    padded.backbone = module.backbone
    padded.prepare(PROMPTS)
    assert (padded.render(PROMPTS, [7, 8], prefix, suffix) - together).abs().max() > 1e-3  # the layouts differ


def test_prompt_batch_shares_tokens_and_validates(tiny_sd_dir, tiny_clip_dir, tmp_path):
    prompts = PROMPTS + ["a yellow circle", "a blue triangle on the left"]
    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    datamodule = PromptDataModule(prompt_file(tmp_path, prompts), batch_size=2, val_fraction=0.4, shuffle=True)
    trainer = fit(module, datamodule, tmp_path, epochs=2, accumulate_grad_batches=2)
    assert len(module.tokens) == 1 and module.best is None
    # the 3 training prompts in batches of 2 and 1 make one update: its reward is the mean over all 3 (the epoch's),
    # not the last batch's
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/reward_per_update"], metrics["train/reward"])
    assert len(datamodule.val_prompts) == 2 and not set(datamodule.val_prompts) & set(datamodule.train_prompts)
    # the validation reward: the held-out prompts with the shared tokens, on the eval seeds (the last validation
    # ran after the last step)
    val = datamodule.val_prompts
    with torch.no_grad():
        tuned = module.score(val, module.seeds.eval, *module.token_vectors([0] * len(val))).mean()
        raw = module.score(val, module.seeds.eval).mean()
    torch.testing.assert_close(trainer.callback_metrics["val/reward"], tuned, atol=1e-5, rtol=0)
    assert (tuned - raw).abs() > 1e-4
    summary = (tmp_path / "summary.json").read_text()
    assert "held-out prompts (validation split)" in summary and datamodule.val_prompts[0] in summary
    summary = json.loads(summary)
    assert summary["epochs"] == 2 and summary["fit_seconds"] > 0 and summary["model"] == str(tiny_sd_dir)
    row = summary["per_prompt"][0]
    assert row["change_from_start"] == pytest.approx(row["after"] - row["start"])
    assert f"`{tiny_sd_dir}`, 2 epochs in " in (tmp_path / "summary.md").read_text()


def test_an_epochs_last_update_is_the_mean_of_the_batches_it_gathers(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """An epoch's last accumulation group of fewer batches updates the tokens with their mean (plain SGD: the step is
    the gradient), not a fraction of it, as Lightning's division by accumulate_grad_batches alone would: three
    one-prompt batches in groups of 2 take the steps that batches of 2 and 1 prompts take, and two in a group of 4
    the step of one batch of both."""
    def module():
        return make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch", optimizer=torch.optim.SGD, lr=300,
                           grad_clip=None)

    def tokens_after(prompts, batch_size, accumulate):
        trained = module()
        fit(trained, PromptDataModule(prompt_file(tmp_path, prompts), batch_size=batch_size), tmp_path / "run",
            epochs=1, accumulate_grad_batches=accumulate)
        return trained.token_vectors([0])[0].detach()

    start = module()
    start.prepare(PROMPTS[:2])
    together = tokens_after(PROMPTS[:2], batch_size=2, accumulate=1)
    assert (together - start.token_vectors([0])[0].detach()).abs().max() > 1e-3  # a step that shows
    torch.testing.assert_close(tokens_after(PROMPTS[:2], batch_size=1, accumulate=4), together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens_after(PROMPTS, batch_size=1, accumulate=2),
                               tokens_after(PROMPTS, batch_size=2, accumulate=1), atol=1e-5, rtol=1e-4)


def test_prompt_wise_refuses_validation_split_and_accumulation(tiny_sd_dir, tiny_clip_dir, tmp_path):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    with pytest.raises(ValueError, match="val_fraction=0"):
        fit(module, PromptDataModule(prompt_file(tmp_path), val_fraction=0.34), tmp_path, epochs=1)
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        fit(module, PromptDataModule(prompt_file(tmp_path)), tmp_path, epochs=1, accumulate_grad_batches=2)
    assert module.backbone.unet is None  # refused before the weights load


def test_refuses_half_precision_tokens_and_a_shared_loss_scaler(tiny_sd_dir, tiny_clip_dir):
    from lightning.pytorch.plugins.precision import MixedPrecision

    def trainer(**kwargs):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kwargs)

    module = make_module(tiny_sd_dir, tiny_clip_dir)
    for precision in ("bf16-true", "16-true"):  # would make the tokens half precision too (QR fails in bf16)
        with pytest.raises(ConfigError, match=f"trainer.precision {precision} would make the learned tokens half"):
            module.check_trainer(trainer(precision=precision))
    # a GPU's 16-mixed: one scaler skips every prompt's step when one prompt's gradient overflows
    scaled = trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    with pytest.raises(ConfigError, match="one loss scaler for all prompts in a batch"):
        module.check_trainer(scaled)
    make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch").check_trainer(scaled)  # one token set: fine
    module.check_trainer(trainer(precision="bf16-mixed"))
    # a time limit checked after every batch would end an epoch part-way; checked after every epoch, it does not
    from lightning.pytorch.callbacks import Timer

    with pytest.raises(ConfigError, match="trainer.max_time"):
        module.check_trainer(trainer(max_time={"hours": 1}))
    module.check_trainer(trainer(callbacks=[Timer({"hours": 1}, interval="epoch")]))


def test_prompt_wise_refuses_repeated_prompts_before_loading(tiny_sd_dir, tiny_clip_dir):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    with pytest.raises(UserError, match="'a blue square' is in the prompt file 2 times.*remove the repeated lines"):
        module.prepare([*PROMPTS, "a blue square"])
    assert module.tokens is None and module.backbone.unet is None
    batch = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    batch.prepare([*PROMPTS, "a blue square"])  # a shared token set: a repeat only weighs a prompt more
    assert len(batch.tokens) == 1


def test_tokens_that_leave_no_room_for_a_prompt_are_refused_before_loading(tiny_sd_dir, tiny_clip_dir):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.token_config = TokenConfig(n_prefix=37, n_suffix=38, rank=4)
    with pytest.raises(ConfigError, match="75 learned tokens .* leave 2 of the text encoder's 77 positions"):
        module.prepare(["a cat"])
    assert module.backbone.unet is None
    module.token_config = TokenConfig(n_prefix=2, n_suffix=2, rank=33)  # the tiny model's states are 32 wide
    with pytest.raises(ConfigError, match="rank 33 exceeds the width 32 .* give a rank of at most 32"):
        module.prepare(["a cat"])
    assert module.backbone.unet is None and not module.reward.loaded


def test_a_judge_that_cannot_score_the_prompts_is_refused_before_loading(tiny_sd_dir, tiny_clip_dir):
    """The judges score the run summary at the very end: their input is checked before anything is optimised."""
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.judges = build_reward([RewardSpec("shapes_oracle")])
    with pytest.raises(UserError, match="shapes_oracle judges shapes-world captions only: not a shapes-world"):
        module.prepare(["a cat on a mat"])
    assert module.tokens is None and module.backbone.unet is None and not module.reward.loaded


def test_running_normalisation_statistics_survive_a_resume(tiny_sd_dir, tiny_clip_dir):
    def running(module):
        module.reward = CombinedReward([RewardTerm(ClipScore(str(tiny_clip_dir)), normalize="running")])
        return module

    module = running(make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch"))
    module.reward.stats["clip_score"].update(torch.tensor([1.0, 3.0]))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = running(make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch"))
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.reward.stats["clip_score"] == RunningStats(count=2, mean=2.0, m2=2.0)


def test_a_checkpoint_of_other_prompts_is_refused(tiny_sd_dir, tiny_clip_dir):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.prepare(PROMPTS)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    same = make_module(tiny_sd_dir, tiny_clip_dir)
    same.prepare(PROMPTS)
    same.on_load_checkpoint(checkpoint)
    other = make_module(tiny_sd_dir, tiny_clip_dir)
    other.prepare(["a yellow circle", *PROMPTS[1:]])  # as many prompts, one changed
    message = "3 prompts there, 3 here, the first difference at prompt 1: 'a red circle on the left' there, 'a yellow"
    with pytest.raises(UserError, match=f"{message}.*start a new run folder"):
        other.on_load_checkpoint(checkpoint)
    ranks = make_module(tiny_sd_dir, tiny_clip_dir)
    ranks.token_config = TokenConfig(n_prefix=2, n_suffix=2, rank=3)
    ranks.prepare(PROMPTS)
    with pytest.raises(UserError, match="tokens .*'rank': 4.* there, .*'rank': 3.* here"):
        ranks.on_load_checkpoint(checkpoint)


def test_best_tokens_survive_a_checkpoint_without_components(tiny_sd_dir, tiny_clip_dir):
    """Checkpoints of earlier versions keep the best reward but not its components: the next step is compared
    with that reward, not with zeros."""
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.prepare(PROMPTS)
    state = {"best.reward": torch.tensor([0.9, 0.9, 0.9]), "best.prefix": torch.full((3, 2, 32), 7.0)}
    module.on_load_checkpoint({"state_dict": state})
    module.load_state_dict(state, strict=False)
    token = torch.zeros(3, 2, 32)
    module.best.update(torch.arange(3), torch.tensor([0.5, 0.95, 0.5]), torch.tensor([[0.5], [0.95], [0.5]]), token,
                       token, module._combine)
    assert module.best.prefix[:, 0, 0].tolist() == [7.0, 0.0, 7.0]  # only the better step replaced its best


def test_nan_reward_is_a_clear_error(tiny_sd_dir, tiny_clip_dir, tmp_path):
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.prepare(PROMPTS)
    module.reward._score = lambda images, prompts: torch.full((images.shape[0],), float("nan"))
    module.log = lambda *args, **kwargs: None
    with pytest.raises(NonFiniteRewardError,
                       match="NaN or infinite for prompt 'a red circle on the left' in epoch 0. .* diverged"):
        module.training_step({"prompt": PROMPTS, "index": torch.arange(3)}, 0)


def test_a_non_finite_gradient_stops_the_run_before_the_step(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """A finite reward with an infinite gradient (sqrt at 0) would make Adam write NaN into the tokens."""
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.prepare(PROMPTS)
    score = module.reward._score
    module.reward._score = lambda images, prompts: score(images, prompts) + (images - images.detach()).sqrt().sum(
        dim=(1, 2, 3))
    before = [p.detach().clone() for p in module.tokens.parameters()]
    with pytest.raises(NonFiniteGradientError, match="the gradient of the tokens of prompt 'a red circle on the "
                                                     "left' is NaN or infinite in epoch 0 .* step was not taken"):
        fit(module, PromptDataModule(prompt_file(tmp_path)), tmp_path, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, module.tokens.parameters()))


def test_with_a_loss_scaler_a_non_finite_gradient_is_left_to_it(tiny_sd_dir, tiny_clip_dir):
    """16-mixed precision: the scaler skips a step whose gradients overflowed and lowers its scale (routine early in
    training); without one the step is refused."""
    from types import SimpleNamespace

    module = make_module(tiny_sd_dir, tiny_clip_dir, grad_clip=None)
    module.prepare(PROMPTS)
    for parameter in module.tokens.parameters():
        parameter.grad = torch.full_like(parameter, torch.inf)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), current_epoch=0)
    module.on_before_optimizer_step(None)
    module._trainer.precision_plugin.scaler = None
    with pytest.raises(NonFiniteGradientError):
        module.on_before_optimizer_step(None)


def test_fresh_seeds_change_per_epoch_and_stay_reproducible():
    seeds = SeedConfig(train=[0, 1], policy="fresh", eval=[5])
    first, again, later = seeds.for_items([0, 1], 0), seeds.for_items([0, 1], 0), seeds.for_items([0, 1], 1)
    assert first == again and first != later and len(set(first)) == 4
    assert SeedConfig(train=[3]).for_items([0, 1], 7) == [3, 3]
    with pytest.raises(ValueError, match="held-out seeds must differ"):
        SeedConfig(train=[0, 1], eval=[1])
    with pytest.raises(ValueError, match="seeds.eval is empty"):
        SeedConfig(train=[0], eval=[])


def test_summary_says_what_the_training_figures_are():
    from ipgo.report import summary_markdown

    summary = {"mode": "prompt-wise", "reward": "clip_score", "prompts_are": "training prompts", "seeds": [5],
               "seeds_are": "held out", "per_prompt": [], "tokens": "tokens.safetensors", "grid": None,
               "train": {"seeds": [0], "first_step_mean": 0.1, "last_step_mean": 0.3, "best_step_mean": 0.4,
                         "exported": "best", "noise": "fixed"}}
    text = summary_markdown(summary)
    assert "at the last step (scored before its update) 0.3000" in text and "luck" not in text
    summary["train"]["noise"] = "fresh"
    assert "partly the luck of its noise" in summary_markdown(summary)
    summary["grid"] = "before_after.png"
    assert "the left image is the raw prompt, the right one the prompt with the tokens, on the same seed." in \
        summary_markdown(summary)
    summary["seeds"] = [5, 6]
    assert "the left 2 images are the raw prompt, the right 2 the prompt with the tokens, on the same seeds." in \
        summary_markdown(summary)
    # prompts as long as the shapes demo's captions are shown whole; a "|" does not split the table's row
    caption = "a blue circle on the left and a red circle on the right | sharp"
    summary["per_prompt"] = [{"prompt": caption, "before": 0.1, "start": 0.1, "after": 0.2}]
    assert "| a blue circle on the left and a red circle on the right \\| sharp | 0.1000 |" in summary_markdown(summary)


def test_a_summary_with_non_finite_scores_is_written_as_strict_json_with_a_warning(tiny_sd_dir, tiny_clip_dir,
                                                                                   tmp_path):
    """The tokens are saved before the before/after renders are scored: a reward that fails on those (a float16
    overflow) leaves a finished run whose gaps are null in summary.json, n/a in summary.md, and said."""
    from ipgo.report import write_run_outputs

    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    module.prepare(PROMPTS)
    score = module.reward._score
    module.reward._score = lambda images, prompts: score(images, prompts).masked_fill(torch.tensor(True), torch.inf)
    with pytest.warns(UserWarning, match="figures of the run summary are NaN or infinite"):
        write_run_outputs(module, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert summary["per_prompt"][0]["after"] is None and summary["mean_before"] is None
    assert "| n/a | n/a | n/a |" in (tmp_path / "summary.md").read_text()
    assert load_tokens(tmp_path).prefix.isfinite().all()


def test_token_files_name_only_the_optimised_rewards(tiny_sd_dir, tiny_clip_dir):
    """A weight-0 term is only logged: evaluate's best-of-N selects with the one optimised reward, not asking which."""
    module = make_module(tiny_sd_dir, tiny_clip_dir, mode="prompt-batch")
    module.reward = build_reward([RewardSpec("clip_score", args={"model": str(tiny_clip_dir)}),
                                  RewardSpec("shapes_oracle", weight=0.0)])
    module.prepare(PROMPTS[:1])
    assert json.loads(module.token_file().extra["rewards"]) == ["clip_score"]
    assert json.loads(module.token_file().extra["reward_weights"]) == {"clip_score": str(tiny_clip_dir.resolve())}


def test_input_checked_before_the_trainer_is_not_checked_again(tiny_sd_dir, tiny_clip_dir, monkeypatch):
    """ipgo.fit checks the prompts before the trainer starts; prepare does not tokenise them all a second time."""
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    module.check_input(PROMPTS)
    monkeypatch.setattr("ipgo.module.check_prompt_lengths", lambda *args: pytest.fail("checked again"))
    module.prepare(PROMPTS)
    assert module.tokens is not None


def test_the_multi_process_path_steps_each_batch_alone(tiny_sd_dir, tiny_clip_dir, tmp_path, monkeypatch):
    """`trainer.predict` (the multi-process prompt-wise path, here on one process) optimises a batch of prompts from
    its first step to its last; gradients of earlier batches are gone, not clipped and checked again with each later
    step, and each prompt still takes every step."""
    module = make_module(tiny_sd_dir, tiny_clip_dir)
    with_gradients = []

    def check(step):
        with_gradients.append([i for i, s in enumerate(module.tokens.sets)
                               if any(p.grad is not None for p in s.parameters())])

    monkeypatch.setattr(module, "_check_finite_gradients", check)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.predict(module, datamodule=PromptDataModule(prompt_file(tmp_path), batch_size=1), return_predictions=False)
    assert with_gradients == [[0], [0], [1], [1], [2], [2]]
    assert (tmp_path / "tokens.safetensors").is_file()


def test_the_multi_process_path_logs_what_fit_logs(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """`trainer.predict` logs, for each step, the mean over all prompts of the reward, penalty, loss, gradient norm
    and reward components: the same curves as a single-process `fit` of the same prompts."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def logged(run_dir, predict):
        module = make_module(tiny_sd_dir, tiny_clip_dir)
        clip_score = ClipScore(str(tiny_clip_dir))
        module.reward = CombinedReward([RewardTerm(clip_score), RewardTerm(clip_score, weight=0.5)])
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=CSVLogger(str(run_dir), name="", version=""),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(run_dir), inference_mode=False)
        data = PromptDataModule(prompt_file(tmp_path), batch_size=2)
        if predict:
            trainer.predict(module, datamodule=data, return_predictions=False)
        else:
            trainer.fit(module, datamodule=data)
        with open(run_dir / "metrics.csv") as f:
            rows = [row for row in csv.DictReader(f) if row.get("train/reward")]
        return {key: [float(row[key]) for row in rows] for key in rows[0] if key.startswith("train/")}

    fitted, predicted = logged(tmp_path / "fit", predict=False), logged(tmp_path / "predict", predict=True)
    assert sorted(predicted) == sorted(fitted) == ["train/clip_score", "train/clip_score_2", "train/conformity",
                                                   "train/grad_norm", "train/loss", "train/reward"]
    for key, values in fitted.items():
        assert len(values) == 3
        torch.testing.assert_close(torch.tensor(predicted[key]), torch.tensor(values), atol=1e-5, rtol=1e-5)
