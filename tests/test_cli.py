"""The prefalign command: every recipe parses, a short fit runs end to end, predict writes playable mp4s."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from prefalign.cli import main

ROOT = Path(__file__).parents[1]
#: Whole recipes (not the fragments: cluster/ and overlays/ overlays, algorithms/ and backbones/ values).
FRAGMENTS = ("cluster", "algorithms", "backbones", "overlays")
RECIPES = sorted(r for r in ROOT.joinpath("recipes").rglob("*.yaml") if r.parent.name not in FRAGMENTS)
REAL_SCALE = sorted(ROOT.joinpath("recipes").glob("*.yaml"))
ALGORITHM_FILES = sorted(ROOT.joinpath("recipes", "algorithms").glob("*.yaml"))
OVERLAYS = sorted(ROOT.joinpath("recipes", "cluster").glob("*.yaml"))
DEMO = ROOT / "recipes" / "demo" / "sft.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(ROOT / "recipes")) for r in RECIPES])
def test_every_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["denoiser"]["class_path"].startswith("prefalign.denoisers.")
    assert printed["model"]["process"]["class_path"].startswith("prefalign.processes.")


@pytest.mark.parametrize("algorithm", ALGORITHM_FILES, ids=[a.stem for a in ALGORITHM_FILES])
@pytest.mark.parametrize("recipe", REAL_SCALE, ids=[r.stem for r in REAL_SCALE])
def test_one_value_swaps_the_algorithm_with_its_settings(recipe, algorithm, capsys):
    """``--model.algorithm recipes/algorithms/X.yaml`` gives exactly X's settings, nothing of the recipe's own."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), "--model.algorithm", str(algorithm), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["algorithm"]
    wanted = yaml.safe_load(algorithm.read_text())
    assert contains(printed, wanted), (printed, wanted)


@pytest.mark.parametrize("recipe", REAL_SCALE, ids=[r.stem for r in REAL_SCALE])
def test_the_hallo4_overlay_swaps_the_denoiser_and_keeps_the_algorithm(recipe, capsys):
    """``--config recipes/overlays/hallo4.yaml`` makes any real-scale recipe start from the released Hallo4: its
    denoiser (nothing of the recipe's own denoiser's options carried over) and sampler; the algorithm stays."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), "--config", str(ROOT / "recipes" / "overlays" / "hallo4.yaml"),
              "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    own = yaml.safe_load(recipe.read_text())["model"]["algorithm"]
    denoiser = printed["denoiser"]
    assert denoiser["class_path"] == "prefalign.denoisers.Hallo4Denoiser"
    wanted = yaml.safe_load((ROOT / "recipes" / "backbones" / "hallo4.yaml").read_text())
    assert contains(denoiser, wanted), (denoiser, wanted)
    assert "audio_heads" not in denoiser["init_args"] and "pooled_audio_token" not in denoiser["init_args"]
    assert printed["sampling"]["num_steps"] == 25 and printed["sampling"]["guidance_scale"] == 6.0
    assert printed["process"]["init_args"]["shift"] == 8.0
    algorithm = yaml.safe_load((ROOT / "recipes" / own).read_text())
    assert contains(printed["algorithm"], algorithm)


def contains(printed, wanted) -> bool:
    """Whether every value ``wanted`` sets is in ``printed`` (which adds the classes' defaults)."""
    if isinstance(wanted, dict):
        return isinstance(printed, dict) and all(k in printed and contains(printed[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(printed, list) and len(printed) == len(wanted) and all(map(contains, printed, wanted))
    return printed == wanted


def test_help_explains_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for key, words in {
        "--model.algorithm": "YAML key swaps it",
        "--model.sampling.num_steps": "Sampler steps",
        "--data.on_bad_sample": "counts it",
        "--model.val_sample_batches": "validation batches",
    }.items():
        assert key in text
        assert words in " ".join(text.split())


def test_extra_subcommands_are_dispatched(tmp_path, capsys):
    main(["synth", "--out", str(tmp_path / "ts"), "--num_clips", "2", "--seed", "5"])
    manifest = tmp_path / "ts" / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        main([])
    assert "synth" in capsys.readouterr().out


def test_fit_then_predict_end_to_end(talkingshapes, tmp_path, monkeypatch):
    """A 4-step fit of the demo recipe from main([...]), then predict writes one mp4 per condition."""
    monkeypatch.chdir(tmp_path)  # the recipe's runs/ and outputs/ folders land here
    overrides = [
        "--data.train", str(talkingshapes), "--data.val", str(talkingshapes),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
        "--model.sampling.num_steps", "2",
    ]
    main(["fit", "--config", str(DEMO), *overrides])
    metrics = (tmp_path / "runs/demo-sft/csv/version_0/metrics.csv").read_text()
    assert "train/loss" in metrics and "val/sync" in metrics and "val/jitter" in metrics
    checkpoint = tmp_path / "runs/demo-sft/csv/version_0/checkpoints/last.ckpt"
    assert checkpoint.exists()

    # Conditions without video: a reference image and speech, as a user would give them.
    rows = [json.loads(line) for line in talkingshapes.read_text().splitlines()[:2]]
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text("".join(
        json.dumps({"id": r["id"], "audio": str(talkingshapes.parent / r["audio"]),
                    "reference": str(talkingshapes.parent / r["reference"])}) + "\n" for r in rows))
    main(["predict", "--config", str(DEMO), "--ckpt_path", str(checkpoint), "--data.predict", str(conditions),
          "--data.num_frames", "17", "--model.sampling.num_steps", "2"])
    for row in rows:
        with av.open(str(tmp_path / "outputs/demo-sft" / f"{row['id']}.mp4")) as container:
            frames = list(container.decode(video=0))
            assert len(frames) == 17 and (frames[0].width, frames[0].height) == (32, 32)
            audio = container.streams.audio[0]
            duration = float(audio.duration * audio.time_base)
        assert abs(duration - 17 / 25) < 0.05  # AAC frames are 1024 samples: within one of them

    # prefalign test: the metrics table, the sample grid and the videos of the held-out clips.
    main(["test", "--config", str(DEMO), "--ckpt_path", str(checkpoint), "--data.test", str(talkingshapes),
          "--model.sampling.num_steps", "2", "--model.evaluation_dir", str(tmp_path / "evaluation")])
    table = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert len(table["clips"]) == 12 and len({clip["id"] for clip in table["clips"]}) == 12
    for name in ("sync", "jitter", "identity", "texture", "ssim", "psnr", "sync_ground_truth"):
        values = [clip[name] for clip in table["clips"]]
        assert table["metrics"][name]["count"] == 12
        assert abs(table["metrics"][name]["mean"] - np.mean(values)) < 1e-9
    assert 0 < table["metrics"]["ssim"]["mean"] < 1
    csv_rows = (tmp_path / "evaluation" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("id,") and len(csv_rows) == 13
    assert (tmp_path / "evaluation" / "samples.png").stat().st_size > 0
    assert len(list((tmp_path / "evaluation" / "videos").glob("*.mp4"))) == 12
    assert (tmp_path / "runs/demo-sft/csv/version_0/curves.png").exists()  # TrainingCurves, added by the CLI

    # Speech 3× longer than the training window: predict makes it in chunks, one video for the whole audio.
    from prefalign.data import media

    speech = np.concatenate([media.read_audio(talkingshapes.parent / r["audio"], 16000) for r in rows * 2])[: 51 * 640]
    media.write_wav(tmp_path / "long.wav", speech, 16000)
    conditions.write_text(json.dumps({"id": "long", "audio": str(tmp_path / "long.wav"),
                                      "reference": str(talkingshapes.parent / rows[0]["reference"])}) + "\n")
    main(["predict", "--config", str(DEMO), "--ckpt_path", str(checkpoint), "--data.predict", str(conditions),
          "--data.num_frames", "null", "--model.sampling.num_steps", "2", "--model.sampling.chunk_frames", "17"])
    with av.open(str(tmp_path / "outputs/demo-sft/long.mp4")) as container:
        assert len(list(container.decode(video=0))) == 51


def conditions_manifest(talkingshapes, path, count=2, keys=("audio", "reference")):
    """A predict manifest of the first ``count`` clips' conditions (no video), as a user would give them."""
    rows = [json.loads(line) for line in talkingshapes.read_text().splitlines()[:count]]
    path.write_text("".join(
        json.dumps({"id": r["id"], **{key: str(talkingshapes.parent / r[key]) for key in keys}}) + "\n" for r in rows))
    return path, [r["id"] for r in rows]


def recipe_without_writer(tmp_path):
    """The demo recipe with its VideoWriter taken out: a recipe that names no prediction writer."""
    config = yaml.safe_load(DEMO.read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "VideoWriter" not in c["class_path"]]
    path = tmp_path / "no_writer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_predict_without_a_writer_writes_to_the_run_folder(talkingshapes, tmp_path, monkeypatch, capsys):
    """A recipe with no prediction writer still gets its videos: one mp4 per row under default_root_dir/predictions."""
    monkeypatch.chdir(tmp_path)  # the recipe's loggers write to runs/
    conditions, ids = conditions_manifest(talkingshapes, tmp_path / "conditions.jsonl")
    root = tmp_path / "run"
    main(["predict", "--config", str(recipe_without_writer(tmp_path)), "--trainer.default_root_dir", str(root),
          "--data.predict", str(conditions), "--data.num_frames", "17", "--model.sampling.num_steps", "2",
          "--trainer.limit_predict_batches", "1"])
    for clip_id in ids:
        with av.open(str(root / "predictions" / f"{clip_id}.mp4")) as container:
            assert len(list(container.decode(video=0))) == 17
    assert f"wrote 2 predicted videos to {root / 'predictions'}" in capsys.readouterr().out


def test_only_predict_gets_the_default_writer(tmp_path, monkeypatch):
    """fit, validate and test build their trainer without a VideoWriter; predict with one, unless a recipe names its
    own (the demo's, to outputs/demo-sft)."""
    from prefalign.callbacks import VideoWriter
    from prefalign.cli import PrefalignCLI

    monkeypatch.chdir(tmp_path)
    writers = {}
    monkeypatch.setattr(PrefalignCLI, "_run_subcommand", lambda cli, subcommand: writers.setdefault(
        subcommand, [c.output_dir for c in cli.trainer.callbacks if isinstance(c, VideoWriter)]))
    root, recipe = tmp_path / "run", recipe_without_writer(tmp_path)
    for subcommand in ("fit", "validate", "test", "predict"):
        main([subcommand, "--config", str(recipe), "--trainer.default_root_dir", str(root)])
    assert writers == {"fit": [], "validate": [], "test": [], "predict": [root / "predictions"]}
    writers.clear()
    main(["predict", "--config", str(DEMO)])
    assert writers == {"predict": [Path("outputs/demo-sft")]}


def test_predict_that_writes_nothing_is_an_error(talkingshapes, tmp_path, monkeypatch):
    """An empty manifest, or one whose rows never reach the model, fails predict instead of exiting 0."""
    from prefalign.data.errors import DataError

    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the manifest has no rows") as error:
        main(["predict", "--config", str(DEMO), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--data.predict", str(empty)])
    assert str(empty) in str(error.value)
    # Rows, but none predicted: an error too, not exit 0 with an empty folder.
    conditions, _ = conditions_manifest(talkingshapes, tmp_path / "conditions.jsonl")
    with pytest.raises(RuntimeError, match="predict wrote no video") as error:
        main(["predict", "--config", str(recipe_without_writer(tmp_path)), "--trainer.default_root_dir",
              str(tmp_path / "run"), "--data.predict", str(conditions), "--trainer.limit_predict_batches", "0"])
    assert str(conditions) in str(error.value) and "limit_predict_batches" in str(error.value)
    assert not (tmp_path / "run" / "predictions").exists()


def test_predict_with_a_skeleton_conditioned_model_on_conditions(talkingshapes, tmp_path, monkeypatch):
    """sft_pose.yaml's denoiser (pose_keypoints: 8) animates conditions-only rows: their pose reaches the model."""
    monkeypatch.chdir(tmp_path)  # the recipe's runs/ and outputs/ folders land here
    conditions, ids = conditions_manifest(talkingshapes, tmp_path / "conditions.jsonl",
                                          keys=("audio", "reference", "pose"))
    main(["predict", "--config", str(ROOT / "recipes" / "demo" / "sft_pose.yaml"), "--data.predict", str(conditions),
          "--data.num_frames", "17", "--model.sampling.num_steps", "2", "--trainer.limit_predict_batches", "1"])
    for clip_id in ids:
        with av.open(str(tmp_path / "outputs/demo-sft-pose" / f"{clip_id}.mp4")) as container:
            frames = list(container.decode(video=0))
            assert len(frames) == 17 and (frames[0].width, frames[0].height) == (32, 32)


def test_default_loggers_checkpoint_and_curves(talkingshapes, tmp_path):
    """A recipe that names no logger and no callbacks gets CSV + TensorBoard, the last checkpoint and the curves."""
    root = tmp_path / "run"
    main(["fit", "--config", str(DEMO), "--trainer.logger", "null", "--trainer.callbacks", "null",
          "--trainer.default_root_dir", str(root), "--data.train", str(talkingshapes), "--data.val", str(talkingshapes),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"])
    assert "train/loss" in (root / "csv/version_0/metrics.csv").read_text()
    assert list((root / "tensorboard/version_0").glob("events.out.tfevents.*"))
    assert (root / "checkpoints/last.ckpt").exists()  # a fixed folder: `--ckpt_path last` finds it
    assert (root / "csv/version_0/curves.png").exists()

    # A second job with `--ckpt_path last` (what the SLURM and torchrun launchers pass) continues the first.
    main(["fit", "--config", str(DEMO), "--trainer.logger", "null", "--trainer.callbacks", "null",
          "--trainer.default_root_dir", str(root), "--data.train", str(talkingshapes), "--data.val", str(talkingshapes),
          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
          "--ckpt_path", "last"])
    import torch

    assert torch.load(root / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    rows = (root / "csv/version_1/metrics.csv").read_text().splitlines()[1:]
    assert len([row for row in rows if row.split(",")[2]]) == 1  # one new training step logged


def test_export_writes_init_weights(talkingshapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(DEMO), "--data.train", str(talkingshapes), "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "w.safetensors")])
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "w.safetensors")
    assert "backbone.proj_out.weight" in weights and "audio_conditioning.level_logits" in weights
    assert not any(key.startswith("codec.") for key in weights)


def strategy_of(recipe: str):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    config = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy


def test_fsdp_overlay_resolves_its_wrap_policy():
    """The FSDP overlay's strategy instantiates, with the Wan block class as its wrap unit."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = strategy_of("cluster/fsdp.yaml")
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {cls.__name__ for cls in policy._module_classes} == {"WanTransformerBlock"}


@pytest.mark.parametrize("recipe", [r.name for r in REAL_SCALE])
def test_real_scale_recipes_use_a_strategy_every_algorithm_runs_under(recipe):
    """DDP: GRPO cannot step inside the FSDP root's forward, so one value swaps the algorithm only under DDP."""
    from lightning.pytorch.strategies import DDPStrategy

    assert type(strategy_of(recipe)) is DDPStrategy


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_cluster_overlays_merge_over_a_recipe(overlay, capsys):
    """``--config RECIPE --config OVERLAY``: the overlay's trainer keys win, the recipe's model stays."""
    base = ROOT / "recipes" / "dpo_hallo4.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(base), "--config", str(overlay), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(overlay.read_text())["trainer"]
    for key, value in expected.items():
        if key == "strategy":
            assert printed["trainer"]["strategy"]["class_path"] == value["class_path"]
        else:
            assert printed["trainer"][key] == value
    assert printed["model"]["algorithm"]["class_path"] == "prefalign.algorithms.DiffusionDPO"


@pytest.mark.parametrize("script", ["slurm.sbatch", "torchrun.sh"])
def test_cluster_launch_scripts_are_valid_bash_naming_real_files(script):
    import re
    import subprocess

    path = ROOT / "recipes" / "cluster" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for name in re.findall(r"recipes/[\w/]+\.yaml", path.read_text()):
        assert (ROOT / name).exists(), name
