"""Figure ``data_step``: training samples per second when the batches come from the latent cache against decoding
the clips on the fly, with the SFT step of recipes/demo/sft.yaml and for loading alone."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.figures.common import SFT_RECIPE, from_recipe, module_step, recipe_name, without_trainer
from benchmarks.harness import MIB, Bench, Figure, Step
from prefalign.data.cache import LatentCache
from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.module import AlignmentModule
from prefalign.preprocess import preprocess

DATA_CLIPS = 16  # clips of the data_step dataset: 4 demo batches per pass
DATA_SEED = 0
DECODE_SFT, CACHE_SFT, DECODE, CACHE = "decode + SFT step", "cache + SFT step", "decode only", "cache only"


def talkingshapes_on_disk(num_clips: int, seed: int) -> Path:
    """The manifest of a TalkingShapes dataset (the demo's clips: 17 frames at 32×32 with audio and pose) that
    ``write_dataset`` wrote under the temporary folder, in a folder named after its settings and reused when there:
    the memory probes, in processes of their own, read the same files. Written aside and renamed into place, so that
    a folder found there is whole."""
    cfg = TalkingShapesConfig()
    settings = json.dumps({"num_clips": num_clips, "seed": seed, **asdict(cfg)}, sort_keys=True)
    key = hashlib.sha1(settings.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"prefalign-benchmark-talkingshapes-{key}"
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
        write_dataset(staging, num_clips, seed, cfg)
        try:
            staging.rename(folder)
        except OSError:  # another process put it there first
            shutil.rmtree(staging)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise RuntimeError(f"data_step: {folder} holds no manifest.jsonl; delete the folder to have it written again")
    return manifest


def sft_demo(manifest: Path, latent_cache: Path | None) -> tuple[AlignmentModule, PortraitDataModule]:
    """The SFT demo's module (seeded) and its data module on the dataset at ``manifest`` as this figure reads it:
    the recipe's batch size and clip length, no validation split, no worker processes, every clip decoded afresh
    (``keep_decoded`` off), or with ``latent_cache`` read from that cache."""
    return from_recipe(
        SFT_RECIPE,
        "--model.lora", "null",
        "--data.train", str(manifest),
        "--data.val", "null",
        "--data.val_fraction", "0",
        "--data.num_workers", "0",
        "--data.keep_decoded", "false",
        "--data.latent_cache", "null" if latent_cache is None else str(latent_cache),
    )  # fmt: skip


def latent_cache_of(manifest: Path) -> Path:
    """The latent cache of the dataset at ``manifest``, written next to it by ``preprocess`` with the SFT demo's
    denoiser (its codec and audio encoder encode); reused when its fingerprint matches that denoiser and the data
    settings, as ``AlignmentModule.setup`` checks it, and written again when not."""
    folder = manifest.parent.with_name(f"{manifest.parent.name}-latents")
    module, data = sft_demo(manifest, None)
    try:
        LatentCache(folder).check(module.denoiser, data.fps, data.sample_rate, data.num_frames)
    except DataError:
        preprocess(module.denoiser, data, folder)
    return folder


def endless_batches(bench: Bench, data: PortraitDataModule) -> Callable[[], dict]:
    """Each call, the next batch of the data module's training loader, moved to the device; a new pass over the
    loader when one ends (in the same order: outside a Trainer its sampler stays at epoch 0)."""
    loader = data.train_dataloader()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))

    def next_batch() -> dict:
        batch = next(batches)
        return {key: value.to(bench.device) if torch.is_tensor(value) else value for key, value in batch.items()}

    return next_batch


def sft_step(bench: Bench, manifest: Path, latent_cache: Path | None) -> Step:
    module, data = sft_demo(manifest, latent_cache)
    return module_step(bench, module, endless_batches(bench, data))


def loading_step(bench: Bench, manifest: Path, latent_cache: Path | None) -> Step:
    return Step(endless_batches(bench, sft_demo(manifest, latent_cache)[1]), None, [])


def same_data_check(bench: Bench, manifest: Path, latent_cache: Path) -> float:
    """Largest difference between what the denoiser makes of the first decoded batch (latents and conditions) and
    of the first cached one, which must hold the same clips: shows that both loaders feed the step the same data."""
    module, decoding = sft_demo(manifest, None)
    decoded = endless_batches(bench, decoding)()
    cached = endless_batches(bench, sft_demo(manifest, latent_cache)[1])()
    if decoded["id"] != cached["id"]:
        raise RuntimeError(f"data_step: the loaders give different clips: {decoded['id']} and {cached['id']}")
    denoiser = module.denoiser.to(bench.device)
    with torch.no_grad():
        made = {"latents": denoiser.latents(decoded), **denoiser.condition(decoded)}
        read = {"latents": denoiser.latents(cached), **denoiser.condition(cached)}
    if made.keys() != read.keys():
        raise RuntimeError(f"data_step: the batches make different conditions: {sorted(made)} and {sorted(read)}")
    return max((made[key] - read[key]).abs().max().item() for key in made if torch.is_tensor(made[key]))


def folder_mib(folder: Path, pattern: str) -> float:
    return sum(path.stat().st_size for path in folder.glob(pattern)) / MIB


def describe(b: int, frames: int) -> Figure:
    return Figure(
        name="data_step",
        title="Training samples per second: cached latents vs. decoding on the fly",
        description=(
            f"Where a training step's batch comes from, at the demo size. The data: {DATA_CLIPS} TalkingShapes clips "
            f"({frames} frames at 32×32, 25 fps, 16 kHz audio, pose) written once by `write_dataset` (mp4, wav, png "
            "and npy per clip), and their latent cache, written once by `prefalign.preprocess.preprocess` with the "
            f"denoiser of {recipe_name(SFT_RECIPE)}: per {frames}-frame window, the PixelCodec latents, the "
            "audio waveform, the MelAudioEncoder's features, the reference image (uint8) and the pose, in "
            f"safetensors shards. Every variant takes its batch of {b} by `next()` on an endless iterator over the "
            f"training loader of the recipe's data module (batch_size={b}, num_frames={frames}) with `--data.train "
            "... --data.val null --data.val_fraction 0 --data.num_workers 0 --data.keep_decoded false "
            "[--data.latent_cache ...]` (a new pass when one ends) and moves it to the device. "
            f"**{DECODE_SFT}** (baseline): the loader decodes every clip (PyAV video, wav, png, npy; the "
            f"{frames}-frame crop is the whole clip), then the SFT demo's module as `prefalign fit` builds it from "
            "the recipe (`AlignmentModule.training_step`, backward, AdamW step) encodes the video through the codec "
            f"and computes the mel features. **{CACHE_SFT}**: the loader reads the cache (`CachedClipDataset`: no "
            "video is decoded) and the same module, from the same weights, takes the cached latents and audio "
            f"features in place of encoding. **{DECODE}** / **{CACHE}**: the loading alone (no model). On this tiny "
            "model the codec is the PixelCodec, a space-to-depth reshape next to free, so what the cache saves here "
            "is almost all decoding (and the mel features); at real scale the codec is a VAE, whose encoder is what "
            "the cache mostly saves there, and this figure does not measure it."
        ),
        baseline=DECODE_SFT,
        compare_also=[(CACHE_SFT, DECODE_SFT), (CACHE, DECODE)],
        columns={"samples_per_s": "samples/s"},
    )


def throughput_notes(figure: Figure, b: int, manifest: Path, latent_cache: Path) -> list[str]:
    """The samples per second (into the rows), and the notes on what decoding costs and what the cache takes."""
    rows = {row["variant"]: row for row in figure.rows}
    for row in figure.rows:
        row["samples_per_s"] = b / (1e-3 * row["median_ms"])
    ms = {name: row["median_ms"] for name, row in rows.items()}
    windows = len(json.loads((latent_cache / "manifest.json").read_text())["entries"])
    spread = {name: rows[name]["q3_ms"] - rows[name]["q1_ms"] for name in (DECODE_SFT, CACHE_SFT)}
    return [
        "Samples per second = batch size / median step time: "
        + ", ".join(f"{name} {rows[name]['samples_per_s']:.1f}" for name in rows)
        + f". The cache gives {rows[CACHE_SFT]['samples_per_s'] / rows[DECODE_SFT]['samples_per_s']:.2f}× the "
        f"samples per second with the step and {rows[CACHE]['samples_per_s'] / rows[DECODE]['samples_per_s']:.1f}× "
        "for loading alone (ratios of medians; the paired ratios are under the table).",
        f"Decoding a batch takes {ms[DECODE]:.1f} ms, {100 * ms[DECODE] / ms[DECODE_SFT]:.0f}% of the decode + SFT "
        f"step ({ms[DECODE_SFT]:.1f} ms); reading it from the cache {ms[CACHE]:.2f} ms. With the step the cache saves "
        f"{ms[DECODE_SFT] - ms[CACHE_SFT]:.1f} ms a batch, loading alone {ms[DECODE] - ms[CACHE]:.1f} ms (differences "
        "of medians); what the cached step also skips, the codec encode and the mel features, is the difference "
        f"between the two, to be read against the SFT rows' spread (IQR {spread[DECODE_SFT]:.1f} "
        f"and {spread[CACHE_SFT]:.1f} ms wide).",
        "Loading here runs in the training process between steps (`num_workers=0`, as the demo recipes). With worker "
        "processes decoding overlaps the step and costs CPU cores rather than step time, as long as the workers keep "
        "up; the loading rows say how many cores that takes (a batch's decode time over the step's).",
        f"{DATA_CLIPS} clips make {DATA_CLIPS // b} batches a pass, so one step in {DATA_CLIPS // b} of every variant "
        "also starts a new pass over its loader. The dataset takes "
        f"{folder_mib(manifest.parent / 'clips', '*'):.2f} MiB on disk, its cache {folder_mib(latent_cache, '*'):.2f} "
        f"MiB for {windows} windows (float32 latents and features: the cache is larger than compressed video).",
        "The ratio column compares every row with decode + SFT step; the loading rows compare like with like "
        "under the table. The loading rows have no model (—).",
    ]


def figure(bench: Bench) -> Figure:
    """Training samples per second when the batches come from the latent cache against decoding the clips on the
    fly, with the SFT step and for loading alone."""
    manifest = talkingshapes_on_disk(DATA_CLIPS, DATA_SEED)
    latent_cache = latent_cache_of(manifest)
    data = sft_demo(manifest, None)[1]
    figure = describe(data.batch_size, data.num_frames)
    if not bench.probing:
        difference = same_data_check(bench, manifest, latent_cache)
        if difference > 1e-5:
            raise RuntimeError(
                f"data_step: cached and decoded batches give different inputs (max difference {difference})"
            )
        figure.notes.append(
            f"Same data: the first batch of both loaders holds the same clips, and the latents and conditions "
            f"(reference latent, audio features) the module makes of the decoded batch match those of the cached "
            f"one (max difference {difference:.1e})."
        )
    with without_trainer():
        bench.compare(
            figure,
            {
                DECODE_SFT: lambda: sft_step(bench, manifest, None),
                CACHE_SFT: lambda: sft_step(bench, manifest, latent_cache),
                DECODE: lambda: loading_step(bench, manifest, None),
                CACHE: lambda: loading_step(bench, manifest, latent_cache),
            },
        )
    if bench.probing:
        return figure
    figure.notes += throughput_notes(figure, data.batch_size, manifest, latent_cache)
    return figure
