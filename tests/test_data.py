"""Loading the clip schema from disk, and the clear errors every bad input gets."""

import json
import shutil

import numpy as np
import pytest
import torch

from prefalign.data import media
from prefalign.data.datamodule import PortraitDataModule, collate_clips
from prefalign.data.errors import DataError
from prefalign.data.schema import load_manifest
from prefalign.data.synthetic import write_dataset


def rows(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def write_manifest(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_generated_dataset_loads(talkingshapes):
    dm = PortraitDataModule(train=str(talkingshapes), val_fraction=0.25, batch_size=4, num_frames=17)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 17, 3, 32, 32)
    assert batch["audio"].shape == (4, 17 * 640)
    assert batch["reference"].shape == (4, 3, 32, 32)
    assert batch["pose"].shape == (4, 17, 8, 2)
    assert 0 <= batch["video"].min() and batch["video"].max() <= 1
    assert batch["skipped"] == 0 and len(batch["id"]) == 4
    # The split is deterministic and disjoint.
    train, val = dm.split("train")[1], dm.split("val")[1]
    assert len(val) == 3 and not set(train) & set(val)
    assert PortraitDataModule(train=str(talkingshapes), val_fraction=0.25).split("val")[1] == val
    assert dm.available_fields("train") >= {"video", "audio", "reference", "pose"}


def test_decoded_audio_matches_the_wav(talkingshapes):
    dm = PortraitDataModule(train=str(talkingshapes), val_fraction=0.0, num_frames=17)
    item = dm.dataset("train")[0]
    wav = media.read_audio(talkingshapes.parent / rows(talkingshapes)[0]["audio"])
    np.testing.assert_allclose(item["audio"].numpy(), wav[: 17 * 640], atol=1e-6)


def test_random_crop_keeps_audio_and_pose_aligned(talkingshapes, tmp_path):
    # A 9-frame crop of a 17-frame clip: the audio slice must follow the crop's start.
    dm = PortraitDataModule(train=str(talkingshapes), val_fraction=0.0, num_frames=9, keep_decoded=True)
    dataset = dm.dataset("train")
    full = PortraitDataModule(train=str(talkingshapes), val_fraction=0.0).dataset("train")[0]
    torch.manual_seed(3)
    for _ in range(5):
        item = dataset[0]
        start = [s for s in range(9) if torch.equal(full["video"][s : s + 9], item["video"])][0]
        torch.testing.assert_close(item["audio"], full["audio"][start * 640 : (start + 9) * 640])
        torch.testing.assert_close(item["pose"], full["pose"][start : start + 9])


@pytest.fixture
def bad_dir(talkingshapes, tmp_path):
    """A copy of two clips that each test then breaks in one way."""
    for row in rows(talkingshapes)[:2]:
        for key in ("video", "audio", "reference", "pose"):
            target = tmp_path / row[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(talkingshapes.parent / row[key], target)
    return tmp_path, rows(talkingshapes)[:2]


def load_first(manifest, **kwargs):
    dm = PortraitDataModule(train=str(manifest), val_fraction=0.0, **kwargs)
    return dm.dataset("train")[0]


def assert_names(error, path_part, field):
    assert path_part in str(error.value) and f"field '{field}'" in str(error.value)


def test_corrupt_video(bad_dir):
    root, records = bad_dir
    (root / records[0]["video"]).write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError) as error:
        load_first(write_manifest(root / "m.jsonl", records))
    assert_names(error, records[0]["video"], "video")


def test_truncated_video(bad_dir):
    root, records = bad_dir
    path = root / records[0]["video"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        load_first(write_manifest(root / "m.jsonl", records))
    assert_names(error, records[0]["video"], "video")


def test_video_without_audio_when_audio_is_required(bad_dir):
    root, records = bad_dir
    path = root / records[0]["video"]
    frames, fps = media.read_video(path)
    media.write_video(path, frames, fps, audio=None)
    record = {k: v for k, v in records[0].items() if k != "audio"}  # audio must come from the video
    with pytest.raises(DataError) as error:
        load_first(write_manifest(root / "m.jsonl", [record]))
    assert_names(error, records[0]["video"], "audio")


def test_pose_length_mismatch(bad_dir):
    root, records = bad_dir
    path = root / records[0]["pose"]
    np.save(path, np.load(path)[:10])
    with pytest.raises(DataError, match="pose has 10 frames, the video 17") as error:
        load_first(write_manifest(root / "m.jsonl", records))
    assert_names(error, records[0]["pose"], "pose")


def test_missing_column(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "reference": "x.png"}])
    with pytest.raises(DataError) as error:
        load_manifest(str(manifest))
    assert_names(error, "m.jsonl", "video")


def test_wrong_sample_rate(bad_dir):
    root, records = bad_dir
    path = root / records[0]["audio"]
    audio = media.read_audio(path)
    media.write_wav(path, media.resample(audio, 16000, 44100), 44100)
    manifest = write_manifest(root / "m.jsonl", records)
    with pytest.raises(DataError, match="44100") as error:
        load_first(manifest, resample_audio=False)
    assert_names(error, records[0]["audio"], "audio")
    # With resampling on (the default), the same file loads at the model's rate.
    assert load_first(manifest)["audio"].shape[0] == 17 * 640


def test_audio_shorter_than_video(bad_dir):
    root, records = bad_dir
    path = root / records[0]["audio"]
    media.write_wav(path, media.read_audio(path)[:4000], 16000)
    with pytest.raises(DataError, match="audio lasts 0.250 s but the video 0.680 s") as error:
        load_first(write_manifest(root / "m.jsonl", records))
    assert_names(error, records[0]["audio"], "audio")


def test_reference_of_another_size(bad_dir):
    root, records = bad_dir
    media.write_image(root / records[0]["reference"], np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError) as error:
        load_first(write_manifest(root / "m.jsonl", records))
    assert_names(error, records[0]["reference"], "reference")


def test_bad_samples_are_skipped_and_counted(bad_dir):
    root, records = bad_dir
    (root / records[0]["video"]).write_bytes(b"not a video")
    manifest = write_manifest(root / "m.jsonl", records)
    dm = PortraitDataModule(train=str(manifest), val_fraction=0.0, batch_size=2, on_bad_sample="skip")
    batch = next(iter(dm._loader("train", shuffle=False)))
    # Counted, and the next clip stands in for it: the batch keeps its size (DDP ranks must not run out of step).
    assert batch["skipped"] == 1 and batch["size"] == 2 and batch["id"] == [records[1]["id"]] * 2
    assert batch["skipped_samples"][0].id == records[0]["id"] and batch["skipped_samples"][0].field == "video"
    assert collate_clips([None, None])["size"] == 0


def test_unknown_manifest_format(tmp_path):
    (tmp_path / "m.txt").write_text("video\n")
    with pytest.raises(DataError, match="unknown manifest format"):
        load_manifest(str(tmp_path / "m.txt"))


def test_conditions_without_video_for_predict(bad_dir):
    root, records = bad_dir
    record = {"id": "talk", "audio": records[0]["audio"], "reference": records[0]["reference"]}
    item = load_first(write_manifest(root / "m.jsonl", [record]))
    assert item["num_frames"] == 17 and item["audio"].shape[0] == 17 * 640 and "video" not in item


def test_a_fit_with_bad_clips_logs_the_count_and_a_summary_by_shard(tmp_path, caplog):
    """on_bad_sample: skip during fit: the bad clips never reach a step, each epoch's skips are summed by shard."""
    import logging

    import lightning as L

    from prefalign.algorithms import SFT
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching

    from conftest import quiet_trainer, tiny_wan

    manifest = write_dataset(tmp_path / "data", num_clips=6, seed=2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (manifest.parent / rows[0]["video"]).write_bytes(b"not a video")
    (manifest.parent / rows[3]["pose"]).write_bytes(b"garbage")
    seen = []

    class Seen(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(batch["id"])

    dm = PortraitDataModule(train=str(manifest), val_fraction=0.0, batch_size=2, num_frames=9, on_bad_sample="skip")
    # SFT's mouth weight reads the pose: a run that reads none would ignore the broken pose file (not skip its row).
    module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=SFT(mouth_weight=1.0))
    trainer = quiet_trainer(max_epochs=2, callbacks=[Seen()])
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        trainer.fit(module, datamodule=dm)
    assert rows[0]["id"] not in seen and rows[3]["id"] not in seen and len(seen) == 2 * 6  # stand-ins fill in
    summaries = [r.getMessage() for r in caplog.records if "samples skipped" in r.getMessage()]
    assert len(summaries) == 2  # one per epoch
    assert summaries[0].startswith("train epoch 0: 2 samples skipped") and str(manifest) in summaries[0]
    assert "video:" in summaries[0] and "pose:" in summaries[0]


@pytest.fixture
def conditions(talkingshapes, tmp_path):
    """A conditions-only manifest (what GRPO trains on and predict animates): audio, reference and pose, no video."""
    records = [{"id": r["id"], **{key: str(talkingshapes.parent / r[key]) for key in ("audio", "reference", "pose")}}
               for r in rows(talkingshapes)[:4]]
    return write_manifest(tmp_path / "conditions.jsonl", records), records


def test_conditions_rows_carry_their_pose(conditions):
    """Rows without a video give the pose of the clip's frames: the first num_frames of the file, like the audio."""
    manifest, records = conditions
    poses = torch.stack([torch.from_numpy(np.load(r["pose"])) for r in records])
    dm = PortraitDataModule(predict=str(manifest), eval_batch_size=4, num_frames=9)
    assert "pose" in dm.available_fields("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["id"] == [r["id"] for r in records] and "video" not in batch
    assert batch["num_frames"].tolist() == [9] * 4 and batch["audio"].shape == (4, 9 * 640)
    assert batch["pose"].shape == (4, 9, 8, 2)
    torch.testing.assert_close(batch["pose"], poses[:, :9])

    # A GRPO-style training set of conditions: the whole clip's pose when num_frames is not set.
    dm = PortraitDataModule(train=str(manifest), val_fraction=0.0, batch_size=2)
    assert "pose" in dm.available_fields("train")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pose"].shape == (2, 17, 8, 2) and batch["num_frames"].tolist() == [17, 17]
    for pose, clip_id in zip(batch["pose"], batch["id"]):
        torch.testing.assert_close(pose, poses[[r["id"] for r in records].index(clip_id)])


def test_conditions_pose_shorter_than_the_clip(conditions, tmp_path):
    manifest, records = conditions
    short = tmp_path / "short_pose.npy"
    np.save(short, np.load(records[0]["pose"])[:10])
    write_manifest(manifest, [{**records[0], "pose": str(short)}])
    with pytest.raises(DataError, match="pose has 10 frames, fewer than the 17 needed") as error:
        load_first(manifest)
    assert_names(error, "short_pose.npy", "pose")
    assert load_first(manifest, num_frames=9)["pose"].shape == (9, 8, 2)  # 9 frames are covered


def test_grpo_trains_a_pose_conditioned_model_on_conditions(conditions):
    """grpo_flowportrait's setup in small: a skeleton-conditioned denoiser, rollouts from conditions-only rows and a
    jitter penalty that reads the pose. One step runs and moves the trained parameters."""
    from prefalign.algorithms import GRPO
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching
    from prefalign.rewards import JitterPenalty

    from conftest import quiet_trainer, tiny_wan

    manifest, _ = conditions
    grpo = GRPO(JitterPenalty(implied="pose", scale=100.0), group_size=2, num_steps=2, train_fraction=1.0)
    module = AlignmentModule(tiny_wan(pose_keypoints=8), FlowMatching(), algorithm=grpo,  # no decay: moved = a gradient
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0))
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    dm = PortraitDataModule(train=str(manifest), val_fraction=0.0, batch_size=2, num_frames=17)
    quiet_trainer(max_steps=1).fit(module, datamodule=dm)
    moved = [name for name, p in module.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert any("motion" in name for name in moved)  # the skeleton branch took part in the update


def test_a_jitter_penalty_that_leaves_out_the_mouth_loads_the_pose():
    """The mouth box comes from the pose: a reward with JitterPenalty(exclude_mouth=True) makes pose a field the
    training split loads; the raw penalty does not."""
    from prefalign.algorithms import GRPO
    from prefalign.module import AlignmentModule
    from prefalign.processes import FlowMatching
    from prefalign.rewards import CompositeReward, JitterPenalty, SyncExpert

    from conftest import tiny_wan

    def fields(jitter):
        reward = CompositeReward([SyncExpert(), jitter])
        return AlignmentModule(tiny_wan(), FlowMatching(), algorithm=GRPO(reward, group_size=2)).data_fields()

    assert "pose" in fields(JitterPenalty(implied="none", exclude_mouth=True))
    assert "pose" not in fields(JitterPenalty(implied="none"))
