"""The `python -m ipgo.fit` command line: shipped configs, overrides, resume, bad input."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ipgo.cli import RunFolderExistsError, main, run
from ipgo.module import IPGOModule

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))
# the demo, made quick: 2 prompts, 3 sampling steps
QUICK = ["--config", "configs/tiny.yaml", "--data.limit", "2", "--model.sampler.num_steps", "3",
         "--model.report_prompts", "1", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch, ipgo_cache):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))  # tiny:... models are built in the test cache


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    written = yaml.safe_load((ROOT / config).read_text())["model"]
    assert printed["backbone"]["class_path"] == written["backbone"]["class_path"]  # each config's own family
    assert printed["backbone"]["init_args"]["model"] == written["backbone"]["init_args"]["model"]
    assert printed["mode"] == written["mode"]


@pytest.mark.parametrize("command", ["ipgo.fit", "ipgo.generate", "ipgo.evaluate"])
def test_each_command_names_itself_as_it_is_run(command, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(command if command != "ipgo.fit" else "ipgo.cli").main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m {command} ")


TINY_OF_FAMILY = {"StableDiffusion": "tiny:sd1", "StableDiffusionXL": "tiny:sdxl", "StableDiffusion3": "tiny:sd3"}
TINY_WEIGHTS = {"model": "tiny:clip", "clip_model": "tiny:clip", "processor": "tiny:clip",
                "head": "tiny:aesthetic-head", "checkpoint": "tiny:hps"}


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_builds_and_passes_the_checks_before_a_run(config, tmp_path):
    """Parsing alone lets a misspelt reward argument, a sampler its family does not take or an unknown setting
    through: each config is built, rewards and judges too, and checked as ipgo.fit checks before a run, with tiny
    weights of its family in place of the real ones (and a basis narrow enough for them); every other setting as
    shipped."""
    from ipgo.cli import build_cli

    settings = yaml.safe_load((ROOT / config).read_text())
    model = settings["model"]
    backbone = model["backbone"]
    backbone["init_args"]["model"] = TINY_OF_FAMILY[backbone["class_path"].rsplit(".", 1)[1]]
    model.setdefault("tokens", {})["rank"] = min(model["tokens"].get("rank", 8), 8)
    arguments = [model["reward"].setdefault("init_args", {})] if model.get("reward") else []
    arguments += [spec.setdefault("args", {}) for spec in (model.get("rewards") or []) + (model.get("judges") or [])]
    for args in arguments:
        args.update({key: TINY_WEIGHTS[key] for key in args if key in TINY_WEIGHTS})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings))
    cli = build_cli(["--config", str(tmp_path / "config.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    cli.model.check_trainer(cli.trainer)
    cli.datamodule.setup("fit")
    cli.model.check_input(cli.datamodule.train_prompts, cli.datamodule.val_prompts)
    assert cli.model.sampler_config.scheduler == settings["model"]["sampler"]["scheduler"]


def test_a_misspelt_key_gets_the_nearest_known_one(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 2\n")
    for args, message in [
        (["--model.tokens.n_prefx", "2"], "unrecognized arguments: --model.tokens.n_prefx 2 (did you mean "
                                          "--model.tokens.n_prefix?)"),
        (["--config", str(typo)], "Group 'trainer' does not accept option 'max_epoch' (did you mean "
                                  "--trainer.max_epochs?)"),
        (["--model.tokens.zzz", "2"], "unrecognized arguments: --model.tokens.zzz 2\n"),  # nothing near: no guess
    ]:
        with pytest.raises(SystemExit):
            main(["--config", "configs/tiny.yaml", *args])
        err = capsys.readouterr().err
        assert message in err
        assert "\nusage: python -m ipgo.fit [-h] [-c CONFIG] [--SECTION.KEY VALUE ...]\ntip: " in "\n" + err
        assert "--trainer.accelerator" not in err  # not every option above the error
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--trainer.max_epochs" in capsys.readouterr().out  # the full list stays in --help


def test_any_key_can_be_overridden(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "configs/prompt_wise.yaml", "--model.tokens.rank", "30", "--model.sampler.scheduler", "ddim",
              "--model.tokens", "configs/tokens/notebook.yaml", "--model.tokens.bias", "false", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["tokens"]["rank"] == 300 and model["tokens"]["bias"] is False  # later flags win
    assert model["sampler"]["scheduler"] == "ddim"


def final_tokens(run_dir: Path) -> dict[str, torch.Tensor]:
    """The token parameters after a run's last update (the exported file may hold an earlier step's: select best)."""
    state = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("tokens.")}


def assert_same_final_tokens(a: Path, b: Path) -> None:
    """The last update depends on the optimiser's state: a resume that lost it would end elsewhere."""
    first, second = final_tokens(a), final_tokens(b)
    assert first.keys() == second.keys() and first
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0)


def count_training_epochs(monkeypatch) -> list[int]:
    """The epochs in which training steps run from now on (one entry per step)."""
    epochs: list[int] = []
    step = IPGOModule.training_step

    def counted(self, *args, **kwargs):
        epochs.append(self.current_epoch)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(IPGOModule, "training_step", counted)
    return epochs


@pytest.mark.slow
def test_resume_continues_where_the_run_stopped(tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main([*QUICK, "--trainer.max_epochs", "4", "--trainer.default_root_dir", str(straight)])
    # check_val_every_n_epoch > 1: Lightning would save only after validation, which a prompt-wise run never has
    every = ["--trainer.check_val_every_n_epoch", "3"]
    main([*QUICK, *every, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(resumed)])
    epochs = count_training_epochs(monkeypatch)
    main([*QUICK, *every, "--trainer.max_epochs", "4", "--trainer.default_root_dir", str(resumed), "--ckpt_path",
          "last"])
    assert epochs == [2, 3]  # it went on from the checkpoint: a run from scratch would reproduce the tokens too
    monkeypatch.undo()
    a, b = load_file(straight / "tokens.safetensors"), load_file(resumed / "tokens.safetensors")
    for key in ("prefix", "suffix"):
        assert (a[key] - b[key]).abs().max() < 1e-6
    for name in ("config.yaml", "summary.md", "before_after.png", "checkpoints/last.ckpt"):
        assert (resumed / name).is_file(), name
    assert list(resumed.glob("events.out.tfevents.*"))
    checkpoint = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(k.startswith(("tokens.", "best.")) for k in checkpoint["state_dict"])
    # the first part's metrics survive the resume
    first, second = (resumed / "csv/version_0/metrics.csv").read_text(), (resumed / "csv/version_1/metrics.csv")
    assert first.count("\n") > 2 and second.is_file() and "lr-Adam" in first.splitlines()[0]
    # a finished run folder is not overwritten by a fresh run
    with pytest.raises(SystemExit) as exit_info:
        run([*QUICK, "--trainer.default_root_dir", str(resumed)])
    assert exit_info.value.code == 2
    # another run's checkpoint (here: other prompts) is refused before any weights load

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before the checkpoint was checked")

    monkeypatch.setattr(IPGOModule, "prepare", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        run([*QUICK, "--data.limit", "1", "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "saved by another run: 2 prompts there, 1 here" in err, err[-600:]
    other_family = ["--model.backbone", "ipgo.backbones.StableDiffusionXL", "--model.backbone.model", "tiny:sdxl"]
    for args, message in [
        (other_family, "saved by a run on a 'sd' model ('tiny:sd1'), this run is on a 'sdxl' model"),
        (["--ckpt_path", str(resumed / "checkpoints/lats.ckpt")], "lats.ckpt: no such checkpoint file"),
        (["--ckpt_path", "best"], "--ckpt_path best: a new run has no best checkpoint to resume; give 'last'"),
        # another run's checkpoint started in a folder that holds a finished run: it is not overwritten
        (["--ckpt_path", str(resumed / "checkpoints/last.ckpt"), "--trainer.default_root_dir", str(straight)],
         "already holds a finished run"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run([*QUICK, "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, (args, err[-600:])


def test_a_checkpoint_survives_a_write_cut_short_across_filesystems(tmp_path, monkeypatch):
    """Lightning moves a checkpoint from the system's temporary folder into place, which across filesystems is a copy
    over the old file; ipgo writes it next to itself and renames it, so a copy cut short cannot eat it."""
    import shutil

    main([*QUICK, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)])

    def copy_cut_short(source, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("power cut during the copy")

    monkeypatch.setattr(shutil, "move", copy_cut_short)
    main([*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_a_run_resumes_from_its_own_hpc_or_other_checkpoint_files(tmp_path, monkeypatch):
    """Lightning's "hpc" checkpoint (a preempted cluster job) and a checkpoint file elsewhere in the run folder are
    this run's own: resuming from them is not refused as a used folder."""
    import shutil

    folder = tmp_path / "run"
    main([*QUICK, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(folder)])
    (folder / "tokens.safetensors").unlink()  # an unfinished run
    shutil.copy(folder / "checkpoints/last.ckpt", folder / "hpc_ckpt_1.ckpt")
    (folder / "kept").mkdir()
    shutil.copy(folder / "checkpoints/last.ckpt", folder / "kept/epoch=0.ckpt")
    epochs = count_training_epochs(monkeypatch)
    main([*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(folder), "--ckpt_path", "hpc"])
    main([*QUICK, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(folder), "--ckpt_path",
          str(folder / "kept/epoch=0.ckpt")])
    assert epochs == [1, 1, 2]  # each went on from epoch 1


def test_a_moved_model_folder_resumes_and_another_model_is_refused(tmp_path, tiny_sd_dir, tiny_clip_dir):
    """A run's checkpoint names its model; the same files in another folder (moved, another mount) still resume it,
    other weights do not."""
    import shutil

    from ipgo.backbones import StableDiffusion
    from ipgo.errors import UserError
    from ipgo.rewards import ClipScore

    first, moved, other = tmp_path / "first", tmp_path / "moved", tmp_path / "other"
    for folder in (first, moved, other):
        shutil.copytree(tiny_sd_dir, folder)
    config = other / "unet/config.json"
    config.write_text(config.read_text().replace("{", '{"_retrained": true,', 1))

    def module(folder):
        return IPGOModule(StableDiffusion(str(folder)), ClipScore(str(tiny_clip_dir)))

    saved = module(first)._run_identity(["a cat"])
    shutil.rmtree(first)
    module(moved).check_checkpoint_run(saved, ["a cat"])
    with pytest.raises(UserError, match=r"saved by a run on another model \('.*first', revision None\), this run is "
                                        r"on '.*other'.*resume with it \(a moved local folder"):
        module(other).check_checkpoint_run(saved, ["a cat"])
    earlier = {key: value for key, value in saved.items() if key != "model_files"}  # saved before files were hashed
    with pytest.raises(UserError, match="another model"):
        module(moved).check_checkpoint_run(earlier, ["a cat"])


def test_another_plugin_keeps_the_atomic_checkpoint_writer(tmp_path):
    """A plugin given on the command line (precision, cluster environment ...) is added to the atomic checkpoint
    writer, not put in its place: only a CheckpointIO of the user's replaces it."""
    from lightning.pytorch.plugins.precision import DoublePrecision

    from ipgo.cli import IPGOCLI, AtomicCheckpointIO
    from ipgo.data import PromptDataModule

    cli = IPGOCLI(IPGOModule, PromptDataModule, run=False, args=[
        *QUICK, "--trainer.default_root_dir", str(tmp_path),
        "--trainer.plugins", "lightning.pytorch.plugins.precision.DoublePrecision"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(cli.trainer.precision_plugin, DoublePrecision)


def test_the_progress_bar_shows_no_logger_versions(tmp_path):
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    from ipgo.cli import IPGOCLI, RichRunProgressBar, TQDMRunProgressBar, trainer_defaults
    from ipgo.data import PromptDataModule

    args = ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)]
    cli = IPGOCLI(IPGOModule, PromptDataModule, run=False, args=args, trainer_defaults=trainer_defaults())
    # Lightning's own choice of bar (rich where it is installed), without the versions
    assert isinstance(cli.trainer.progress_bar_callback, RichRunProgressBar if _RICH_AVAILABLE else TQDMRunProgressBar)
    assert "v_num" not in cli.trainer.progress_bar_callback.get_metrics(cli.trainer, cli.model)


def test_a_run_without_checkpointing_writes_its_outputs(tmp_path, capsys):
    """--trainer.enable_checkpointing false, a standard Trainer key, is honoured (no checkpoint callback added)."""
    with pytest.warns(UserWarning, match="one step exports the starting tokens"):  # prompt-wise, select best
        cli = main([*QUICK, "--trainer.max_epochs", "1", "--trainer.enable_checkpointing", "false",
                    "--trainer.default_root_dir", str(tmp_path)])
    assert (tmp_path / "summary.json").is_file() and not (tmp_path / "checkpoints").exists()
    printed = capsys.readouterr()
    assert printed.out.endswith("\n" + (tmp_path / "summary.md").read_text() + "\n")  # printed last
    assert "before/start/after renders" not in printed.err  # QUICK turns the progress bars off: this one too
    main([*QUICK, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "true", "--trainer.default_root_dir",
          str(tmp_path / "shown")])
    assert "ipgo.fit: before/start/after renders: 100%" in capsys.readouterr().err  # the renders after training
    exported = load_file(tmp_path / "tokens.safetensors")["prefix"]
    assert torch.equal(exported, cli.model.best.prefix)  # what the warning says: the tokens measured at the start
    with torch.no_grad():
        assert not torch.allclose(exported, cli.model.token_vectors([0, 1])[0].float())  # not the updated ones


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_last_finished_epoch(tmp_path, monkeypatch):
    """A run that dies mid-way has a checkpoint of its last finished epoch, and resuming it ends as if unbroken."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    main([*QUICK, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(straight)])

    def power_cut(module: IPGOModule) -> None:
        if module.current_epoch == 2:
            raise RuntimeError("power cut")

    with monkeypatch.context() as patched:
        patched.setattr(IPGOModule, "on_train_epoch_start", power_cut)
        with pytest.raises(RuntimeError, match="power cut"):
            main([*QUICK, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(broken)])
    assert torch.load(broken / "checkpoints/last.ckpt", weights_only=False)["epoch"] == 1
    with pytest.raises(RunFolderExistsError, match="unfinished run"):
        main([*QUICK, "--trainer.default_root_dir", str(broken)])
    epochs = count_training_epochs(monkeypatch)
    main([*QUICK, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(broken), "--ckpt_path", "last"])
    assert epochs == [2]
    a, b = load_file(straight / "tokens.safetensors"), load_file(broken / "tokens.safetensors")
    assert (a["prefix"] - b["prefix"]).abs().max() < 1e-6
    assert_same_final_tokens(straight, broken)


def test_a_fresh_run_refuses_a_folder_with_files(tmp_path, monkeypatch):
    """Nothing a user keeps in a folder is overwritten by a run pointed at it; what a run that died before its
    first checkpoint left (logs, config, hyperparameters) is no reason to refuse the same command again."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes\n")
    with pytest.raises(RunFolderExistsError, match=r"is not empty \(config.yaml\)"):
        main([*QUICK, "--trainer.default_root_dir", str(folder)])
    assert (folder / "config.yaml").read_text() == "my own notes\n"

    def out_of_memory(*args):
        raise RuntimeError("out of memory")

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patched:
        patched.setattr(IPGOModule, "training_step", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            main([*QUICK, "--trainer.default_root_dir", str(crashed)])
    assert (crashed / "hparams.yaml").is_file() and not (crashed / "checkpoints/last.ckpt").exists()
    main([*QUICK, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(crashed)])
    assert (crashed / "summary.json").is_file()


@pytest.mark.slow
def test_a_resumed_shuffled_prompt_batch_run_sees_the_same_orders(tmp_path, monkeypatch):
    batch = [*QUICK, "--data.limit", "3", "--model.mode", "prompt-batch", "--data.shuffle", "true",
             "--data.batch_size", "1", "--model.seeds.policy", "fresh"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main([*batch, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(straight)])
    main([*batch, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(resumed)])
    epochs = count_training_epochs(monkeypatch)
    main([*batch, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last"])
    assert epochs == [2, 2, 2]  # the last epoch only: one prompt a step
    a, b = load_file(straight / "tokens.safetensors"), load_file(resumed / "tokens.safetensors")
    assert (a["prefix"] - b["prefix"]).abs().max() < 1e-6


def test_a_run_whose_outputs_failed_is_finished_by_resuming(tmp_path, capsys, monkeypatch):
    """The outputs come after the last epoch (rendering can run out of memory there): resuming writes them."""
    folder = tmp_path / "run"
    main([*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(folder)])
    for name in ("tokens.safetensors", "summary.json", "summary.md"):
        (folder / name).unlink()  # as if the run had failed while writing its outputs
    with pytest.raises(SystemExit):
        run([*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(folder)])
    assert "holds an unfinished run" in capsys.readouterr().err  # a fresh run would overwrite its checkpoint
    epochs = count_training_epochs(monkeypatch)
    main([*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(folder), "--ckpt_path", "last"])
    assert epochs == []  # nothing trained again: only the outputs written
    assert (folder / "summary.json").is_file() and (folder / "tokens.safetensors").is_file()
    files = sorted(folder.rglob("*"))
    with pytest.raises(SystemExit):  # finished now: resuming again has nothing to do, and writes nothing
        run([*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(folder), "--ckpt_path", "last"])
    assert "holds a finished run (2 epochs, summary.json)" in capsys.readouterr().err
    assert sorted(folder.rglob("*")) == files
    with pytest.raises(SystemExit):
        run([*QUICK, "--trainer.default_root_dir", str(tmp_path / "empty"), "--ckpt_path", "last"])
    assert "there is no" in capsys.readouterr().err
    main([*QUICK, "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.default_root_dir",
          str(tmp_path / "no_logger")])  # no logger: no learning-rate monitor either
    assert (tmp_path / "no_logger/summary.json").is_file()


def test_a_continued_run_that_failed_while_writing_its_outputs_is_finished_by_resuming(tmp_path, monkeypatch):
    """Continuing a finished run replaces its outputs: a failure half-way through leaves it unfinished, not finished
    with the old summary beside the new tokens."""
    folder = tmp_path / "run"
    main([*QUICK, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(folder)])
    more = [*QUICK, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(folder), "--ckpt_path", "last"]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patched:
        patched.setattr("ipgo.report.save_before_after", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            main(more)  # the new tokens were written, then rendering the grid failed
    assert not (folder / "summary.json").exists()
    tokens = load_file(folder / "tokens.safetensors")
    epochs = count_training_epochs(monkeypatch)
    main(more)
    assert epochs == [] and (folder / "summary.json").is_file()  # only the outputs written
    assert torch.equal(load_file(folder / "tokens.safetensors")["prefix"], tokens["prefix"])


def preempted_run(folder: Path, monkeypatch, batch: int) -> list[str]:
    """Run 3 epochs of 2 prompts, one per batch, preempted after `batch` of epoch 1 as Lightning's SLURM signal
    handler does it (it saves hpc_ckpt_1.ckpt, then the job ends); returns the command's arguments."""
    args = [*QUICK, "--data.batch_size", "1", "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(folder)]

    def preempted(module, outputs, batch_data, batch_idx):
        if module.current_epoch == 1 and batch_idx == batch:
            module.trainer.save_checkpoint(folder / "hpc_ckpt_1.ckpt")
            raise RuntimeError("preempted")

    with monkeypatch.context() as patched:
        patched.setattr(IPGOModule, "on_train_batch_end", preempted, raising=False)
        with pytest.raises(RuntimeError, match="preempted"):
            main(args)
    return args


def test_a_resume_that_would_not_go_on_exactly_is_refused(tmp_path, monkeypatch, capsys):
    """A checkpoint saved part-way through an epoch (a preempted job's hpc checkpoint) would step some prompts twice
    and others not at all, and other optimiser settings than the checkpoint's would be ignored: both are refused
    before the run's config is written again."""
    folder = tmp_path / "run"
    args = preempted_run(folder, monkeypatch, batch=0)
    config = (folder / "config.yaml").read_text()
    for more, message in [
        (["--ckpt_path", "hpc"], "hpc_ckpt_1.ckpt was saved part-way through epoch 1 (counting from 0; 1 of its "
         "batches done), as a preempted job's hpc checkpoint is: resuming it would run that epoch's batches again from "
         "the first, so some prompts would take two steps and others none. Instead resume from the end of its last "
         "finished epoch with --ckpt_path last"),
        (["--ckpt_path", "last", "--model.optimizer.init_args.lr", "0.5", "--model.lr_scheduler.init_args.gamma",
          "0.1"], "last.ckpt was optimised with other settings (model.lr_scheduler.init_args.gamma 0.9 -> 0.1, "
         "model.optimizer.init_args.lr 0.05 -> 0.5)"),
        (["--ckpt_path", "last", "--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.05"],
         "model.optimizer {'class_path': 'torch.optim.Adam'"),
        # the objective: the tokens would be trained on two, their file naming one (held-out seeds may change)
        (["--ckpt_path", "last", "--model.sampler.guidance_scale", "1.5", "--model.seeds.train", "[7]",
          "--model.seeds.eval", "[1005]", "--model.conformity_weight", "10", "--model.backbone.init_args.dtype",
          "bfloat16", "--model.tokens.bound", "0.5"], "last.ckpt was optimised with other settings "
         "(model.backbone.init_args.dtype float32 -> bfloat16, model.conformity_weight 0.001 -> 10.0, "
         "model.sampler.guidance_scale 4.0 -> 1.5, model.seeds.train [0] -> [7], model.tokens.bound 1.0 -> 0.5). "
         "A resume goes on"),
        (["--ckpt_path", "last", "--model.reward.init_args.model", "tiny:shapes-clip"],
         "model.reward.init_args.model tiny:clip -> tiny:shapes-clip"),
    ]:
        err = bad_input([*args[len(QUICK):], *more], capsys)
        assert message in err, (more, err[-800:])
    assert (folder / "config.yaml").read_text() == config
    (folder / "hpc_ckpt_1.ckpt").unlink()
    err = bad_input([*args[len(QUICK):], "--ckpt_path", "hpc"], capsys)
    assert "--ckpt_path hpc: there is no hpc_ckpt_N.ckpt in" in err
    epochs = count_training_epochs(monkeypatch)
    main([*args, "--ckpt_path", "last", "--model.seeds.eval", "[1005]"])
    assert epochs == [1, 1, 2, 2]


def test_resume_compares_the_optimiser_settings_both_sides_name():
    """A setting one side lacks (an argument a newer torch added) is no change; a different value is."""
    from ipgo.cli import _changed_settings

    saved = {"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05, "betas": [0.9, 0.999]}},
             "lr_scheduler": None}
    newer = {"optimizer": {"class_path": "torch.optim.Adam",
                           "init_args": {"lr": 0.05, "betas": [0.9, 0.999], "decoupled_weight_decay": False}},
             "lr_scheduler": None}
    assert _changed_settings(saved, newer) == ""
    newer["optimizer"]["init_args"]["lr"] = 0.5
    assert _changed_settings(saved, newer) == "model.optimizer.init_args.lr 0.05 -> 0.5"
    rewards = [{"name": "clip_score", "weight": 1.0}, {"name": "aesthetic", "weight": 1.0}]
    later = [{"name": "clip_score", "weight": 1.0}, {"name": "aesthetic", "weight": 0.5, "new_field": None}]
    assert _changed_settings({"rewards": rewards}, {"rewards": later}) == "model.rewards[1].weight 1.0 -> 0.5"
    assert _changed_settings({"seeds": {"train": [0]}}, {"seeds": {"train": [7]}}) == "model.seeds.train [0] -> [7]"


def test_resume_keeps_every_objective_setting_and_the_weights_outputs():
    """Each setting a resume must keep is compared (a change is named), and of the backbone only what changes the
    frozen weights' outputs: dtype, variant, SD 3's T5 length (not, e.g., gradient checkpointing)."""
    from jsonargparse import Namespace

    from ipgo.cli import RESUME_SETTINGS, _changed_settings, _plain, optimisation_settings

    def settings(**model):
        backbone = {"class_path": "ipgo.backbones.StableDiffusion3", "init_args": {
            "dtype": "float32", "variant": None, "max_sequence_length": 256, "gradient_checkpointing": False}}
        return json.loads(optimisation_settings({"model": {"backbone": backbone, **model}}))

    for key in RESUME_SETTINGS:
        assert _changed_settings(settings(**{key: 1}), settings(**{key: 2})) == f"model.{key} 1 -> 2"
    assert _changed_settings(settings(seeds={"train": [0], "eval": [5]}),
                             settings(seeds={"train": [0], "eval": [6]})) == ""  # held-out seeds may change

    def backbone(**arguments):
        config = settings()
        config["backbone"]["init_args"].update(arguments)
        return config

    assert _changed_settings(settings(), backbone(max_sequence_length=128)) == \
        "model.backbone.init_args.max_sequence_length 256 -> 128"
    assert _changed_settings(settings(), backbone(variant="fp16")) == "model.backbone.init_args.variant None -> fp16"
    gradient_checkpointing = {"model": {"backbone": {"class_path": "x", "init_args": {"gradient_checkpointing": True}}}}
    assert "gradient_checkpointing" not in optimisation_settings(gradient_checkpointing)
    assert _plain([Namespace(name="clip_score", args=Namespace(model="m"))]) == [{"name": "clip_score",
                                                                                "args": {"model": "m"}}]


def test_an_interrupted_run_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C ends the run through Lightning's graceful shutdown (exit 1), a cluster's SIGTERM likewise: the user is
    told that the last finished epoch is kept and how to go on from it."""
    folder = tmp_path / "run"
    args = [*QUICK, "--data.batch_size", "1", "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(folder)]

    def interrupted(module, outputs, batch, batch_idx):
        if module.current_epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(IPGOModule, "on_train_batch_end", interrupted, raising=False)
        with pytest.raises(SystemExit):
            main(args)
    err = capsys.readouterr().err
    assert "ipgo.fit stopped before the run finished." in err and "resume with the same command plus --ckpt_path " \
        "last" in err
    epochs = count_training_epochs(monkeypatch)
    main([*args, "--ckpt_path", "last"])
    assert epochs == [1, 1, 2, 2]  # from the epoch the interruption cut short


def test_a_checkpoint_saved_after_an_epochs_last_step_resumes(tmp_path, monkeypatch):
    """Saved after the last batch of an epoch (by a step-count checkpoint, or at validation end), a checkpoint has
    finished that epoch, though Lightning counts it as processed only later: it resumes with the next one."""
    folder = tmp_path / "run"
    args = preempted_run(folder, monkeypatch, batch=1)  # the epoch's last batch (two prompts, one per batch)
    epochs = count_training_epochs(monkeypatch)
    main([*args, "--ckpt_path", "hpc"])
    assert epochs == [2, 2]


RUNNING = ["--model.reward", "null", "--model.rewards",
           "[{name: clip_score, normalize: running, args: {model: 'tiny:clip'}}]"]


def bad_input(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([*QUICK, *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_gives_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    table = tmp_path / "prompts.csv"
    table.write_text("id,caption\n1,a cat\n")
    long = tmp_path / "long.txt"
    long.write_text("a cat " + "very " * 70 + "\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a red circle\na café sign\n".encode("latin-1"))
    out = str(tmp_path / "run")
    cases = [
        (["--data.prompts", str(latin1)], "latin1.txt is not UTF-8 text (it holds the byte 0xe9"),
        # a reward argument: jsonargparse wraps the reward's error in its own ValueError
        (["--model.reward.init_args.model", str(tmp_path / "no-clip")], "no-clip' does not exist"),
        (["--model.backbone.init_args.model", "tiny:sdxl"], "'tiny:sdxl' is a StableDiffusionXLPipeline model, and "
         "StableDiffusion runs StableDiffusionPipeline models: use --model.backbone ipgo.backbones.StableDiffusionXL"),
        (["--model.backbone", "ipgo.backbones.StableDiffusion3", "--model.backbone.init_args.model", "tiny:sd1"],
         "use --model.backbone ipgo.backbones.StableDiffusion "),
        (["--model.backbone.init_args.model", str(tmp_path / "no-model")], "does not exist"),
        (["--data.prompts", str(empty)], "has no prompts"),
        (["--data.prompts", str(table)], "no column 'prompt'; its columns are ['caption', 'id']"),
        (["--data.prompts", str(long), "--model.too_long", "error"], "has 74 tokens but only 69 fit"),
        (["--model.sampler.scheduler", "heunn"], "Expected a typing.Literal['ddim', 'euler', 'lms', 'dpmpp_2m', "
         "'flow_euler']. Got value: heunn"),
        (["--model.backbone.init_args.model", "tiny:sd7"], "unknown tiny model 'tiny:sd7'"),
        (["--model.prompt_attention", "true"], "prompt_attention (IPGO+) is a prompt-batch variant"),
        (["--data.val_fraction", "0.5"], "set data.val_fraction=0"),
        ([*RUNNING], "in prompt-wise mode each prompt's gradient would depend on the other prompts"),
        (["--model.reward", "null", "--model.rewards", "[{name: clip_score, weight: 0, args: {model: 'tiny:clip'}}]"],
         "every reward's weight is 0"),
        ([*RUNNING, "--model.mode", "prompt-batch", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
         "keeps its statistics per process"),
        (["--model.sampler.height", "33"], "model.sampler.height and width must be multiples of 8"),
        (["--model.report_prompts", "-1"], "report_prompts must be >= 0"),
        (["--trainer.max_epochs", "0"], "max_epochs is 0"),
        (["--data.limit", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
         "1 prompt for 2 processes would leave a process without a prompt: run on at most 1 device"),
        (["--trainer.max_epochs", "-1", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
         "(got max_epochs -1): set trainer.max_epochs >= 1"),
        (["--model.lr_interval", "step"], "set model.lr_interval epoch (per batch, a prompt's schedule would depend"),
        (["--trainer.gradient_clip_val", "1.0"], "use model.grad_clip, which clips each prompt's tokens alone"),
        (["--trainer.precision", "bf16-true"], "would make the learned tokens half precision too"),
        (["--trainer.max_steps", "3"], "trainer.max_steps 3 counts batches, so a run that ends part-way through"),
        (["--trainer.max_time", "00:01:00:00"], "trainer.max_time (a Timer checked after every batch) would end"),
        (["--trainer.limit_train_batches", "0.5"], "would leave some prompts without steps"),
        (["--trainer.limit_train_batches", "1"], "would leave some prompts without steps"),  # one batch, not all
        (["--optimizer", "torch.optim.SGD"], "unrecognized arguments: --optimizer"),  # one way: model.optimizer
    ]
    for args, message in cases:
        err = bad_input([*args, "--trainer.default_root_dir", out], capsys)
        assert message in err, (args, err[-2000:])
        assert "Traceback" not in err
        if args[0] in ("--data.prompts", "--trainer.precision"):  # checked before the trainer writes anything
            assert not Path(out).exists(), args
            assert "Token indices sequence length" not in err  # the tokenizer's own warning: noise beside ipgo's
    for folder, message in ((latin1, "is a file, not a folder"), (latin1 / "run", "cannot write there")):
        err = bad_input(["--trainer.default_root_dir", str(folder)], capsys)
        assert f"--trainer.default_root_dir {folder}" in err and message in err and "Traceback" not in err


REWARD_CHOICES = {
    "clip_score": ["--model.reward", "ipgo.rewards.ClipScore", "--model.reward.model", "tiny:clip"],
    "aesthetic": ["--model.reward", "ipgo.rewards.Aesthetic", "--model.reward.head", "tiny:aesthetic-head",
                  "--model.reward.clip_model", "tiny:clip"],
    "combined": ["--model.reward", "null", "--model.rewards",
                 "[{name: hpsv2, weight: 1.0, args: {checkpoint: 'tiny:hps', model_name: ipgo-tiny-ViT}}, "
                 "{name: pickscore, weight: 0.5, normalize: fixed, scale: 2.0, args: {model: 'tiny:clip', "
                 "processor: 'tiny:clip'}}, {name: image_reward, weight: 0.2, args: {checkpoint: "
                 "'tiny:image-reward'}}]"],
    # running statistics (prompt-batch only), and a judge logged beside the optimised reward at weight 0
    "running": ["--model.mode", "prompt-batch", "--model.reward", "null", "--model.rewards",
                "[{name: clip_score, normalize: running, args: {model: 'tiny:clip'}}, {name: aesthetic, weight: 0, "
                "args: {head: 'tiny:aesthetic-head', clip_model: 'tiny:clip'}}]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("choice", sorted(REWARD_CHOICES))
def test_demo_runs_with_each_reward(choice, tmp_path):
    run_dir = tmp_path / choice
    cli = main([*QUICK, *REWARD_CHOICES[choice], "--trainer.max_epochs", "2", "--trainer.default_root_dir",
                str(run_dir)])
    assert (run_dir / "tokens.safetensors").is_file()
    metrics = (run_dir / "csv/version_0/metrics.csv").read_text().splitlines()[0]
    if choice == "combined":
        # prompt-wise: one point per epoch (a step of every prompt), without Lightning's _step/_epoch pair
        assert {"train/hpsv2", "train/pickscore", "train/image_reward", "train/grad_norm"} <= set(metrics.split(","))
        assert not {"train/reward_step", "train/reward_per_update"} & set(metrics.split(","))
        assert [name for name in cli.model.reward.components] == ["hpsv2", "pickscore", "image_reward"]
    if choice == "running":
        assert {"train/aesthetic", "train/reward_per_update"} <= set(metrics.split(","))  # prompt-batch
        assert cli.model.reward.stats["clip_score"].count > 0


def test_unknown_reward_name_lists_the_known_ones(capsys):
    err = bad_input(["--model.reward", "null", "--model.rewards", "[{name: asthetic}]"], capsys)
    assert "unknown reward 'asthetic'" in err and "aesthetic" in err and "image_reward" in err
    hps_with_typo = "[{name: hpsv2, args: {checkpoint: 'tiny:hps', size: 3}}]"
    err = bad_input(["--model.reward", "null", "--model.rewards", hps_with_typo], capsys)
    assert "reward 'hpsv2'" in err and "its arguments are checkpoint, model_name" in err
    err = bad_input(["--model.rewards", "[{name: aesthetic}]"], capsys)  # the demo config already has a reward
    assert "give exactly one of model.reward" in err


def test_a_checkpoint_of_an_earlier_version_with_unused_token_parameters_resumes(tmp_path, monkeypatch):
    """Earlier versions kept an empty side's parameters and zero-width rotation angles, in the model state and in
    the optimiser's numbering: such a checkpoint still resumes, to the tokens of an uninterrupted run."""
    shape = ["--model.tokens.n_suffix", "0", "--model.tokens.rotation_angles", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main([*QUICK, *shape, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(straight)])
    main([*QUICK, *shape, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(resumed)])
    path = resumed / "checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    state, old = checkpoint["state_dict"], {}
    for key, value in state.items():  # rebuilt as an earlier version saved it: 6 parameters a set, not 2
        old[key] = value
        if key.endswith("prefix.coeffs"):
            stem = key[: -len("prefix.coeffs")]
            old[stem + "prefix.angles"] = torch.zeros(len(value), 0)
            old[stem + "suffix.basis"], old[stem + "suffix.coeffs"] = torch.randn(32, 8), torch.zeros(0, 8)
            old[stem + "suffix.angles"] = torch.zeros(0, 0)
    checkpoint["state_dict"] = old
    optimizer = checkpoint["optimizer_states"][0]
    optimizer["state"] = {6 * (i // 2) + i % 2: value for i, value in optimizer["state"].items()}
    optimizer["param_groups"][0]["params"] = list(range(6 * len(optimizer["param_groups"][0]["params"]) // 2))
    torch.save(checkpoint, path)
    epochs = count_training_epochs(monkeypatch)
    main([*QUICK, *shape, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(resumed), "--ckpt_path",
          "last"])
    assert epochs == [1]  # resumed with the checkpoint's optimiser state, not started again
    a, b = load_file(straight / "tokens.safetensors"), load_file(resumed / "tokens.safetensors")
    assert (a["prefix"] - b["prefix"]).abs().max() < 1e-6
    assert_same_final_tokens(straight, resumed)
