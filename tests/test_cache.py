"""The latent cache: windows encoded once equal the live encoders' output, batch like decoded clips, and a cache
that does not match the run or is damaged on disk is a clear error naming the setting or the file."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import TINY_WAN_RECIPE, quiet_trainer, tiny_wan
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from prefalign.cli import main
from prefalign.data.cache import CachedClipDataset, LatentCache
from prefalign.data.datamodule import PortraitDataModule, collate_clips
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.denoisers import MelAudioEncoder, PixelCodec, Wav2Vec2AudioEncoder
from prefalign.preprocess import preprocess

WINDOW, STRIDE, SHARD = 9, 4, 5
SPF = 16000 // 25  # audio samples per video frame


def datamodule(manifest, **kwargs) -> PortraitDataModule:
    options = dict(train=str(manifest), val_fraction=0.25, num_frames=WINDOW)
    options.update(kwargs)
    return PortraitDataModule(**options)


def decoded_window(dm: PortraitDataModule, row: int, start: int, length: int = WINDOW) -> dict:
    """A window cut from the decoded clip by hand, as the reference the cache is checked against."""
    dataset = dm.dataset("train")
    clip = dataset.decode(dataset.manifest.rows[row], row)
    frames = torch.from_numpy(clip["frames"][start : start + length]).permute(0, 3, 1, 2).float() / 255
    window = {
        "video": frames,
        "audio": torch.from_numpy(clip["audio"][start * SPF : (start + length) * SPF].copy()),
        "reference": clip["reference"],
        "pose": torch.from_numpy(clip["pose"][start : start + length].copy()),
    }
    if "rejected" in clip:
        window["rejected"] = torch.from_numpy(clip["rejected"][start : start + length]).permute(0, 3, 1, 2).float() / 255
    return window


@pytest.fixture(scope="module")
def cache(talkingshapes, tmp_path_factory) -> LatentCache:
    """The 9 training clips (17 frames) in windows of 9 frames every 4: 3 windows each, 5 windows per shard."""
    out = tmp_path_factory.mktemp("cache")
    return preprocess(tiny_wan(), datamodule(talkingshapes), out, stride=STRIDE, shard_size=SHARD, batch_size=4)


def test_windows_shards_and_counts(cache, talkingshapes):
    rows = datamodule(talkingshapes).split("train")[1]
    manifest = json.loads(cache.path.read_text())
    assert [(e["row"], e["start_frame"]) for e in manifest["entries"]] == [(r, s) for r in rows for s in (0, 4, 8)]
    assert manifest["counts"] == {"rows": 9, "cached_rows": 9, "entries": 27, "skipped": 0, "shards": 6}
    assert sorted(p.name for p in cache.folder.glob("shard-*.safetensors")) == [f"shard-{i:05d}.safetensors" for i in range(6)]
    assert manifest["shards"] == [e["shard"] for e in manifest["entries"]][::SHARD]
    assert manifest["source"] == str(talkingshapes) and manifest["stride"] == STRIDE
    assert set(manifest["fields"]) == {"latents", "audio", "audio_features", "reference", "pose"}
    fp = cache.fingerprint
    assert fp["codec"]["class"] == "prefalign.denoisers.codecs.PixelCodec"
    assert fp["codec"]["latent_shape"] == [192, 3, 8, 8] and fp["codec"]["frame_size"] == [32, 32]
    assert fp["audio_encoder"]["class"] == "prefalign.denoisers.audio.MelAudioEncoder"
    assert fp["audio_encoder"]["feature_shape"] == [WINDOW, 1, 160]
    assert (fp["fps"], fp["sample_rate"], fp["num_frames"], fp["dtype"]) == (25.0, 16000, WINDOW, "float32")
    assert not list(cache.folder.glob(".*"))  # no temporary file left behind


def test_cached_windows_equal_the_encoders_output(cache, talkingshapes):
    dm, denoiser = datamodule(talkingshapes), tiny_wan()
    for index in (0, 4, 26):  # first and last windows of a clip, across shards
        entry, item = cache.entries[index], cache.read(index)
        window = decoded_window(dm, entry["row"], entry["start_frame"])
        assert item["id"] == entry["id"] and item["num_frames"] == WINDOW
        assert torch.equal(item["latents"], denoiser.encode_video(window["video"][None])[0])
        assert torch.equal(item["audio"], window["audio"])
        assert torch.equal(item["audio_features"], denoiser.audio_encoder(window["audio"][None], WINDOW, 25.0)[0])
        assert torch.equal(item["reference"], window["reference"]) and item["reference"].dtype == torch.float32
        assert torch.equal(item["pose"], window["pose"])
        assert "rejected_latents" not in item and "video" not in item


def test_default_stride_and_half_precision(talkingshapes, tmp_path):
    cache = preprocess(tiny_wan(), datamodule(talkingshapes), tmp_path, dtype="float16")
    assert len(cache) == 9 and [e["start_frame"] for e in cache.entries] == [0] * 9  # 17 frames: one 9-frame window
    assert cache.manifest["counts"]["shards"] == 1
    item = cache.read(0)
    assert item["latents"].dtype == torch.float32  # served as decoded items are, whatever the dtype on disk
    exact = tiny_wan().encode_video(decoded_window(datamodule(talkingshapes), cache.entries[0]["row"], 0)["video"][None])[0]
    torch.testing.assert_close(item["latents"], exact.half().float())
    # Preprocessing again into the same folder replaces the cache, shards included.
    again = preprocess(tiny_wan(), datamodule(talkingshapes), tmp_path, stride=4, shard_size=10)
    assert len(again) == 27 and len(list(tmp_path.glob("shard-*.safetensors"))) == 3


def test_collate_batches_cached_items(cache):
    loader = DataLoader(CachedClipDataset(cache, list(range(8))), batch_size=4, collate_fn=collate_clips)
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["latents"].shape == (4, 192, 3, 8, 8)
    assert batch["audio"].shape == (4, WINDOW * SPF)
    assert batch["audio_features"].shape == (4, WINDOW, 1, 160)
    assert batch["reference"].shape == (4, 3, 32, 32)
    assert batch["pose"].shape == (4, WINDOW, 8, 2)
    assert batch["num_frames"].tolist() == [WINDOW] * 4
    assert batch["id"] == [cache.entries[i]["id"] for i in range(4)] and batch["skipped"] == 0
    # Worker processes open the shards themselves.
    workers = DataLoader(CachedClipDataset(cache, list(range(8))), batch_size=4, collate_fn=collate_clips, num_workers=1)
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(batches, workers))


def test_a_cache_made_for_other_settings_is_refused(cache):
    cache.check(tiny_wan(), fps=25.0, sample_rate=16000, num_frames=WINDOW)
    for setting, value in {"num_frames": 13, "fps": 30.0, "sample_rate": 24000}.items():
        settings = {"fps": 25.0, "sample_rate": 16000, "num_frames": WINDOW, setting: value}
        with pytest.raises(DataError, match=f"data.{setting}={value}") as error:
            cache.check(tiny_wan(), **settings)
        assert error.value.field == setting and error.value.path == str(cache.path)
    settings = {"fps": 25.0, "sample_rate": 16000, "num_frames": WINDOW}
    with pytest.raises(DataError, match="codec differs.*temporal_ratio: 4 in the cache, 2 in this run") as error:
        cache.check(tiny_wan(codec=PixelCodec(temporal_ratio=2)), **settings)
    assert error.value.field == "codec"
    with pytest.raises(DataError, match="audio_encoder differs.*n_mels: 40 in the cache, 20") as error:
        cache.check(tiny_wan(audio_encoder=MelAudioEncoder(n_mels=20)), **settings)
    assert error.value.field == "audio_encoder"
    with pytest.raises(DataError, match="has audio features of .*MelAudioEncoder, this run's denoiser has none"):
        cache.check(tiny_wan(audio_encoder=None), **settings)


def test_a_damaged_cache_names_the_file(cache, tmp_path):
    def copy(name):
        return shutil.copytree(cache.folder, tmp_path / name)

    missing = copy("missing")
    (missing / "shard-00003.safetensors").unlink()
    with pytest.raises(DataError, match="shard-00003.safetensors.*shard missing"):
        LatentCache(missing)

    truncated = copy("truncated")
    shard = truncated / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(DataError, match="shard-00001.safetensors.*cannot read shard"):
        LatentCache(truncated)

    corrupt = copy("corrupt")
    (corrupt / "manifest.json").write_text('{"format": "prefalign-latent-cache", "vers')
    with pytest.raises(DataError, match="manifest.json: corrupt cache manifest"):
        LatentCache(corrupt)

    newer = copy("newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="manifest.json: field 'version': cache version 99"):
        LatentCache(newer)

    without = copy("without_entries")
    (without / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "entries"}))
    with pytest.raises(DataError, match="manifest.json: field 'entries'"):
        LatentCache(without)

    with pytest.raises(DataError, match="no latent cache here"):
        LatentCache(tmp_path / "nowhere")

    # A tensor of the wrong shape is found when read: an error naming the shard and field, or a counted skip.
    reshaped = copy("reshaped")
    shard = reshaped / "shard-00000.safetensors"
    tensors = load_file(shard)
    tensors["000001/audio"] = tensors["000001/audio"][:100]
    save_file(tensors, shard)
    damaged = LatentCache(reshaped)
    with pytest.raises(DataError, match=r"shard-00000.safetensors: field 'audio': tensor '000001/audio' has shape \[100\]"):
        damaged.read(1)
    items = CachedClipDataset(damaged, [0, 1, 2], on_bad_sample="skip")
    batch = collate_clips([items[(i, 0)] for i in range(3)])  # (index, epoch) keys, as the data module's sampler gives
    # The bad window is counted, and the next one stands in for it: batches keep their size.
    assert batch["size"] == 3 and batch["skipped"] == 1 and batch["skipped_samples"][0].field == "audio"
    assert batch["id"] == [damaged.entries[i]["id"] for i in (0, 2, 2)]
    assert batch["skipped_samples"][0].id == damaged.entries[1]["id"]


def test_a_trainable_audio_encoder_is_refused(talkingshapes, tmp_path):
    wav2vec2 = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8,) * 7,
                    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, vocab_size=8)
    denoiser = tiny_wan(audio_encoder=Wav2Vec2AudioEncoder(config=wav2vec2), train_audio_encoder=True)
    with pytest.raises(ValueError, match="trains its audio encoder.*would go stale"):
        preprocess(denoiser, datamodule(talkingshapes), tmp_path)
    assert not list(tmp_path.iterdir())


def test_preference_pairs_cache_rejected_latents_and_labels(tmp_path):
    manifest = write_dataset(tmp_path / "pairs", num_clips=2, seed=3, cfg=TalkingShapesConfig(), rejected=("shift",))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "labels": {"sync": 1}}) + "\n" for r in rows))
    dm = datamodule(manifest, val_fraction=0.0)
    cache = preprocess(tiny_wan(), dm, tmp_path / "cache", stride=8)
    assert len(cache) == 4 and "rejected_latents" in cache.fields and "labels" in cache.fields
    denoiser = tiny_wan()
    for index in range(4):
        entry, item = cache.entries[index], cache.read(index)
        window = decoded_window(dm, entry["row"], entry["start_frame"])
        assert torch.equal(item["rejected_latents"], denoiser.encode_video(window["rejected"][None])[0])
        assert not torch.equal(item["rejected_latents"], item["latents"])
    batch = collate_clips([cache.read(i) for i in range(4)])
    assert batch["rejected_latents"].shape == batch["latents"].shape == (4, 192, 3, 8, 8)
    assert batch["labels"] == [{"sync": 1}] * 4


def test_short_clips_raise_or_are_skipped_and_listed(talkingshapes, tmp_path):
    short = write_dataset(tmp_path / "short", num_clips=1, seed=1, cfg=TalkingShapesConfig(num_frames=5))
    rows = [json.loads(line) for line in talkingshapes.read_text().splitlines()[:2]]
    rows = [{**r, **{k: str(talkingshapes.parent / r[k]) for k in ("video", "audio", "reference", "pose")}} for r in rows]
    short_row = json.loads(short.read_text())
    short_row = {**short_row, "id": "short", **{k: str(short.parent / short_row[k]) for k in ("video", "audio", "pose")}}
    del short_row["reference"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], short_row, rows[1]]))

    with pytest.raises(DataError, match=r"short/clips/clip_00000.mp4: field 'video': video has 5 frames, fewer than the 9"):
        preprocess(tiny_wan(), datamodule(mixed, val_fraction=0.0), tmp_path / "raise")

    cache = preprocess(tiny_wan(), datamodule(mixed, val_fraction=0.0, on_bad_sample="skip"), tmp_path / "skip")
    assert [e["id"] for e in cache.entries] == [rows[0]["id"], rows[1]["id"]]
    counts, skipped = cache.manifest["counts"], cache.manifest["skipped"]
    assert (counts["rows"], counts["cached_rows"], counts["skipped"]) == (3, 2, 1)
    assert skipped[0]["row"] == 1 and skipped[0]["id"] == "short" and "fewer than the 9" in skipped[0]["reason"]
    assert skipped[0]["field"] == "video" and skipped[0]["path"].endswith("short/clips/clip_00000.mp4")


def test_preprocess_from_the_command_line(cache, talkingshapes, tmp_path, capsys):
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {
            "denoiser": TINY_WAN_RECIPE,
            "process": {"class_path": "prefalign.processes.FlowMatching"},
        },
        "data": {"train": str(talkingshapes), "val_fraction": 0.25, "num_frames": WINDOW},
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cache"
    main(["preprocess", "--recipe", str(config), "--out", str(out), "--stride", "8", "--device", "cpu"])
    assert f"cached 18 windows of 9 of 9 clips (0 skipped) in 1 shards: {out / 'manifest.json'}" in capsys.readouterr().out
    made = LatentCache(out)
    made.check(tiny_wan(), fps=25.0, sample_rate=16000, num_frames=WINDOW)
    assert [e["start_frame"] for e in made.entries[:2]] == [0, 8]
    assert torch.equal(made.read(0)["latents"], cache.read(0)["latents"])


def losses_of_a_fit(algorithm, dm: PortraitDataModule, steps: int = 4) -> list[float]:
    import lightning as L

    from prefalign.lora import LoraSettings

    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    class Record(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert "video" not in batch or dm.latent_cache is None  # a cached run never decodes training video
            self.losses.append(trainer.callback_metrics["train/loss"].item())

    L.seed_everything(0)
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=algorithm, lora=LoraSettings(rank=4))
    record = Record()
    trainer = quiet_trainer(max_steps=steps, callbacks=[record])
    trainer.fit(module, datamodule=dm)
    return record.losses


@pytest.mark.parametrize("pairs", [False, True], ids=["sft", "dpo"])
def test_training_from_the_cache_repeats_training_from_decoded_clips(tmp_path, pairs):
    """Whole 17-frame clips, so a decoded clip and its one cached window are the same: same batches, same losses."""
    from prefalign.algorithms import SFT, DiffusionDPO

    manifest = write_dataset(tmp_path / "data", num_clips=6, seed=4, cfg=TalkingShapesConfig(),
                             rejected=("shift",) if pairs else ())
    options = dict(train=str(manifest), val_fraction=0.0, batch_size=2, num_frames=17)
    preprocess(tiny_wan(), PortraitDataModule(**options), tmp_path / "cache")
    algorithm = (lambda: DiffusionDPO(beta=500.0)) if pairs else (lambda: SFT())
    decoded = losses_of_a_fit(algorithm(), PortraitDataModule(**options))
    cached = losses_of_a_fit(algorithm(), PortraitDataModule(**options, latent_cache=str(tmp_path / "cache")))
    assert len(decoded) == 4
    torch.testing.assert_close(cached, decoded, rtol=1e-5, atol=1e-6)


def test_a_pixel_algorithm_refuses_the_cache(cache, talkingshapes):

    from prefalign.algorithms import ReFree
    from prefalign.lora import LoraSettings
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=ReFree(), lora=LoraSettings(rank=4))
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(DataError, match="ReFree algorithm needs the field 'video'") as error:
        trainer.fit(module, datamodule=datamodule(talkingshapes, latent_cache=str(cache.folder)))
    assert error.value.path == str(cache.path)


def test_a_cache_of_other_training_data_is_refused(cache, talkingshapes, tmp_path):

    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    other = tmp_path / "manifest.jsonl"
    other.write_text(talkingshapes.read_text())  # same rows, another manifest: not what the cache was made from
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(DataError, match="the latent cache was made from") as error:
        trainer.fit(AlignmentModule(tiny_wan(), FlowMatching()),
                    datamodule=datamodule(other, latent_cache=str(cache.folder)))
    assert error.value.field == "source"
