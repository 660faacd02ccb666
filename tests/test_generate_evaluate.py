"""`ipgo.generate` and `ipgo.evaluate` on a tiny run: same seeds, held-out checks, statistics."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipgo.cli import main as fit
from ipgo.errors import UserError
from ipgo.evaluate import candidate_seeds, evaluate
from ipgo.evaluate import main as evaluate_cli
from ipgo.generate import SeedError, generate, parse_seeds
from ipgo.generate import main as generate_cli
from ipgo.rewards import RewardSpec

ROOT = Path(__file__).parents[1]
REWARDS = [RewardSpec("clip_score", args={"model": "tiny:clip"}),
           RewardSpec("aesthetic", args={"head": "tiny:aesthetic-head", "clip_model": "tiny:clip"})]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ipgo_cache):
    """A finished tiny prompt-wise run: 2 prompts, 2 steps, trained on seed 0."""
    patch = pytest.MonkeyPatch()
    patch.setenv("IPGO_CACHE", str(ipgo_cache))  # tiny:... models resolve into the test cache
    run_dir = tmp_path_factory.mktemp("run")
    cli = fit(["--config", str(ROOT / "configs/tiny.yaml"), "--data.prompts", str(ROOT / "configs/prompts/tiny.txt"),
               "--data.limit", "2", "--model.sampler.num_steps", "3", "--model.report_prompts", "0",
               "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(run_dir)])
    yield run_dir, cli.model
    patch.undo()


def test_generate_matches_the_modules_render(run, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from ipgo.export import load_tokens

    run_dir, module = run
    calls = []
    call = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                        lambda pipe, prompt, **kwargs: calls.append(len(prompt)) or call(pipe, prompt, **kwargs))
    renders = generate(str(run_dir), seeds="1000-1002", out=str(tmp_path), batch_size=2)
    assert renders.tuned.shape == (2, 3, 3, 32, 32)
    assert calls == [2, 1] * 4  # at most batch_size images per call: raw and tuned, 2 prompts each
    progress = capsys.readouterr().err  # the renders are counted: raw and tuned, 2 prompts x 3 seeds each
    assert "ipgo.generate: 100%" in progress and "12/12" in progress
    prefix, suffix = load_tokens(run_dir).tokens_for(renders.prompts)
    ours = module.render(renders.prompts, renders.seeds, prefix, suffix).view_as(renders.tuned)
    assert torch.allclose(ours, renders.tuned, atol=1e-5)  # the export is the single source of truth
    assert torch.allclose(module.render(renders.prompts, renders.seeds).view_as(renders.raw), renders.raw, atol=1e-5)
    manifest = json.loads((tmp_path / "images.json").read_text())
    assert len(manifest["images"]) == 12 and (tmp_path / "grid.png").is_file()
    assert (manifest["model"], manifest["dtype"]) == (load_tokens(run_dir).base_model, "float32")  # what rendered
    assert all((tmp_path / image["file"]).is_file() for image in manifest["images"])

    # the folder now holds images: another generate there is refused, or replaces them all when asked
    with pytest.raises(UserError, match="is not empty .* pass --overwrite true"):
        generate(str(run_dir), seeds="1000", out=str(tmp_path))
    with pytest.raises(UserError, match="is not empty"):
        evaluate([f"ipgo={run_dir}"], REWARDS[:1], seeds="1000", out=str(tmp_path))
    generate(str(run_dir), seeds="1001", out=str(tmp_path), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["0000_seed1001.png", "0001_seed1001.png"]
    with monkeypatch.context() as patched:  # a rerun that fails part-way leaves no manifest naming new images as old
        patched.setattr("ipgo.generate.save_before_after", full_disk)
        with pytest.raises(OSError, match="No space left"):
            generate(str(run_dir), seeds="1002", out=str(tmp_path), overwrite=True)
    assert json.loads((tmp_path / "images.json").read_text())["writing"]  # files only, no labels to mislead
    generate(str(run_dir), seeds="1001", out=str(tmp_path), overwrite=True)
    # the failed run's images went too: its manifest listed them
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == ["0000_seed1001.png", "0001_seed1001.png"]
    manifest = json.loads((tmp_path / "images.json").read_text())
    manifest["images"][0]["file"] = "../mine.png"  # a manifest ipgo did not write: nothing it lists is deleted
    (tmp_path / "images.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"lists .*mine.png, outside .*choose another --out"):
        generate(str(run_dir), seeds="1001", out=str(tmp_path), overwrite=True)
    (tmp_path / "images.json").write_text('{"images": [{"file_name": "x.png"}]}')
    with pytest.raises(UserError, match="is not an ipgo.generate manifest"):
        generate(str(run_dir), seeds="1001", out=str(tmp_path), overwrite=True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run_dir / "tokens.safetensors").stat().st_mode) == 0o666 & ~umask  # readable as any output


def test_generate_renders_a_few_prompts_at_a_time_and_replaces_images_only_once_all_are_rendered(run, tmp_path,
                                                                                                  monkeypatch):
    """Rendered GRID_PROMPTS prompts at a time (here 1), the PNGs are those of one pass and the grid and returned
    images hold the first prompts only. A rerun that fails part-way leaves the earlier images and manifest as they
    were, and no staging folder behind."""
    import numpy as np
    from PIL import Image

    import ipgo.generate

    run_dir, _ = run
    killed = tmp_path / "whole" / ipgo.generate.STAGING / "raw"  # a generate killed there left its partial renders
    killed.mkdir(parents=True)
    (killed / "0000_seed1000.png").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="partial renders of an ipgo.generate that did not finish"):
        whole = generate(str(run_dir), seeds="1000,1001", out=str(tmp_path / "whole"))  # the folder counts as empty
    monkeypatch.setattr("ipgo.generate.GRID_PROMPTS", 1)
    chunked = generate(str(run_dir), seeds="1000,1001", out=str(tmp_path / "chunked"))
    assert chunked.prompts == whole.prompts and len(whole.prompts) == 2
    assert chunked.raw.shape[0] == 1 and torch.equal(chunked.tuned, whole.tuned[:1])
    manifests = [json.loads((tmp_path / run / "images.json").read_text()) for run in ("whole", "chunked")]
    assert manifests[0]["images"] == manifests[1]["images"] and len(manifests[0]["images"]) == 8
    for entry in manifests[0]["images"]:
        pngs = [np.asarray(Image.open(tmp_path / run / entry["file"])) for run in ("whole", "chunked")]
        assert (pngs[0] == pngs[1]).all(), entry
    grids = [np.asarray(Image.open(tmp_path / run / "grid.png")) for run in ("whole", "chunked")]
    assert grids[1].shape[0] < grids[0].shape[0] and (grids[0][: grids[1].shape[0]] == grids[1]).all()
    assert not any((tmp_path / run / ipgo.generate.STAGING).exists() for run in ("whole", "chunked"))

    before = {path: path.read_bytes() for path in (tmp_path / "chunked").rglob("*") if path.is_file()}
    render = ipgo.generate.render
    calls = []

    def failing(*args, **kwargs):  # the second prompt's renders fail (out of memory, say)
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("CUDA out of memory")
        return render(*args, **kwargs)

    monkeypatch.setattr("ipgo.generate.render", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(str(run_dir), seeds="1002,1003", out=str(tmp_path / "chunked"), overwrite=True)
    after = {path: path.read_bytes() for path in (tmp_path / "chunked").rglob("*") if path.is_file()}
    assert after == before


def test_the_readme_snippet_renders_as_training_did(run):
    """The tokens' base model with its training scheduler and dtype, called with the training settings: the image the
    run renders (a pipeline's own defaults, 50 steps at 512 px, would give another)."""
    import ipgo
    from ipgo.generate import call_settings, load_pipeline

    run_dir, module = run
    tokens = ipgo.load_tokens(run_dir / "tokens.safetensors")
    pipe = ipgo.apply_tokens(load_pipeline(tokens), tokens)
    image = pipe(tokens.prompts[0], generator=torch.Generator().manual_seed(1000), output_type="pt",
                 **call_settings(tokens)).images
    prefix, suffix = tokens.tokens_for(tokens.prompts[:1])
    assert torch.allclose(module.render(tokens.prompts[:1], [1000], prefix, suffix), image.float(), atol=1e-5)


def test_call_settings_carry_sd3s_t5_length():
    """SD 3 tokens were trained at a T5 length: raw and tuned renders encode at it, not at the pipeline's 256."""
    from ipgo.export import TokenFile
    from ipgo.generate import call_settings

    sampler = json.dumps({"scheduler": "flow_euler", "num_steps": 4, "grad_steps": 1, "guidance_scale": 3.0,
                          "height": 32, "width": 48})
    tokens = TokenFile(torch.zeros(1, 64), torch.zeros(1, 64), family="sd3", base_model="tiny:sd3", hidden_size=64,
                       extra={"sampler": sampler, "max_sequence_length": "128"})
    assert call_settings(tokens) == {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 32, "width": 48,
                                     "max_sequence_length": 128}
    del tokens.extra["max_sequence_length"]  # other families
    assert "max_sequence_length" not in call_settings(tokens)


def test_evaluate_report_win_rates_and_best_of_n(run, tmp_path, capsys, monkeypatch):
    run_dir, module = run
    metrics = evaluate([f"ipgo={run_dir}"], REWARDS, seeds="1000-1002", out=str(tmp_path), bootstrap=200)
    # 6 raw + 6 tuned + 6 starting tokens + 6 more candidates of best-of-2 (the seed's own image is the raw one)
    assert "24/24" in capsys.readouterr().err
    # renders are scored a few prompts at a time and only the first prompts' are kept for the grids: the same
    # scores, and grids that are the top rows of the full ones
    monkeypatch.setattr("ipgo.evaluate.GRID_PROMPTS", 1)
    chunked = evaluate([f"ipgo={run_dir}"], REWARDS, seeds="1000-1002", out=str(tmp_path / "chunked"), bootstrap=200)
    def without_scores(records):
        return [{key: value for key, value in record.items() if key != "scores"} for record in records]

    assert without_scores(chunked["images"]) == without_scores(metrics["images"])  # the same best-of-N picks
    torch.testing.assert_close(torch.tensor([list(i["scores"].values()) for i in chunked["images"]]),
                               torch.tensor([list(i["scores"].values()) for i in metrics["images"]]))
    for name in ("ipgo", "ipgo_start", "best_of_2"):
        full, top = (np.asarray(Image.open(folder / f"grid_{name}.png")) for folder in (tmp_path, tmp_path / "chunked"))
        assert len(top) < len(full) and (full[: len(top)] == top).all()
    for name in ("report.md", "metrics.json", "grid_ipgo.png"):
        assert (tmp_path / name).is_file()
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    # the compute-matching rule: N = sampler calls per prompt of the run = 2 steps x 1 training seed
    n = metrics["settings"]["best_of_n"]
    assert n == 2 and f"best_of_{n}" in metrics["methods"]
    assert metrics["settings"]["best_of_n_matches_compute"]
    report = (tmp_path / "report.md").read_text()
    assert "(N = the optimisation's sampler calls per prompt, spent at every seed)" in report
    assert "a tie counts as no win" in report and "holds the first 2 prompts, a row each: the raw prompt's" in report
    assert metrics["settings"]["reward_weights"] == {"clip_score": "tiny:clip", "aesthetic": "tiny:aesthetic-head on "
                                                     "tiny:clip"}
    assert "## aesthetic\n\nWeights: `tiny:aesthetic-head on tiny:clip`\n" in report
    # ipgo_start: the run's tokens as a fresh run initialises them, rendered through the pipeline like the others
    from ipgo.tokens import TokenSets

    start = metrics["methods"]["ipgo_start"]
    assert start["kind"] == "start" and start["tokens"].endswith("as initialised") and "wins" in start["rewards"][
        "clip_score"]
    prompts = metrics["settings"]["prompts"]
    with torch.no_grad():
        initial = TokenSets(module.token_config, 32, len(prompts))(range(len(prompts)))
    expected = module.score(prompts, [1000, 1001, 1002], *initial)
    got = torch.tensor([[i["scores"]["clip_score"] for i in metrics["images"] if i["method"] == "ipgo_start"
                         and i["prompt"] == p] for p in prompts])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert "before the first step: what adding tokens at all does" in report
    by_hand = evaluate(f"ipgo={run_dir}", REWARDS[:1], seeds="1000", out=str(tmp_path / "by_hand"), best_of_n=3)
    # a run that spent fewer than 2 sampler calls per prompt: best-of-N at matched compute would be the raw prompt
    from ipgo.export import load_tokens, save_tokens

    cheap = load_tokens(run_dir)
    cheap.extra["compute"] = json.dumps({**json.loads(cheap.extra["compute"]), "sampler_calls_per_prompt": 0.8})
    save_tokens(tmp_path / "cheap.safetensors", cheap)
    with pytest.warns(UserWarning, match="best-of-N at matched compute is the raw prompt itself: left out"):
        without = evaluate(f"ipgo={tmp_path / 'cheap.safetensors'}", REWARDS[:1], seeds="1000",
                           out=str(tmp_path / "cheap"), starting_tokens=False)
    assert list(without["methods"]) == ["raw", "ipgo"] and without["settings"]["best_of_n"] == 0
    assert not by_hand["settings"]["best_of_n_matches_compute"]
    assert "(N given by hand: not matched" in (tmp_path / "by_hand/report.md").read_text()
    # win rates equal a hand count from the per-image scores in the same file
    images = metrics["images"]
    for method in ("ipgo", f"best_of_{n}"):
        for reward in ("clip_score", "aesthetic"):
            raw = {(i["prompt"], i["seed"]): i["scores"][reward] for i in images if i["method"] == "raw"}
            pairs = [(i["scores"][reward], raw[(i["prompt"], i["seed"])]) for i in images if i["method"] == method]
            wins = sum(m - r > 1e-6 for m, r in pairs)
            stats = metrics["methods"][method]["rewards"][reward]
            assert len(pairs) == 6 and stats["wins"] == wins and stats["win_rate"] == pytest.approx(wins / 6)
            assert stats["win_rate_ci"][0] <= stats["win_rate"] <= stats["win_rate_ci"][1]
    # best-of-N is paired with the raw prompt (its own seed is a candidate), so it never loses on its selector
    assert metrics["methods"][f"best_of_{n}"]["rewards"]["clip_score"]["losses"] == 0
    # best-of-N kept the candidate with the highest selection-reward score among its N
    record = next(i for i in images if i["method"] == f"best_of_{n}")
    candidates = candidate_seeds(record["seed"], n)
    assert candidates[0] == record["seed"] and len(set(candidates)) == n
    assert record["candidate_seed"] in candidates
    scores = module.score([record["prompt"]], candidates)[0]  # the run's reward is clip_score on tiny:clip
    assert record["candidate_seed"] == candidates[int(scores.argmax())]
    assert record["scores"]["clip_score"] == pytest.approx(float(scores.max()), abs=1e-5)
    # a pick of the seed's own image is the raw method's very image and scores: an exact tie, on any device
    raw = {(i["prompt"], i["seed"]): i["scores"] for i in images if i["method"] == "raw"}
    own = [i for i in images if i["method"] == f"best_of_{n}" and i["candidate_seed"] == i["seed"]]
    assert own and all(i["scores"] == raw[(i["prompt"], i["seed"])] for i in own)
    assert metrics["methods"]["ipgo"]["compute"]["fit_seconds"] > 0


def test_pipelines_load_in_the_dtype_the_tokens_were_trained_in(run):
    from ipgo.export import load_tokens
    from ipgo.generate import load_pipeline

    run_dir, _ = run
    tokens = load_tokens(run_dir)
    assert tokens.extra["dtype"] == "float32"
    tokens.extra["dtype"] = "bfloat16"  # as a bfloat16 run records it
    assert load_pipeline(tokens).unet.dtype == torch.bfloat16
    assert load_pipeline(tokens, dtype="float32").unet.dtype == torch.float32  # an explicit --dtype wins
    tokens.extra["dtype"] = "float16"
    with pytest.warns(UserWarning, match="trained in float16.*rendering in float32"):
        assert load_pipeline(tokens, device="cpu").unet.dtype == torch.float32


def test_win_rate_intervals_resample_prompts():
    from ipgo.evaluate import summary_statistics, wilson_interval, win_statistics

    raw = torch.zeros(4, 8)
    every = win_statistics(torch.ones(4, 8), raw, 1e-6, 200)
    assert every["win_rate"] == 1 and every["win_rate_ci"] == [pytest.approx(wilson_interval(1.0, 4)[0]), 1.0]
    assert every["win_rate_ci"][0] < 0.6  # four prompts: far from certain, though all 32 pairs won
    one_lost = torch.ones(4, 8)
    one_lost[0, 0] = -1
    assert win_statistics(one_lost, raw, 1e-6, 200)["win_rate_ci"][0] <= every["win_rate_ci"][0]  # never narrower
    raw = torch.zeros(4, 3)
    # two prompts win on every seed, two lose on every seed: prompts, not pairs, are the unit
    split = torch.tensor([[1.0] * 3, [1.0] * 3, [-1.0] * 3, [-1.0] * 3])
    stats = win_statistics(split, raw, 1e-6, 2000)
    assert stats["win_rate"] == 0.5 and stats["win_rate_ci"][0] < 0.15 and stats["win_rate_ci"][1] > 0.85
    assert summary_statistics(split)["stderr"] == pytest.approx(float(torch.tensor([1.0, 1, -1, -1]).std()) / 2)
    assert summary_statistics(split[:1])["stderr"] is None


def test_training_seeds_are_refused_or_flagged(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(SeedError, match=r"seeds \[0\] were used to optimise"):
        generate(str(run_dir), seeds="0-1", out=str(tmp_path))
    metrics = evaluate([f"ipgo={run_dir}"], REWARDS[:1], seeds="0,1000", out=str(tmp_path), best_of_n="off",
                       allow_training_seeds=True, bootstrap=50)
    assert metrics["methods"]["ipgo"]["flags"] == ["seeds [0] were used in optimisation"]
    assert "flagged" in (tmp_path / "report.md").read_text()


def test_bad_input_gives_clear_messages(run, tmp_path, capsys):
    from ipgo.export import load_tokens, save_tokens

    run_dir, _ = run
    (tmp_path / "empty").mkdir()
    moved = load_tokens(run_dir)
    moved.base_model = str(tmp_path / "moved-model")
    save_tokens(tmp_path / "moved.safetensors", moved)
    cases = [
        (generate_cli, ["--tokens", str(tmp_path / "moved.safetensors"), "--seeds", "1000"],
         "the tokens' base model, as the token file names it: model folder"),
        (generate_cli, ["--tokens", str(run_dir), "--seeds", "1000", "--column", "caption"],
         "--column caption names a column of a prompt file: give the file with --prompts FILE"),
        (evaluate_cli, ["--methods", f"[ipgo={run_dir}]", "--rewards", "[{name: clip_score}]", "--column", "caption"],
         "--column caption names a column of a prompt file"),
        (generate_cli, ["--tokens", str(run_dir), "--model", "tiny:sdxl", "--seeds", "1000"],
         "made for a 'sd' model"),
        (generate_cli, ["--tokens", str(tmp_path / "empty")], "tokens.safetensors"),
        (generate_cli, ["--tokens", str(run_dir), "--seeds", "7-x"], "cannot read the seeds '7-x'"),
        (generate_cli, ["--tokens", str(run_dir), "--seeds", "7-3"], "the seed range 7-3 runs backwards: write 3-7"),
        (generate_cli, ["--tokens", str(run_dir), "--seeds", str(2**64)], "give seeds below 2**32"),
        (generate_cli, ["--tokens", str(run_dir), "--seeds", "1000", "--batch_size", "0"],
         "batch_size=0: give the number of images per pipeline call"),
        (evaluate_cli, ["--methods", f"[ipgo={run_dir}]", "--rewards", "[{name: clip_score}]", "--device", "cdua"],
         "--device 'cdua' is not a torch device"),
        *([] if torch.cuda.is_available() else
          [(generate_cli, ["--tokens", str(run_dir), "--device", "cuda"], "has no cuda device available")]),
        (evaluate_cli, ["--methods", f"[ipgo={run_dir}]", "--rewards", "[{name: clipscore}]"],
         "unknown reward 'clipscore'"),
        (evaluate_cli, ["--methods", f"[{run_dir}]", "--rewards", "[{name: clip_score}]"], "write NAME=PATH"),
    ]
    for cli, args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli([*args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, (args, err[-1500:])
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]
    with pytest.raises(SeedError, match="repeat"):
        parse_seeds("1,1")


def test_generate_checks_the_tokens_against_the_model_before_rendering(run, tmp_path, monkeypatch):
    from ipgo.export import TokenFileError

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline loaded before the tokens and prompts were checked")

    monkeypatch.setattr("ipgo.generate.load_pipeline", no_loading)
    run_dir, _ = run
    with pytest.raises(TokenFileError, match="hidden size 32 .* the denoiser of 'tiny:sd2' attends to states 64 wide"):
        generate(str(run_dir), seeds="1000", out=str(tmp_path / "out"), model="tiny:sd2")


def test_evaluate_checks_its_input_before_loading_and_refuses_nan_scores(run, tmp_path, monkeypatch):
    from ipgo.errors import NonFiniteRewardError, UserError
    from ipgo.evaluate import score
    from ipgo.export import load_tokens, save_tokens
    from ipgo.rewards.combine import CombinedReward, build_reward

    run_dir, _ = run
    tokens = load_tokens(run_dir)
    sampler = json.loads(tokens.extra["sampler"])
    tokens.extra["sampler"] = json.dumps({**sampler, "guidance_scale": sampler["guidance_scale"] + 1})
    other = save_tokens(tmp_path / "other.safetensors", tokens)
    tokens.extra.update(sampler=json.dumps(sampler), rewards=json.dumps(["clip_score", "aesthetic"]))
    combined = save_tokens(tmp_path / "combined.safetensors", tokens)
    tokens.extra.update(rewards=json.dumps(["clip_score"]), revision="v2")  # the same model id at another revision
    revised = save_tokens(tmp_path / "revised.safetensors", tokens)
    tokens.extra.pop("revision")
    tokens.extra["max_sequence_length"] = "128"  # an SD 3 T5 length (a setting the raw prompt renders with too)
    longer = save_tokens(tmp_path / "longer.safetensors", tokens)
    tokens.extra.pop("max_sequence_length")
    tokens.extra["dtype"] = "bfloat16"
    bf16 = save_tokens(tmp_path / "bf16.safetensors", tokens)

    def no_loading(self):
        raise AssertionError("a reward loaded before the input was checked")

    monkeypatch.setattr(CombinedReward, "_load", no_loading)
    twice = tmp_path / "twice.txt"
    twice.write_text("a red circle\na blue square\na red circle\n")
    cases = [
        (dict(methods=[f"ipgo={run_dir}"], prompts=str(twice)), "line 3 .* repeats line 1"),
        (dict(methods=[f"ipgo={run_dir}", f"other={other}"]), "different sampler settings"),
        (dict(methods=[f"ipgo={run_dir}", f"other={revised}"]), "made for different models"),
        (dict(methods=[f"ipgo={run_dir}"], bootstrap=0), "at least 1 resample"),
        (dict(methods=[f"ipgo={run_dir}"], tie_tolerance=-0.1), "tie_tolerance=-0.1: give a finite score difference"),
        (dict(methods=[f"ipgo={run_dir}", f"other={longer}"]), "different sampler settings .*max_sequence_length"),
        (dict(methods=[f"ipgo={run_dir}"], best_of_n="many"), "best_of_n='many'"),
        (dict(methods=[f"ipgo={run_dir}"], dtype="fp16"), "unknown dtype 'fp16'"),
        (dict(methods=[f"../x={run_dir}"]), "method name '../x' names its grid file"),
        (dict(methods=[f"ipgo={run_dir}", f"other={bf16}"]), "different dtypes \\(ipgo: float32, other: bfloat16\\)"),
        (dict(methods=[f"ipgo={run_dir}"], best_of_n=1), "best_of_n=1 would pick the raw prompt's own image"),
        (dict(methods=[f"ipgo={combined}"]), "combination of rewards .* set --selection_reward"),
        (dict(methods=[f"ipgo={run_dir}"], selection_reward="aesthetic"), "not among the rewards scored"),
        (dict(methods=[f"ipgo={run_dir}"], model=str(tmp_path / "missing")), "model folder .*missing.* does not exist"),
        (dict(methods=[f"ipgo={run_dir}"], model="tiny:sdxl"), "made for a 'sd' model .* is a StableDiffusionXL"),
        (dict(methods=[f"ipgo={run_dir}"], model="tiny:sd2"), "hidden size 32 .* attends to states 64 wide"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate(rewards=REWARDS[:1], seeds="1000", out=str(tmp_path / "out"), **kwargs)
    with pytest.raises(UserError, match="shapes_oracle judges shapes-world captions only"):
        evaluate([f"ipgo={run_dir}"], [RewardSpec("shapes_oracle")], seeds="1000", out=str(tmp_path / "out"))
    monkeypatch.undo()

    reward = build_reward(REWARDS[:1])
    reward.load()
    images = torch.rand(3, 2, 3, 32, 32)
    whole, chunked = score(reward, images, ["a", "b", "c"]), score(reward, images, ["a", "b", "c"], batch_size=4)
    torch.testing.assert_close(chunked["clip_score"], whole["clip_score"])  # scored a few images at a time
    images = torch.rand(2, 1, 3, 32, 32)
    images[1, 0, :, 0, 0] = float("nan")
    with pytest.raises(NonFiniteRewardError, match="'clip_score' is NaN or infinite for prompt 'b'"):
        score(reward, images, ["a", "b"])


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_generate_works_for_every_family(family, ipgo_cache, tmp_path, monkeypatch):
    from dataclasses import asdict

    from ipgo.export import TokenFile, save_tokens
    from ipgo.sampling import SamplerConfig

    monkeypatch.setenv("IPGO_CACHE", str(ipgo_cache))
    if family == "sdxl":  # with invisible-watermark installed, an SDXL pipeline would alter the images scored

        class Watermarker:
            def __init__(self):
                raise AssertionError("the images would be watermarked")

        pipeline_module = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
        monkeypatch.setattr(f"{pipeline_module}.is_invisible_watermark_available", lambda: True)
        monkeypatch.setattr(f"{pipeline_module}.StableDiffusionXLWatermarker", Watermarker, raising=False)
    sampler = SamplerConfig(scheduler="flow_euler" if family == "sd3" else "euler", num_steps=2, grad_steps=1,
                            guidance_scale=3.0, height=32, width=32)
    tokens = TokenFile(torch.randn(2, 64) * 3, torch.randn(1, 64) * 3, family=family, base_model=f"tiny:{family}",
                       hidden_size=64, extra={"sampler": json.dumps(asdict(sampler)), "seeds": '{"train": [0]}'})
    path = save_tokens(tmp_path / "tokens.safetensors", tokens)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    renders = generate(str(path), seeds="5,6", prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "out"))
    assert renders.tuned.shape == (1, 2, 3, 32, 32) and not torch.allclose(renders.raw, renders.tuned)


def test_fit_logs_image_grids_to_tensorboard(tiny_sd_dir, tiny_clip_dir, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ipgo.backbones import StableDiffusion
    from ipgo.data import PromptDataModule
    from ipgo.module import IPGOModule, SeedConfig
    from ipgo.rewards import ClipScore
    from ipgo.sampling import SamplerConfig

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    module = IPGOModule(StableDiffusion(str(tiny_sd_dir)), ClipScore(str(tiny_clip_dir)),
                        sampler=SamplerConfig(num_steps=2, grad_steps=1, height=32, width=32),
                        seeds=SeedConfig(eval=[7, 8]), image_every_n_epochs=1, report_prompts=0)
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    L.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(
        module, datamodule=PromptDataModule(str(tmp_path / "p.txt")))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "images/held_out_seeds" in events.Tags()["images"] and "train/reward" in events.Tags()["scalars"]


def test_before_after_grid_puts_a_white_gap_between_the_halves(tmp_path):
    import numpy as np
    from PIL import Image

    from ipgo.report import save_before_after

    before, after = torch.zeros(2, 3, 3, 4, 4), torch.zeros(2, 3, 3, 4, 4)  # 2 prompts x 3 seeds, black
    after[1, 2] = 0.5  # the last image: second prompt, third seed
    grid = torch.from_numpy(np.asarray(Image.open(save_before_after(before, after, tmp_path / "g.png"))))
    half = 2 + 3 * (4 + 2)  # make_grid: 2 px padding before and after every image
    assert grid.shape == (2 + 2 * 6, 2 * half + 8, 3)
    assert (grid[:, half : half + 8] == 255).all()  # the gap
    assert grid[2, 2].tolist() == [0, 0, 0] and grid[8, half + 8 + 14].tolist() == [128, 128, 128]


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    from ipgo.files import check_output_folder

    (tmp_path / "out").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "out", True, "ipgo.generate")
    assert (tmp_path / "out").read_text() == "mine"
    with pytest.raises(UserError, match=r"ipgo.evaluate cannot write there \(.*out is a file\)"):  # before any render
        check_output_folder(tmp_path / "out" / "evaluation", False, "ipgo.evaluate")
    check_output_folder(tmp_path / "new" / "evaluation", False, "ipgo.evaluate")  # folders to be made are fine


def test_prompts_too_long_for_the_tokens_are_refused_before_loading(run, tmp_path, monkeypatch):
    from dataclasses import replace

    from ipgo.export import load_tokens, save_tokens

    run_dir, _ = run
    tokens = load_tokens(run_dir)
    shared = save_tokens(tmp_path / "shared.safetensors", replace(
        tokens, prefix=tokens.prefix[0], suffix=tokens.suffix[0], prompts=None, mode="prompt-batch",
        train_prompts=["a cat"], too_long="error"))
    long = tmp_path / "long.txt"
    long.write_text("a dog " + "very " * 70 + "\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the prompts were checked")

    monkeypatch.setattr("ipgo.generate.load_pipeline", no_loading)
    monkeypatch.setattr("ipgo.evaluate.load_pipeline", no_loading)
    monkeypatch.setattr("ipgo.rewards.combine.CombinedReward._load", no_loading)
    with pytest.raises(UserError, match="has 74 tokens but only"):
        generate(str(shared), seeds="1000", prompts=str(long), out=str(tmp_path / "g"))
    with pytest.raises(UserError, match="has 74 tokens but only"):
        evaluate([f"ipgo={shared}"], REWARDS[:1], seeds="1000", prompts=str(long), out=str(tmp_path / "e"),
                 best_of_n="off")
    trained = tmp_path / "trained.txt"
    trained.write_text("A  cat\n")  # the training prompt "a cat", as CLIP sees it
    with pytest.raises(UserError, match="1 evaluation prompts .* were in the training split of 'ipgo'"):
        evaluate([f"ipgo={shared}"], REWARDS[:1], seeds="1000", prompts=str(trained), out=str(tmp_path / "e"))
    (tmp_path / "dog.txt").write_text("a dog\n")
    with pytest.raises(UserError, match="no tokens for 'a dog'"):  # a prompt-wise file holds its own prompts only
        generate(str(run_dir), seeds="1000", prompts=str(tmp_path / "dog.txt"), out=str(tmp_path / "g"))


def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_evaluate_overwrite_replaces_the_earlier_grids(run, tmp_path, monkeypatch):
    run_dir, _ = run
    (tmp_path / "grid_gone.png").write_bytes(b"an earlier evaluation's method")
    (tmp_path / "metrics.json").write_text(json.dumps({"methods": {"raw": {}, "gone": {}}}))
    (tmp_path / "grid_mine.png").write_bytes(b"a user's file, which no evaluation wrote")
    evaluate([f"ipgo={run_dir}"], REWARDS[:1], seeds="1000", out=str(tmp_path), best_of_n="off", overwrite=True,
             starting_tokens=False)
    assert sorted(p.name for p in tmp_path.glob("grid_*.png")) == ["grid_ipgo.png", "grid_mine.png"]
    # a rerun that fails while writing its grids leaves no report of the earlier one beside them, and the run after
    # it still removes the grids the failed one wrote
    monkeypatch.setattr("ipgo.evaluate.save_before_after", full_disk)
    with pytest.raises(OSError, match="No space left"):
        evaluate([f"ipgo={run_dir}"], REWARDS[:1], seeds="1001", out=str(tmp_path), best_of_n=2, overwrite=True,
                 starting_tokens=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"writing": True,
                                                                   "methods": {"ipgo": {}, "best_of_2": {}}}
    assert not (tmp_path / "report.md").exists()
    monkeypatch.undo()
    (tmp_path / "grid_best_of_2.png").write_bytes(b"written before the disk filled")
    evaluate([f"ipgo={run_dir}"], REWARDS[:1], seeds="1000", out=str(tmp_path), best_of_n="off", overwrite=True,
             starting_tokens=False)
    assert sorted(p.name for p in tmp_path.glob("grid_*.png")) == ["grid_ipgo.png", "grid_mine.png"]


def test_best_of_n_selects_with_the_reward_the_run_optimised(run, tmp_path):
    """The token file records the optimised reward's weights: a held-out judge of the same kind (clip_score on
    another CLIP) is never taken for it, whatever the order of --rewards."""
    from ipgo.errors import UserError
    from ipgo.evaluate import _selector
    from ipgo.export import load_tokens
    from ipgo.rewards.combine import build_reward

    run_dir, _ = run
    tokens = load_tokens(run_dir)
    assert json.loads(tokens.extra["reward_weights"]) == {"clip_score": "tiny:clip"}
    judge, optimised = RewardSpec("clip_score", args={"model": "tiny:shapes-clip"}), REWARDS[0]
    assert _selector(None, tokens, build_reward([judge, optimised])) == "clip_score_2"
    assert _selector(None, tokens, build_reward([optimised, judge])) == "clip_score"
    assert _selector("clip_score", tokens, build_reward([judge, optimised])) == "clip_score"  # by hand: as given
    with pytest.raises(UserError, match="clip_score with weights tiny:clip, but --rewards scores clip_score with "
                                        "other weights \\(clip_score: tiny:shapes-clip\\)"):
        _selector(None, tokens, build_reward([judge]))
    tokens.extra.pop("reward_weights")  # a file of an earlier version: the name alone
    assert _selector(None, tokens, build_reward([judge])) == "clip_score"
    with pytest.raises(UserError, match="scores clip_score more than once \\(clip_score, clip_score_2\\)"):
        _selector(None, tokens, build_reward([judge, optimised]))
