"""The `ipgo.fit` command line: LightningCLI over IPGOModule and PromptDataModule.

The run folder is `trainer.default_root_dir`. Unless a logger is configured, metrics go to
TensorBoard event files in `<run>/` and to `<run>/csv/version_N/metrics.csv` (N counts resumes);
the resolved config to `<run>/config.yaml`; checkpoints to `<run>/checkpoints/`
(`last.ckpt` after every epoch); at the end the module writes `tokens.safetensors`,
`before_after.png`, `summary.md` and `summary.json` there.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from ipgo.data import PromptDataModule
from ipgo.errors import ConfigError, UserError, reported
from ipgo.files import atomic_path, check_writable_folder, listing
from ipgo.module import IPGOModule
from ipgo.rewards.combine import uses_running_statistics


class RunFolderExistsError(UserError, FileExistsError):
    """A fresh run pointed at a folder that already holds a run."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written next to themselves, then renamed over the old one. Lightning writes a local checkpoint to a
    file in the system's temporary folder and moves it into place: where that folder is another filesystem (a
    tmpfs /tmp), the move is a copy over the old checkpoint, and a crash during it leaves neither."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as partial:
            torch.save(checkpoint, partial)


class _WithoutVersion:
    """A progress bar without `v_num`, which shows the two loggers' versions as "_0"."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        return items


class RichRunProgressBar(_WithoutVersion, RichProgressBar):
    """Lightning's default bar where rich is installed, without `v_num`."""


class TQDMRunProgressBar(_WithoutVersion, TQDMProgressBar):
    """Lightning's default bar without rich, without `v_num`."""


class SuggestingParser(LightningArgumentParser):
    """Lightning's parser, whose error for an unknown key also names the nearest known one."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        found = re.search(r"unrecognized arguments: (--[\w.]+)|Group '([\w.]+)' does not accept option '(\w+)'",
                          message)
        if found:
            parent, _, name = (found[1] or f"--{found[2]}.{found[3]}").rpartition(".")
            siblings = [option.rpartition(".")[2] for option in self._option_string_actions
                        if option.rpartition(".")[0] == parent]  # the keys beside the unknown one
            nearest = difflib.get_close_matches(name, siblings, n=1)
            if nearest:
                message += f" (did you mean {parent}.{nearest[0]}?)"
        super().error(message, ex)

    def format_usage(self) -> str:
        # argparse's usage lists every option (about 80 lines here) above an error; --help still lists them all
        return f"usage: {self.prog} [-h] [-c CONFIG] [--SECTION.KEY VALUE ...]\n"


class IPGOCLI(LightningCLI):
    """LightningCLI with ipgo's run-folder conventions and a `--ckpt_path` to resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Resume from this checkpoint; 'last' resumes the run folder's checkpoints/last.ckpt.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._get(self.config_init, "trainer", default={})
        run_dir = Path(config.get("default_root_dir") or "runs/ipgo")
        if config.get("logger") in (None, True):
            # TensorBoard appends to the run folder; CSV gets a new version per (resumed) run, since
            # CSVLogger deletes an existing metrics.csv in its folder
            kwargs["logger"] = [
                TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False),
                CSVLogger(save_dir=str(run_dir), name="csv"),
            ]
        kwargs["default_root_dir"] = str(run_dir)
        kwargs["inference_mode"] = False  # the multi-process prompt-wise path optimises inside predict
        callbacks = list(config.get("callbacks") or [])
        if config.get("logger") is not False:  # the learning-rate monitor needs a logger
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        wants_checkpoints = config.get("enable_checkpointing") is not False
        if wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # an explicit folder, so that `--ckpt_path last` finds it before the trainer is set up
            # and `last.ckpt` rewritten after every epoch (with save_last and no top-k file, Lightning would write
            # it only when training ends, so an interrupted run could not resume); at the end of the training
            # epoch, since Lightning would otherwise save only after validation, which prompt-wise runs and
            # check_val_every_n_epoch > 1 skip
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1,
                                             every_n_epochs=1, enable_version_counter=False,
                                             save_on_train_epoch_end=True))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichRunProgressBar() if _RICH_AVAILABLE else TQDMRunProgressBar())
        kwargs["callbacks"] = callbacks
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a cluster or precision plugin keeps it too
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def trainer_defaults() -> dict[str, Any]:
    return {
        "default_root_dir": "runs/ipgo",
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }


# Expected here, and noise to a user: the frozen model is in eval mode on purpose, prompt-wise
# runs have no validation prompts, and a resumed run's checkpoint folder holds its checkpoint.
QUIET = (r"Found \d+ module\(s\) in eval mode", r"Total length of `list` across ranks is zero",
         r"Checkpoint directory .* exists and is not empty",
         r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning 2.6 on torch 2.14, not ours to act on


class _NoAdvert(logging.Filter):
    """Lightning's tip to install its cloud logger, printed by every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


NO_ADVERT = _NoAdvert()


def build_cli(args: list[str] | None = None) -> IPGOCLI:
    """Parse the command line (or `args`) and build its trainer, model and datamodule (no weights load)."""
    return IPGOCLI(
        IPGOModule,
        PromptDataModule,
        parser_class=SuggestingParser,
        run=False,
        args=args,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # one way to choose them: model.optimizer and model.lr_scheduler
        parser_kwargs={"prog": "python -m ipgo.fit",
                       "description": "Learn IPGO prefix/suffix tokens for a frozen text-to-image model."},
    )


def main(args: list[str] | None = None) -> IPGOCLI:
    """Parse the command line (or `args`), then fit; returns the CLI (its trainer, model, datamodule)."""
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NO_ADVERT)  # once: the same filter
    cli = build_cli(args)
    run_dir = Path(cli.trainer.default_root_dir)
    ckpt_path = cli.config.get("ckpt_path")
    cli.model.optimisation_settings = optimisation_settings(cli.config)  # kept in checkpoints, see check_checkpoint
    if cli.trainer.max_epochs == 0:
        raise ConfigError("trainer.max_epochs is 0, so nothing would be optimised: give it at least 1")
    if cli.model.prompt_wise and cli.model.select == "best" and cli.trainer.max_epochs == 1:
        warnings.warn("trainer.max_epochs is 1: a prompt-wise run with model.select best exports each prompt's best "
                      "measured tokens, and a step's reward is measured before its update, so one step exports the "
                      "starting tokens. Give max_epochs >= 2 (or model.select last)", UserWarning, stacklevel=2)
    cli.model.check_trainer(cli.trainer)
    check_writable_folder(run_dir, "--trainer.default_root_dir", "ipgo.fit")
    checkpoint = checkpoint_file(ckpt_path, run_dir)
    if not resumes_this_run(checkpoint, run_dir):
        refuse_used_folder(run_dir)  # a fresh run, or one started from another run's checkpoint
    if cli.trainer.world_size > 1 and uses_running_statistics(cli.model.reward):
        raise ConfigError("normalize: running keeps its statistics per process, so the processes would scale the "
                          "reward differently: use normalize: fixed (offset, scale) or none with several devices")
    cli.datamodule.setup("fit")  # the prompts' lengths and the like, before the loggers and config are written
    cli.model.check_input(cli.datamodule.train_prompts, cli.datamodule.val_prompts)
    if cli.model.prompt_wise and cli.trainer.world_size > 1:
        # several processes: each optimises its own prompts with a local optimiser (see IPGOModule.predict_step)
        prompts = len(cli.datamodule.train_prompts)
        if prompts < cli.trainer.world_size:
            plural = "s" if prompts > 1 else ""
            raise ConfigError(f"{prompts} prompt{plural} for {cli.trainer.world_size} processes would leave a process "
                              f"without a prompt: run on at most {prompts} device{plural}")
        if ckpt_path is not None:
            raise UserError("multi-process prompt-wise runs cannot resume from a checkpoint; run them again")
        epochs = cli.trainer.max_epochs  # Lightning sets its default only for fit, not for this path
        if epochs is None or epochs < 1:
            raise ConfigError(f"multi-process prompt-wise runs take trainer.max_epochs steps per prompt (got "
                              f"max_epochs {epochs}): set trainer.max_epochs >= 1")
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    else:
        if checkpoint is not None:
            done = check_checkpoint(cli, checkpoint)
            max_epochs = cli.trainer.max_epochs
            if (run_dir / "summary.json").exists() and max_epochs is not None and 0 <= max_epochs <= done:
                raise UserError(f"{run_dir} holds a finished run ({done} epochs, summary.json): there is nothing to "
                                f"resume. To optimise further, raise --trainer.max_epochs above {done} (its tokens and "
                                "summary are then replaced); to start again, choose a new --trainer.default_root_dir")
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule,
                            ckpt_path=str(checkpoint) if checkpoint is not None else ckpt_path)
        except SystemExit:  # Ctrl-C (Lightning exits after its shutdown) or SIGTERM (its SIGTERMException)
            last = run_dir / "checkpoints" / "last.ckpt"
            if cli.trainer.is_global_zero and last.is_file():
                print(f"\nipgo.fit stopped before the run finished. {last} holds its last finished epoch: resume "
                      "with the same command plus --ckpt_path last", file=sys.stderr)
            raise
        if cli.trainer.is_global_zero and not (run_dir / "summary.json").exists():
            # resumed after its last epoch (the outputs failed before, e.g. out of memory): Lightning skips the
            # training loop and its end hook, so the outputs are written here
            from ipgo.report import write_run_outputs

            cli.model.to(cli.trainer.strategy.root_device)  # the strategy's teardown moved it to the CPU
            write_run_outputs(cli.model, run_dir)
    if cli.trainer.is_global_zero and (run_dir / "summary.md").is_file():
        print("\n" + (run_dir / "summary.md").read_text(encoding="utf-8"))  # here: the progress bar has closed
    return cli


def checkpoint_file(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """The local checkpoint `--ckpt_path` names (`last`: the run folder's; `hpc`: Lightning's newest hpc_ckpt_N.ckpt
    there), refused before anything loads when it is missing; None without one, or for what Lightning resolves
    itself (a URL, "registry")."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "best":  # Lightning knows a best checkpoint only within the process that wrote it
        raise UserError(f"--ckpt_path best: a new run has no best checkpoint to resume; give 'last' to resume {last}, "
                        "or the path of a .ckpt file")
    if ckpt_path is None or "://" in ckpt_path or ckpt_path == "registry":
        return None
    if ckpt_path == "last":
        if not last.is_file():
            raise UserError(f"--ckpt_path last: there is no {last} to resume; leave --ckpt_path out to start the run")
        return last
    if ckpt_path == "hpc":
        versions = {int(match[1]): path for path in run_dir.glob("hpc_ckpt_*.ckpt")
                    if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name))}
        if not versions:
            raise UserError(f"--ckpt_path hpc: there is no hpc_ckpt_N.ckpt in {run_dir} (Lightning writes one when a "
                            f"cluster job is preempted); give 'last' to resume {last}")
        return versions[max(versions)]
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file. Give the path of a .ckpt file, or "
                        f"'last' to resume {last}")
    return path


def resumes_this_run(checkpoint: Path | None, run_dir: Path) -> bool:
    """Whether the checkpoint resumes the run in `run_dir`: a checkpoint file anywhere inside it (a ModelCheckpoint
    may have its own dirpath). A URL or registry name counts as another run's."""
    return checkpoint is not None and checkpoint.resolve().is_relative_to(run_dir.resolve())


# what a resume must keep: the optimiser and schedule (the checkpoint's are restored), and the objective (another
# reward, sampler, training seeds or token constraint part-way through would train the tokens on two objectives,
# while their file names one)
RESUME_SETTINGS = ("optimizer", "lr_scheduler", "lr_interval", "reward", "rewards", "sampler", "seeds", "tokens",
                   "conformity_weight", "grad_clip")


def optimisation_settings(config: Any) -> str:
    """The settings a command gives that a resume must keep (`RESUME_SETTINGS`; of the frozen weights, what changes
    their outputs: dtype, variant, SD 3's T5 length; class and every argument), as JSON. Held-out seeds may change:
    they are never optimised on."""
    model = config["model"]
    chosen = {key: _plain(model.get(key)) for key in RESUME_SETTINGS}
    if isinstance(chosen["seeds"], dict):
        chosen["seeds"].pop("eval", None)
    backbone = _plain(model.get("backbone"))
    if isinstance(backbone, dict):
        arguments = backbone.get("init_args") or {}
        chosen["backbone"] = {"class_path": backbone.get("class_path"), "init_args": {
            key: arguments[key] for key in ("dtype", "variant", "max_sequence_length") if key in arguments}}
    return json.dumps(chosen, sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    """A config value as plain dicts and lists (jsonargparse gives Namespaces, also inside lists)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def check_checkpoint(cli: IPGOCLI, path: Path) -> int:
    """Refuse, before any weights load, another run's checkpoint, one saved part-way through an epoch, and other
    settings a resume must keep (`optimisation_settings`) than the checkpoint's; returns the epochs it has done.
    Memory-mapped: a prompt-wise checkpoint of many prompts can hold gigabytes of optimiser state, of which only the
    run's description is read."""
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    run, settings = saved.get("ipgo_run", {}), saved.get("ipgo_optimisation")
    loop = saved.get("loops", {}).get("fit_loop", {})
    epochs = loop.get("epoch_progress", {}).get("current", {})
    # saved at the end of a training epoch: "processed" counts it, "completed" not yet
    done = int(epochs.get("processed", saved.get("epoch", -1) + 1))
    batch_progress = loop.get("epoch_loop.batch_progress", {})
    batches = batch_progress.get("current", {})
    del saved
    cli.datamodule.setup("fit")
    cli.model.check_checkpoint_run(run, cli.datamodule.train_prompts)
    if epochs.get("started", done) > done:  # saved during an epoch
        if not (batch_progress.get("is_last_batch") and batches.get("processed") == batches.get("ready")):
            last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            hint = ("resume from the end of its last finished epoch with --ckpt_path last"
                    if last.is_file() and last.resolve() != path.resolve() else "start the run again in a new folder")
            raise UserError(f"{path.name} was saved part-way through epoch {done} (counting from 0; "
                            f"{batches.get('processed', 0)} of its batches done), as a preempted job's hpc checkpoint "
                            "is: resuming it would run that epoch's batches again from the first, so some prompts "
                            f"would take two steps and others none. Instead {hint}")
        done += 1  # after the epoch's last step (at validation end, or by a step-count checkpoint): it is finished
    changed = settings and _changed_settings(json.loads(settings), json.loads(cli.model.optimisation_settings))
    if changed:
        raise UserError(f"{path.name} was optimised with other settings ({changed}). A resume goes on with the "
                        "checkpoint's optimisation: its optimiser and learning-rate schedule are restored (new ones "
                        "would be ignored), and another reward, sampler, training seeds, token constraint or frozen "
                        "weights' dtype would train the tokens on two objectives while their file names one. Leave "
                        "these as they were (the run's config.yaml), or start a new run")
    return done


def _changed_settings(saved: dict[str, Any], given: dict[str, Any], prefix: str = "model") -> str:
    """`key saved -> given` for each setting both name with different values, e.g.
    `model.optimizer.init_args.lr 0.05 -> 0.5` or `model.rewards[1].weight 1.0 -> 0.5` (an argument only one side
    has, e.g. one a newer torch added, is not a change)."""
    changes = []
    for key in sorted(set(saved) & set(given)):
        old, new = saved[key], given[key]
        name = f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
                all(isinstance(item, dict) for item in old + new):  # a list of settings: compared item by item
            old, new = ({f"[{i}]": item for i, item in enumerate(items)} for items in (old, new))
        if isinstance(old, dict) and isinstance(new, dict) and old.get("class_path", 0) == new.get("class_path", 0):
            changes.append(_changed_settings(old, new, name))
        elif old != new:
            changes.append(f"{name} {old} -> {new}")
    return ", ".join(change for change in changes if change)


def refuse_used_folder(run_dir: Path) -> None:
    """A fresh run needs an empty (or new) folder: it would overwrite a run's files, or a user's."""
    if (run_dir / "summary.json").exists():
        raise RunFolderExistsError(
            f"{run_dir} already holds a finished run (summary.json). Choose a new folder with "
            "--trainer.default_root_dir."
        )
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        raise RunFolderExistsError(
            f"{run_dir} holds an unfinished run ({last}): resume it with --ckpt_path last, or choose a new folder "
            "with --trainer.default_root_dir."
        )
    present = sorted(path.name for path in run_dir.iterdir() if not _left_by_a_stopped_run(path)) \
        if run_dir.is_dir() else []
    if present:
        raise RunFolderExistsError(
            f"{run_dir} is not empty ({listing(present)}); a run there "
            "would overwrite its files. Choose a new folder with --trainer.default_root_dir, or empty this one "
            "(a run stopped before its first checkpoint cannot be resumed)."
        )


def _left_by_a_stopped_run(path: Path) -> bool:
    """What a run that cannot be resumed leaves: its logs and config (stopped before its first checkpoint, e.g. on
    a typo in the prompt file) or a multi-process run's shards. Nothing there to keep: the next run may write over
    it (stale shards are never merged)."""
    if path.name == "config.yaml":
        with path.open(encoding="utf-8", errors="replace") as file:
            return file.readline().startswith("# lightning.pytorch==")  # LightningCLI's header, not a user's file
    if path.name == "checkpoints":
        return path.is_dir() and not any(path.iterdir())
    return path.name in ("csv", "shards", "hparams.yaml") or path.name.startswith("events.out.tfevents.")


def run(args: list[str] | None = None) -> None:
    """Entry point of `python -m ipgo.fit`: bad input ends with its message and exit code 2, not a traceback."""
    with reported("ipgo.fit"):
        main(args)
