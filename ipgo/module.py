"""IPGOModule: IPGO's optimisation loop as a LightningModule.

For a batch of prompts, with learned prefix/suffix tokens (see `tokens.py`, `inject.py`):

    images_i = TruncatedSampler(conditioning(prompt_i, tokens_i), noise(seed))   for each seed
    loss_i   = -mean_seeds reward(images_i, prompt_i) + lambda · conformity_i

prompt-wise: every prompt has its own token set; the batch loss is the *sum* of loss_i, so
each set receives exactly the gradient of its own one-prompt run, is clipped on its own,
and keeps its own best tokens. One epoch is one optimisation step of every prompt.
prompt-batch: one shared set; the batch loss is the mean of loss_i; prompts held out in
the data module's validation split measure generalisation.

Only token parameters are trained and checkpointed; frozen parts load in `configure_model`.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ipgo.backbones.base import Backbone, TooLong, check_prompt_lengths, model_fingerprint, portable_model_name
from ipgo.errors import ConfigError, NonFiniteGradientError, NonFiniteRewardError, UserError
from ipgo.export import TokenFile
from ipgo.files import atomic_path
from ipgo.inject import Layout, conditioning, conformity
from ipgo.rewards.base import Reward
from ipgo.rewards.combine import (
    CombinedReward,
    RewardConfigError,
    RewardSpec,
    RunningStats,
    build_reward,
    frozen_statistics,
    uses_running_statistics,
)
from ipgo.sampling import SamplerConfig, TruncatedSampler, initial_noise
from ipgo.tokens import TokenConfig, TokenSets

Mode = Literal["prompt-wise", "prompt-batch"]


@dataclass
class SeedConfig:
    """Noise seeds for optimisation and for held-out renders."""

    train: list[int] = field(default_factory=lambda: [0])
    """Seeds used while optimising; each prompt is rendered once per seed in every step."""
    policy: Literal["fixed", "fresh"] = "fixed"
    """fixed: the same noise in every step; fresh: new noise each epoch, derived from the train seeds."""
    eval: list[int] = field(default_factory=lambda: [1000, 1001])
    """Held-out seeds for before/after renders and validation; never used in optimisation."""

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("seeds.train is empty: give at least one seed")
        if not self.eval:
            raise ConfigError("seeds.eval is empty: the held-out renders (validation, the before/after grid) need at "
                              "least one seed")
        if set(self.train) & set(self.eval):
            raise ConfigError(
                f"seeds.eval {sorted(set(self.train) & set(self.eval))} are also training seeds; held-out "
                "seeds must differ from seeds.train"
            )

    def for_items(self, indices: Sequence[int], epoch: int) -> list[int]:
        """Seeds of the images of a batch, prompt-major (prompt 0 with every seed first)."""
        if self.policy == "fixed":
            return [s for _ in indices for s in self.train]
        # Python's hash of a tuple of ints is not salted: the same triple gives the same seed in every run.
        return [hash((s, epoch, int(i))) % 2**31 for i in indices for s in self.train]


class BestTokens(nn.Module):
    """Per prompt: the best training reward seen and the tokens that reached it; the first and last reward.

    Steps are compared on their raw reward components (mean over seeds), put on one scale by `combine`
    at the time of each comparison: with running normalisation the logged totals of different steps
    sit on different scales and would not rank the steps.
    """

    def __init__(self, num_prompts: int, n_prefix: int, n_suffix: int, dim: int, n_components: int = 1) -> None:
        super().__init__()
        self.register_buffer("reward", torch.full((num_prompts,), -torch.inf))
        self.register_buffer("components", torch.zeros(num_prompts, n_components))
        self.register_buffer("first", torch.full((num_prompts,), torch.nan))
        self.register_buffer("last", torch.full((num_prompts,), torch.nan))
        self.register_buffer("prefix", torch.zeros(num_prompts, n_prefix, dim))
        self.register_buffer("suffix", torch.zeros(num_prompts, n_suffix, dim))

    @torch.no_grad()
    def update(self, index: Tensor, reward: Tensor, components: Tensor, prefix: Tensor, suffix: Tensor,
               combine: Callable[[Tensor], Tensor]) -> None:
        """Record a step of these prompts: `reward` (B,) as optimised, `components` (B, n_components) raw."""
        index = index.to(self.reward.device)
        reward = reward.detach().to(self.reward.device)
        components = components.detach().float().to(self.reward.device)
        self.first[index] = torch.where(self.first[index].isnan(), reward, self.first[index])
        self.last[index] = reward
        stored = self.components[index]
        known = ~stored.isnan().any(dim=-1)  # unknown: resumed from a checkpoint that did not keep components
        better = ~torch.isfinite(self.reward[index]) | torch.where(
            known, combine(components) > combine(stored), reward > self.reward[index])
        rows = index[better]
        self.reward[rows] = reward[better]
        self.components[rows] = components[better]
        self.prefix[rows] = prefix.detach().float()[better]
        self.suffix[rows] = suffix.detach().float()[better]


def _difference(key: str, saved: Any, current: Any) -> str:
    """One line of what differs between a checkpoint's run and this one."""
    if key != "prompts":
        return f"{key} {saved!r} there, {current!r} here"
    first = next((k for k, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current)))
    there, here = (p[first] if first < len(p) else None for p in (saved, current))
    return (f"{len(saved)} prompts there, {len(current)} here, the first difference at prompt {first + 1}: "
            f"{there!r} there, {here!r} here")


class IPGOModule(L.LightningModule):
    """Learns prefix/suffix tokens for a frozen text-to-image model by backpropagating a reward.

    Args:
        backbone: the frozen model family adapter (e.g. `ipgo.backbones.StableDiffusion`).
        reward: the reward to maximise, e.g. `ipgo.rewards.ClipScore` (or give `rewards`).
        mode: "prompt-wise" (a token set per prompt) or "prompt-batch" (one shared set).
        tokens: shape, constraints and init of the token sets.
        layout: "padded" (sequence of the model's length) or "unpadded" (the notebook's).
        too_long: a prompt that does not fit beside the tokens: "error" or "truncate" (with a warning).
        sampler: scheduler, steps, gradient steps, guidance and image size.
        seeds: training and held-out noise seeds.
        conformity_weight: weight lambda of the conformity penalty.
        grad_clip: clip each token set's gradient norm to this (None: no clipping).
        optimizer: optimiser over the token parameters.
        lr_scheduler: optional learning-rate schedule.
        lr_interval: step the schedule every "epoch" (prompt-wise: every step of each prompt; the only choice there)
            or every optimiser "step".
        select: prompt-wise export of the "best" tokens seen (on the training seeds) or the "last".
        report_prompts: prompts rendered before/after on the held-out seeds at the end of fit.
        image_every_n_epochs: log renders of up to 4 prompts on the held-out seeds to TensorBoard
            (`images/held_out_seeds`: a row per prompt, a column per seed) every this many epochs and after the
            last (0: never).
        prompt_attention: IPGO+ (prompt-batch): make the shared tokens prompt-dependent with a
            parameter-free cross-attention over the prompt's states (formula in `inject.py`).
        rewards: instead of `reward`, named rewards summed with weights, each logged on its own:
            `[{name: aesthetic, weight: 1.0, args: {head: ...}}, {name: hpsv2, weight: 0.5, ...}]`.
        judges: named rewards that only score the before/after renders of the run summary, never
            optimised, e.g. `[{name: shapes_oracle}]` or a held-out reward model.
    """

    optimisation_settings: str | None = None
    """The optimiser and schedule as configured (JSON; ipgo.fit sets it), kept in checkpoints: resuming restores the
    checkpoint's, so ipgo.fit refuses a resume that asks for others."""

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward | None = None,
        mode: Mode = "prompt-wise",
        tokens: TokenConfig = TokenConfig(),
        layout: Layout = "padded",
        too_long: TooLong = "error",
        sampler: SamplerConfig = SamplerConfig(),
        seeds: SeedConfig = SeedConfig(),
        conformity_weight: float = 1e-3,
        grad_clip: float | None = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: Literal["epoch", "step"] = "epoch",
        select: Literal["best", "last"] = "best",
        report_prompts: int = 8,
        image_every_n_epochs: int = 5,
        prompt_attention: bool = False,
        rewards: list[RewardSpec] | None = None,
        judges: list[RewardSpec] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("prompt-wise", "prompt-batch"):
            raise ConfigError(f"unknown mode {mode!r}; choose 'prompt-wise' or 'prompt-batch'")
        self.save_hyperparameters(ignore=["backbone", "reward", "rewards", "judges", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        if (reward is None) == (rewards is None):
            raise RewardConfigError(
                "give exactly one of model.reward (a reward class) and model.rewards (a list of named rewards); "
                "to replace a config's reward on the command line, add --model.reward null"
            )
        self.reward = reward if rewards is None else build_reward(rewards)
        if not self.reward.differentiable:
            raise RewardConfigError(
                f"reward {self.reward.name!r} is not differentiable, so it cannot be optimised: use it to judge "
                "(model.judges, or ipgo.evaluate --rewards) and optimise a differentiable reward"
            )
        if isinstance(self.reward, CombinedReward) and all(term.weight == 0 for term in self.reward.terms):
            raise RewardConfigError("every reward's weight is 0, so there is nothing to optimise: give one a weight")
        if mode == "prompt-wise" and uses_running_statistics(self.reward):
            raise ConfigError(
                "normalize: running shares one mean and spread over all prompts, so in prompt-wise mode each "
                "prompt's gradient would depend on the other prompts of its batch: use normalize: fixed (offset, "
                "scale) or none, or mode prompt-batch"
            )
        self.judges = build_reward(judges) if judges else None
        self.mode = mode
        self.token_config = tokens
        self.layout = layout
        self.too_long = too_long
        self.sampler_config = sampler
        self.sampler = TruncatedSampler(sampler)
        self.seeds = seeds
        self.conformity_weight = conformity_weight
        self.grad_clip = grad_clip
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_interval = lr_interval
        self.select = select
        self.report_prompts = report_prompts
        self.image_every_n_epochs = image_every_n_epochs
        if report_prompts < 0:
            raise ConfigError(f"model.report_prompts must be >= 0 (0: no before/after renders), got {report_prompts}")
        if mode == "prompt-wise" and lr_interval != "epoch":
            raise ConfigError("prompt-wise runs step the learning-rate schedule once per step of each prompt: set "
                              "model.lr_interval epoch (per batch, a prompt's schedule would depend on how many other "
                              "prompts the run has)")
        if prompt_attention and mode != "prompt-batch":
            raise ConfigError("prompt_attention (IPGO+) is a prompt-batch variant: set mode=prompt-batch")
        self.prompt_attention = prompt_attention
        self.strict_loading = False  # checkpoints hold only the tokens
        self.compute = {"fit_seconds": 0.0, "images_rendered": 0}  # the optimisation's cost, kept across resumes
        self._fit_started = time.perf_counter()
        self.tokens: TokenSets | None = None
        self.best: BestTokens | None = None
        self._checked_input: tuple[list[str], list[str]] | None = None  # the prompts check_input passed
        self.prompts: list[str] = []
        self.val_prompts: list[str] = []
        self._val_rewards = self._val_seen = torch.zeros(0)  # per validation prompt, see on_validation_epoch_start
        self._update_rewards: list[Tensor] = []  # prompt-batch: the rewards of the batches one update accumulates

    # -- set-up ---------------------------------------------------------------------------
    @property
    def _processes(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def prompt_wise(self) -> bool:
        return self.mode == "prompt-wise"

    def prepare(self, train_prompts: Sequence[str], val_prompts: Sequence[str] = ()) -> None:
        """Check the input (`check_input`), then load the weights and build the tokens."""
        if self.tokens is not None:
            return
        if self._checked_input != (list(train_prompts), list(val_prompts)):  # ipgo.fit checks before the trainer
            self.check_input(train_prompts, val_prompts)
        for reward in (self.reward, self.judges):  # before the backbone: a missing reward model is reported early
            if reward is not None:
                reward.to(dtype=self.backbone.dtype)  # frozen weights follow the run's dtype
                reward.load()
        self.backbone.load()
        self._build_tokens(train_prompts, val_prompts)

    def check_input(self, train_prompts: Sequence[str], val_prompts: Sequence[str] = ()) -> None:
        """Everything that can be checked without model weights (tokenizers and configs only): the prompts' lengths
        beside the tokens, the sampler and token rank against the model, the rewards against the prompts."""
        if self.prompt_wise and val_prompts:
            raise ConfigError(
                "prompt-wise tokens are made for their own prompts, so a validation split has nothing to "
                "measure: set data.val_fraction=0 (held-out seeds are in model.seeds.eval)"
            )
        repeated = [p for p, count in Counter(train_prompts).items() if count > 1]
        if self.prompt_wise and repeated:
            raise UserError(
                f"the prompt {repeated[0]!r} is in the prompt file {Counter(train_prompts)[repeated[0]]} times "
                f"({len(repeated)} prompts repeat); prompt-wise tokens are made per prompt, so each copy would be "
                "optimised on its own and only one exported: remove the repeated lines"
            )
        self.backbone.load_tokenizer()
        if self.layout == "unpadded" and self.backbone.sequence_length != self.backbone.max_length:
            raise UserError(
                f"layout=unpadded keeps only n_prefix + prompt + n_suffix positions, which would drop the "
                f"{self.backbone.sequence_length - self.backbone.max_length} T5 states that follow CLIP's in "
                f"{type(self.backbone).__name__}'s conditioning: set model.layout=padded"
            )
        all_prompts = list(train_prompts) + list(val_prompts)
        reserved = self.token_config.n_prefix + self.token_config.n_suffix
        budget = self.backbone.max_length - reserved
        if budget < 3:
            raise ConfigError(
                f"{reserved} learned tokens (model.tokens.n_prefix + n_suffix) leave {max(budget, 0)} of the text "
                f"encoder's {self.backbone.max_length} positions to the prompt, which needs at least 3 (start, a "
                "word, end): learn fewer tokens"
            )
        check_prompt_lengths(all_prompts, self.backbone.token_lengths(all_prompts), budget, reserved, self.too_long)
        sampler = self.sampler_config
        self.backbone.check_sampler(sampler.scheduler, sampler.height, sampler.width)
        width = self.backbone.conditioning_width
        if width is not None and self.token_config.rank > width:
            raise ConfigError(f"model.tokens.rank {self.token_config.rank} exceeds the width {width} of "
                              f"{self.backbone.model!r}'s conditioning states (E is D x rank, orthonormal): give a "
                              f"rank of at most {width}")
        for reward in (self.reward, self.judges):
            if reward is not None:
                reward.check(all_prompts, self.sampler_config.height, self.sampler_config.width)
        self._checked_input = (list(train_prompts), list(val_prompts))

    def _build_tokens(self, train_prompts: Sequence[str], val_prompts: Sequence[str]) -> None:
        self.prompts = list(train_prompts)
        self.val_prompts = list(val_prompts)
        dim = self.backbone.hidden_size
        self.tokens = TokenSets(self.token_config, dim, len(self.prompts) if self.prompt_wise else 1)
        if self.prompt_wise:
            terms = len(self.reward.names) if isinstance(self.reward, CombinedReward) else 1
            self.best = BestTokens(len(self.prompts), self.token_config.n_prefix, self.token_config.n_suffix, dim,
                                   terms)

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Refuse trainer settings that break the method (ipgo.fit calls this before anything is written)."""
        if trainer.precision in ("16-true", "bf16-true"):
            raise ConfigError(
                f"trainer.precision {trainer.precision} would make the learned tokens half precision too, but they "
                "are optimised in float32 (the orthonormal basis's QR, Adam's small steps): use trainer.precision "
                "32-true and set the frozen weights' dtype with model.backbone.init_args.dtype (float16 or bfloat16)"
            )
        if not self.prompt_wise:
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError(
                f"prompt-wise: trainer.precision {trainer.precision} uses one loss scaler for all prompts in a batch, "
                "so one prompt's overflowing gradient would skip every prompt's step without an error: use "
                "trainer.precision 32-true with model.backbone.init_args.dtype float16 (as configs/prompt_wise.yaml "
                "does), or bf16-mixed"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                "prompt-wise optimisation steps each prompt's own tokens every epoch; gradient accumulation "
                "does not apply: remove trainer.accumulate_grad_batches"
            )
        if trainer.max_steps != -1 and not trainer.fast_dev_run:  # a debugging run may step the first batch only
            raise ConfigError(f"prompt-wise: trainer.max_steps {trainer.max_steps} counts batches, so a run that ends "
                              "part-way through an epoch would step some prompts once more than others: set "
                              "trainer.max_epochs (the steps per prompt) and leave trainer.max_steps unset")
        if any(isinstance(callback, Timer) and callback._interval == "step" for callback in trainer.callbacks):
            raise ConfigError("prompt-wise: trainer.max_time (a Timer checked after every batch) would end the run "
                              "part-way through an epoch, so some prompts would take one step fewer than others, "
                              "and a resume would not step them again: set trainer.max_epochs (the steps per prompt), "
                              "or a Timer callback with interval epoch")
        every_batch = isinstance(trainer.limit_train_batches, float) and trainer.limit_train_batches == 1.0
        if not trainer.fast_dev_run and (not every_batch or trainer.overfit_batches):
            raise ConfigError("prompt-wise: trainer.limit_train_batches or overfit_batches would leave some prompts "
                              "without steps (each epoch steps every prompt once): to run on fewer prompts, set "
                              "data.limit")
        if trainer.gradient_clip_val:
            raise ConfigError("prompt-wise: trainer.gradient_clip_val clips the norm of all prompts' tokens together, "
                              "so one prompt's gradient would scale another's; use model.grad_clip, which clips each "
                              "prompt's tokens alone")

    def configure_model(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ConfigError("IPGOModule needs a PromptDataModule: pass datamodule=... to trainer.fit")
        self.check_trainer(self.trainer)
        self.prepare(datamodule.train_prompts, datamodule.val_prompts)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.tokens.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_interval}}

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    # -- checkpoints hold only what is trained ---------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if k.startswith(("tokens.", "best."))}

    # -- the loop -----------------------------------------------------------------------------
    def token_vectors(self, set_ids: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Current prefix (B, n_p, D) and suffix (B, n_s, D) of the given token sets."""
        return self.tokens(set_ids)

    def _set_ids(self, index: Tensor) -> Tensor:
        return index if self.prompt_wise else torch.zeros_like(index)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # every process renders a batch of the same size (Lightning pads the shares): count them all
        loss, metrics = self._step_loss(list(batch["prompt"]), batch["index"], self.current_epoch,
                                        processes=self._processes)
        # averaged over all processes' prompts; one point per epoch (prompt-wise, an epoch is one step of every
        # prompt: per-batch points would zig-zag between prompt groups; prompt-batch, a batch is part of an update
        # when gradients accumulate: see on_before_optimizer_step for the per-update reward)
        per = {"batch_size": len(batch["prompt"]), "on_step": False, "on_epoch": True, "sync_dist": True}
        for name, values in metrics.items():
            self.log(f"train/{name}", values.mean(), prog_bar=name == "reward", **per)
        if not self.prompt_wise:
            self._update_rewards.append(metrics["reward"])
        trainer = self._trainer  # None when called outside a Trainer
        accumulate, batches = (trainer.accumulate_grad_batches, trainer.num_training_batches) if trainer else (1, 1)
        if accumulate > 1 and batches != float("inf"):
            # Lightning divides every loss by accumulate_grad_batches, also in an epoch's last update when it gathers
            # fewer batches: there, that would scale the update down. Each update is the mean over its batches.
            return loss * accumulate / min(accumulate, batches - batch_idx + batch_idx % accumulate)
        return loss

    def _step_loss(self, prompts: list[str], index: Tensor, step: int,
                   processes: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one optimisation step of these prompts (`step`: the epoch, for fresh noise), and each
        prompt's reward, conformity penalty, loss and reward components (detached, (B,) each); `processes` renders
        the same number of images in this step (counted in the compute record)."""
        prefix, suffix = self.token_vectors(self._set_ids(index))
        n_seeds = len(self.seeds.train)
        seeds = self.seeds.for_items(index.tolist(), step)
        images, penalty = self._sample(prompts, prefix, suffix, seeds, self.layout, self.too_long,
                                       self.prompt_attention)
        rewards = self.reward(images, [p for p in prompts for _ in range(n_seeds)]).view(len(prompts), n_seeds)
        self._check_finite(rewards, prompts, step)
        reward = rewards.mean(dim=1)  # (B,)
        losses = -reward + self.conformity_weight * penalty
        loss = losses.sum() if self.prompt_wise else losses.mean()
        if self.best is not None:
            self.best.update(index, reward, self._components(rewards), prefix, suffix, self._combine)
        self.compute["images_rendered"] += len(prompts) * n_seeds * processes
        metrics = {"reward": reward.detach(), "conformity": penalty.detach(), "loss": losses.detach()}
        if isinstance(self.reward, CombinedReward):
            for name, scores in self.reward.components.items():
                metrics[name] = scores.detach().float().view(len(prompts), n_seeds).mean(dim=1)
        return loss, metrics

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Prompt-wise optimisation of one batch of prompts from the first step to the last.

        The multi-process path (`trainer.predict` with the DDP strategy): each rank optimises its own
        prompts with a local optimiser, so no gradient is ever averaged between prompts. Steps per
        prompt = `trainer.max_epochs`; every step is the same as in `fit` (same init, noise, Adam
        state per parameter, per-set clipping, projection, schedule per step), so each prompt ends
        with the tokens a single-process `fit` gives it.
        """
        if not self.prompt_wise or self.lr_interval != "epoch":
            raise ConfigError("the multi-process path is prompt-wise only, with lr_interval=epoch")
        prompts, index = list(batch["prompt"]), batch["index"]
        params = [p for i in index.tolist() for p in self.tokens.sets[i].parameters()]
        optimizer = self.optimizer_factory(params)
        schedule = self.lr_scheduler_factory(optimizer) if self.lr_scheduler_factory else None
        with torch.enable_grad():
            for step in range(self.trainer.max_epochs):
                optimizer.zero_grad()
                loss, metrics = self._step_loss(prompts, index, step)
                loss.backward()
                self._record_step(index, step, metrics)
                self._check_finite_gradients(step)
                if self.grad_clip is not None:  # the norms come in the order of the sets
                    norms = self.tokens.clip_grad_norm_per_set_(self.grad_clip)
                    self._record_step(index.sort().values, step, {"grad_norm": norms})
                optimizer.step()
                self.tokens.project_()
                if schedule is not None:
                    schedule.step()
        for param in params:  # done with these prompts: later batches' clipping and checks go over set grads only
            param.grad = None
        self._predicted += index.tolist()
        return {"index": index}

    def on_predict_start(self) -> None:
        self._fit_started = time.perf_counter()
        self._predicted: list[int] = []
        self._step_metrics: dict[str, Tensor] = {}  # name -> (prompts, steps): each prompt's value at each step

    def _record_step(self, index: Tensor, step: int, metrics: dict[str, Tensor]) -> None:
        for name, values in metrics.items():
            if name not in self._step_metrics:
                self._step_metrics[name] = torch.zeros(len(self.prompts), self.trainer.max_epochs, device=self.device)
            self._step_metrics[name][index.to(self.device), step] = values.float()

    def _log_steps(self) -> None:
        """The multi-process path's training metrics, as `fit` logs them: at each step, the mean over all prompts
        (each prompt once, whichever process optimised it; Lightning's predict shares are not padded)."""
        seen = torch.zeros(len(self.prompts), device=self.device)
        seen[torch.tensor(self._predicted, dtype=torch.long, device=self.device)] = 1.0
        seen = self.trainer.strategy.reduce(seen, reduce_op="sum")
        means = {name: (self.trainer.strategy.reduce(values, reduce_op="sum")[seen > 0]
                        / seen[seen > 0, None]).mean(dim=0) for name, values in self._step_metrics.items()}
        for logger in self.loggers:  # Lightning's loggers write on rank 0 only
            for step in range(self.trainer.max_epochs):
                logger.log_metrics({f"train/{name}": float(m[step]) for name, m in means.items()} | {"epoch": step},
                                   step=step)
            logger.save()

    def on_predict_end(self) -> None:
        """Each rank writes its prompts' tokens to a shard; rank 0 merges them and writes the run's outputs."""
        self._log_steps()
        run_dir = Path(self.trainer.default_root_dir)
        mine = set(self._predicted)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if k.startswith("best.") or (k.startswith("tokens.sets.") and int(k.split(".")[2]) in mine)}
        shard = run_dir / "shards" / f"rank{self.global_rank}.pt"
        with atomic_path(shard) as tmp:
            torch.save({"state": state, "indices": sorted(mine), "compute": self._compute_so_far()}, tmp)
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            # this run's ranks only: a crashed run with more processes may have left shards behind
            self._merge_shards([run_dir / "shards" / f"rank{r}.pt" for r in range(self.trainer.world_size)])
            from ipgo.report import write_run_outputs

            write_run_outputs(self, run_dir)

    def _merge_shards(self, shards: list[Path]) -> None:
        merged = {"fit_seconds": 0.0, "images_rendered": 0}
        for path in shards:
            shard = torch.load(path, weights_only=True)
            rows = torch.tensor(shard["indices"], dtype=torch.long)
            tokens = {k: v for k, v in shard["state"].items() if k.startswith("tokens.")}
            self.load_state_dict(tokens, strict=False)
            for name in ("reward", "components", "first", "last", "prefix", "suffix"):
                getattr(self.best, name)[rows] = shard["state"][f"best.{name}"][rows].to(self.device)
            merged["fit_seconds"] = max(merged["fit_seconds"], shard["compute"]["fit_seconds"])
            merged["images_rendered"] += shard["compute"]["images_rendered"]
        self.compute, self._fit_started = merged, time.perf_counter()

    def _components(self, rewards: Tensor) -> Tensor:
        """Raw reward components (batch, n_components) of the scoring that gave `rewards` (batch, seeds), mean
        over seeds."""
        if not isinstance(self.reward, CombinedReward):
            return rewards.detach().float().mean(dim=1, keepdim=True)
        scores = torch.stack([self.reward.components[name] for name in self.reward.names], dim=-1)
        return scores.detach().float().view(*rewards.shape, -1).mean(dim=1)

    def _combine(self, components: Tensor) -> Tensor:
        """Comparable totals of raw components (..., n_components) on the current normalisation."""
        if isinstance(self.reward, CombinedReward):
            return self.reward.combine(components)
        return components[..., 0]

    def _check_finite(self, rewards: Tensor, prompts: Sequence[str], step: int) -> None:
        bad = ~torch.isfinite(rewards).all(dim=1)
        if bad.any():
            prompt = prompts[int(bad.nonzero()[0])]
            hint = ("With float16 weights this is usually an overflow: use backbone dtype bfloat16 or float32, or a "
                    "lower learning rate." if self.backbone.dtype == torch.float16 else
                    "The tokens may have diverged: try a lower learning rate or grad_clip; or the reward model "
                    "fails on these images.")
            raise NonFiniteRewardError(
                f"reward {self.reward.name!r} is NaN or infinite for prompt {prompt!r} in epoch {step}. "
                + hint
            )

    def _check_finite_gradients(self, step: int) -> None:
        """Refuse a step that would write NaN into tokens (and then into the checkpoint), naming the prompt."""
        bad = self.tokens.non_finite_gradients()
        if bad:
            whose = f"of prompt {self.prompts[bad[0]]!r}" if self.prompt_wise else "of the shared tokens"
            hint = ("With float16 weights this is usually an overflow in the backward pass: use backbone dtype "
                    "bfloat16 or float32." if self.backbone.dtype == torch.float16 else
                    "Try a lower learning rate or grad_clip, or a reward whose gradient stays finite.")
            raise NonFiniteGradientError(
                f"the gradient of the tokens {whose} is NaN or infinite in epoch {step} (its reward was finite), so "
                f"the step was not taken and the tokens and last checkpoint are as before. {hint}"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:  # a loss scaler skips such steps itself
            self._check_finite_gradients(self.current_epoch)
        if self.grad_clip is not None:
            norms = self.tokens.clip_grad_norm_per_set_(self.grad_clip)
            if norms.numel():
                self.log("train/grad_norm", norms.mean(), on_step=not self.prompt_wise, on_epoch=self.prompt_wise,
                         batch_size=len(norms))  # the mean over token sets; an epoch's, weighted by sets
        if self._update_rewards:  # prompt-batch: the mean reward of every prompt this update accumulated
            rewards = torch.cat(self._update_rewards)
            self._update_rewards = []
            self.log("train/reward_per_update", rewards.mean(), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=len(rewards), sync_dist=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.tokens.project_()

    def on_validation_epoch_start(self) -> None:
        # per validation prompt: its mean reward and whether this process scored it. Several processes get
        # padded shares (Lightning repeats prompts so that the shares are equal); the mean over prompts at the
        # epoch's end counts each prompt once
        self._val_rewards = torch.zeros(len(self.val_prompts), device=self.device)
        self._val_seen = torch.zeros(len(self.val_prompts), device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts = list(batch["prompt"])
        prefix, suffix = self.token_vectors(torch.zeros(len(prompts), dtype=torch.long))
        rewards = self.score(prompts, self.seeds.eval, prefix, suffix)
        index = batch["index"].to(self.device)
        self._val_rewards[index] = rewards.mean(1).float()
        self._val_seen[index] = 1.0

    def on_validation_epoch_end(self) -> None:
        rewards, seen = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in (self._val_rewards, self._val_seen))
        scored = seen > 0
        if scored.any():  # the same value on every process (sync_dist averages equal values: no Lightning warning)
            self.log("val/reward", (rewards[scored] / seen[scored]).mean(), prog_bar=True, sync_dist=True)

    # -- rendering -------------------------------------------------------------------------
    @torch.no_grad()
    def render(
        self, prompts: Sequence[str], seeds: Sequence[int], prefix: Tensor | None = None,
        suffix: Tensor | None = None,
    ) -> Tensor:
        """Images (len(prompts) * len(seeds), 3, H, W), prompt-major; no tokens renders the raw prompt."""
        if prefix is None:
            dim = self.backbone.hidden_size
            prefix = suffix = torch.zeros(len(prompts), 0, dim, device=self.device)
            layout, too_long, attention = "padded", "truncate", False
        else:
            layout, too_long, attention = self.layout, self.too_long, self.prompt_attention
        images, _ = self._sample(prompts, prefix, suffix, [s for _ in prompts for s in seeds], layout, too_long,
                                 attention)
        return images

    def _sample(self, prompts: Sequence[str], prefix: Tensor, suffix: Tensor, seeds: Sequence[int], layout: Layout,
                too_long: TooLong, attention: bool) -> tuple[Tensor, Tensor]:
        """Images (len(seeds), 3, H, W) of the prompts with these tokens, for `seeds` given prompt-major (the same
        number per prompt), and each prompt's conformity penalty (len(prompts),).

        With the unpadded layout, prompts of different token lengths share the denoiser batch under a
        cross-attention mask, or go through it separately where the denoiser takes none (SD 3; see `ipgo.inject`),
        so a prompt's images do not depend on the prompts batched with it.
        """
        n = len(seeds) // len(prompts)
        images: list[Tensor] = [torch.empty(0)] * len(prompts)
        penalties: list[Tensor] = [torch.empty(0)] * len(prompts)
        for group in self._length_groups(prompts, prefix.shape[1] + suffix.shape[1], layout, too_long):
            rows = torch.tensor(group, device=prefix.device)
            cond, uncond, embeds, placed_prefix, placed_suffix = conditioning(
                self.backbone, [prompts[i] for i in group], prefix[rows], suffix[rows], layout, too_long,
                prompt_attention=attention, masked=True,
            )
            group_seeds = [seeds[i * n + k] for i in group for k in range(n)]
            noise = initial_noise(self.backbone, self.sampler_config, group_seeds, self.device)
            out = self.sampler(self.backbone, cond.repeat_interleave(n), uncond.repeat_interleave(n), noise)
            penalty = conformity(embeds.hidden, embeds.lengths, placed_prefix, placed_suffix)
            for k, i in enumerate(group):
                images[i], penalties[i] = out[k * n : (k + 1) * n], penalty[k]
        return torch.cat(images), torch.stack(penalties)

    def _length_groups(self, prompts: Sequence[str], reserved: int, layout: Layout,
                       too_long: TooLong) -> list[list[int]]:
        """Positions of the prompts that can share a denoiser batch: all of them, or with the unpadded layout on a
        denoiser without a cross-attention mask (SD 3) those of the same token length."""
        if layout != "unpadded" or self.backbone.masks_cross_attention:
            return [list(range(len(prompts)))]
        groups: dict[int, list[int]] = {}
        for i, length in enumerate(self.backbone.encode(prompts, reserved, too_long).lengths.tolist()):
            groups.setdefault(length, []).append(i)
        return list(groups.values())

    @torch.no_grad()
    def score(self, prompts: Sequence[str], seeds: Sequence[int], prefix: Tensor | None = None,
              suffix: Tensor | None = None) -> Tensor:
        """Reward (len(prompts), len(seeds)) of renders of the prompts."""
        images = self.render(prompts, seeds, prefix, suffix)
        with frozen_statistics(self.reward):  # only training moves running normalisation
            rewards = self.reward(images, [p for p in prompts for _ in seeds])
        return rewards.view(len(prompts), len(seeds))

    def export_vectors(self) -> tuple[Tensor, Tensor]:
        """The tokens to export: per prompt (N, n, D) for prompt-wise, shared (n, D) for prompt-batch."""
        with torch.no_grad():
            if not self.prompt_wise:
                prefix, suffix = self.token_vectors([0])
                return prefix[0], suffix[0]
            prefix, suffix = self.token_vectors(range(len(self.prompts)))
            if self.select == "best":
                seen = torch.isfinite(self.best.reward).to(prefix.device)
                prefix = torch.where(seen[:, None, None], self.best.prefix.to(prefix.device), prefix)
                suffix = torch.where(seen[:, None, None], self.best.suffix.to(suffix.device), suffix)
            return prefix, suffix

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ipgo_compute"] = self._compute_so_far()
        checkpoint["ipgo_run"] = self._run_identity()
        if self.optimisation_settings is not None:
            checkpoint["ipgo_optimisation"] = self.optimisation_settings
        if isinstance(self.reward, CombinedReward):
            checkpoint["ipgo_reward_statistics"] = {name: asdict(s) for name, s in self.reward.stats.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint_run(checkpoint.get("ipgo_run", {}), self.prompts)
        state = checkpoint.get("state_dict", {})
        _drop_unused_token_parameters(checkpoint, set(self.state_dict()))
        if "best.reward" in state and "best.components" not in state:  # saved before components were kept
            reward = state["best.reward"]
            state["best.components"] = (torch.full((len(reward), len(self.reward.names)), torch.nan)
                                        if isinstance(self.reward, CombinedReward) else reward[:, None].clone())
        self.compute = dict(checkpoint.get("ipgo_compute", self.compute))
        if isinstance(self.reward, CombinedReward):  # a resumed run normalises as if it had not stopped
            for name, statistics in checkpoint.get("ipgo_reward_statistics", {}).items():
                self.reward.stats[name] = RunningStats(**statistics)

    def check_checkpoint_run(self, saved: dict[str, Any], prompts: Sequence[str]) -> None:
        """Refuse a checkpoint saved by a run (`saved`: its "ipgo_run") other than this one on `prompts`; needs no
        weights, so the command line checks before loading."""
        current = self._run_identity(prompts)
        if saved.get("family", current["family"]) != current["family"]:
            raise UserError(f"the checkpoint was saved by a run on a {saved['family']!r} model ({saved['model']!r}), "
                            f"this run is on a {current['family']!r} model ({current['model']!r}): resume with the "
                            "run's own config (its config.yaml) or start a new run folder")
        if saved and "t5_states" in current and "t5_states" not in saved:
            raise UserError("the checkpoint was saved by an earlier ipgo, whose SD 3 conditioning dropped the last "
                            "T5 states for the learned tokens; this ipgo keeps them, so its tokens were trained on "
                            "another conditioning: start a new run folder")
        moved = saved.get("model_files") is not None and saved.get("model_files") == current["model_files"]
        if (saved.get("model", current["model"]) != current["model"] and not moved) or \
                saved.get("revision", current["revision"]) != current["revision"]:
            raise UserError(f"the checkpoint was saved by a run on another model ({saved['model']!r}, revision "
                            f"{saved.get('revision')!r}), this run is on {current['model']!r} (revision "
                            f"{current['revision']!r}); its tokens were learnt for that model: resume with it (a moved "
                            "local folder with the same files is recognised) or start a new run folder")
        differences = [_difference(key, saved[key], value) for key, value in current.items()
                       if key in saved and saved[key] != value and key not in ("model", "revision", "model_files")]
        if differences:
            raise UserError(
                f"the checkpoint was saved by another run: {'; '.join(differences)}. Its tokens would go to the "
                "wrong prompts or shapes: resume with the run's own config (its config.yaml) or start a new run folder"
            )

    def _run_identity(self, prompts: Sequence[str] | None = None) -> dict[str, Any]:
        """What a checkpoint's tokens belong to (this run's, or a run's on `prompts`): a resumed run must match it."""
        shape = {key: getattr(self.token_config, key) for key in ("n_prefix", "n_suffix", "rank", "rotation_angles",
                                                                   "bias")}
        rewards = list(self.reward.names) if isinstance(self.reward, CombinedReward) else [self.reward.name]
        if not hasattr(self, "_model_files"):  # a moved local model folder keeps these (see check_checkpoint_run)
            self._model_files = model_fingerprint(self.backbone.model)
        return {"family": self.backbone.family, "model": portable_model_name(self.backbone.model),
                "revision": self.backbone.revision, "model_files": self._model_files,
                "mode": self.mode, "prompts": list(self.prompts if prompts is None else prompts), "tokens": shape,
                "layout": self.layout, "prompt_attention": self.prompt_attention, "rewards": rewards,
                **({"t5_states": "kept"} if self.backbone.family == "sd3" else {})}  # see inject.conditioning

    def _compute_so_far(self) -> dict[str, Any]:
        return {**self.compute, "fit_seconds": self.compute["fit_seconds"] + time.perf_counter() - self._fit_started}

    def compute_record(self) -> dict[str, Any]:
        """Wall-clock time, peak memory and sampler calls of the optimisation (recorded in token files)."""
        record = self._compute_so_far()
        if torch.cuda.is_available() and self.device.type == "cuda":
            record["peak_memory_bytes"], record["memory_kind"] = torch.cuda.max_memory_allocated(), "cuda max allocated"
        else:
            record["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            record["memory_kind"] = "process peak RSS"
        record["device"] = str(self.device)
        record["processes"] = self._processes
        record["sampler_calls_per_prompt"] = record["images_rendered"] / max(1, len(self.prompts))
        return record

    def on_train_epoch_end(self) -> None:
        every, epoch = self.image_every_n_epochs, self.current_epoch + 1
        if every and (epoch % every == 0 or epoch == self.trainer.max_epochs) and self.trainer.is_global_zero:
            self._log_image_grid()  # and after the last epoch: the final tokens

    @torch.no_grad()
    def _log_image_grid(self) -> None:
        """Renders of a few prompts (validation ones for prompt-batch) on the held-out seeds, to TensorBoard."""
        from torchvision.utils import make_grid

        prompts = (self.val_prompts or self.prompts)[:4]
        if self.prompt_wise:
            index = [self.prompts.index(p) for p in prompts]
            prefix, suffix = self.token_vectors(index)
        else:
            prefix, suffix = self.token_vectors([0] * len(prompts))
        images = self.render(prompts, self.seeds.eval, prefix, suffix)
        grid = make_grid(images.float().cpu(), nrow=len(self.seeds.eval))
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("images/held_out_seeds", grid, self.global_step)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            from ipgo.report import write_run_outputs

            write_run_outputs(self, Path(self.trainer.default_root_dir))

    def token_file(self) -> TokenFile:
        """The tokens to export, with what they were made for (`save_tokens` writes it)."""
        prefix, suffix = self.export_vectors()
        return TokenFile(
            prefix=prefix,
            suffix=suffix,
            family=self.backbone.family,
            base_model=portable_model_name(self.backbone.model),
            hidden_size=self.backbone.hidden_size,
            layout=self.layout,
            too_long=self.too_long,
            mode=self.mode,
            prompts=list(self.prompts) if self.prompt_wise else None,
            train_prompts=None if self.prompt_wise else list(self.prompts),
            prompt_attention=self.prompt_attention,
            extra=self.metadata(),
        )

    def optimised_rewards(self) -> dict[str, str]:
        """The rewards the tokens were optimised for, by name, with where their weights come from (`Reward.weights`):
        a combination's terms of weight 0 are only logged."""
        if not isinstance(self.reward, CombinedReward):
            return {self.reward.name: self.reward.weights}
        return {name: term.reward.weights for name, term in zip(self.reward.names, self.reward.terms)
                if term.weight != 0}

    def metadata(self) -> dict[str, str]:
        """String metadata recorded in token files."""
        import json

        # SD 3's T5 length sets the conditioning's length: a pipeline must rebuild it the same way
        t5_length = getattr(self.backbone, "max_sequence_length", None)
        return {
            **({} if t5_length is None else {"max_sequence_length": str(t5_length)}),
            # the weights trained on, which generate and evaluate load again
            **{key: value for key in ("revision", "variant") if (value := getattr(self.backbone, key, None))},
            "dtype": self.backbone.dtype_name,  # generate and evaluate render in it too
            "rewards": json.dumps(list(self.optimised_rewards())),
            "reward_weights": json.dumps(self.optimised_rewards()),  # evaluate's best-of-N selects with the same
            "compute": json.dumps(self.compute_record()),
            "sampler": json.dumps(asdict(self.sampler_config)),
            "seeds": json.dumps(asdict(self.seeds)),
            "tokens": json.dumps(asdict(self.token_config)),
            "select": self.select if self.prompt_wise else "last",
            "weights_fingerprint": json.dumps(self.backbone.weights_fingerprint()),  # see TokenFile.check_fits
            "text_encoders": json.dumps(self.backbone.text_encoders()),  # likewise
        }


def _drop_unused_token_parameters(checkpoint: dict[str, Any], own: set[str]) -> None:
    """Checkpoints of earlier versions hold parameters that no longer exist (an empty side's, zero-width rotation
    angles) in the model state and in the optimiser's, which numbers the token parameters in state-dict order:
    drop them from both and renumber the rest, so such a run resumes."""
    state = checkpoint.get("state_dict", {})
    keys = [key for key in state if key.startswith("tokens.")]
    kept = [i for i, key in enumerate(keys) if key in own]
    if len(kept) == len(keys):
        return
    number = {old: new for new, old in enumerate(kept)}
    for optimizer in checkpoint.get("optimizer_states", []):
        optimizer["state"] = {number[i]: value for i, value in optimizer["state"].items() if i in number}
        for group in optimizer["param_groups"]:
            group["params"] = [number[i] for i in group["params"] if i in number]
    for key in keys:
        if key not in own:
            del state[key]
