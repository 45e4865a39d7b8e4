"""Pair curation: TalkingShapes pairs, best/worst of N samples under a reward, human labels; DPO trains on them."""

import json
from pathlib import Path

import pytest

from prefalign import metrics
from prefalign.cli import main
from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.pairs import import_labels

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "recipes" / "demo" / "sft.yaml"


@pytest.fixture(scope="module")
def synth_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    return write_dataset(out, num_clips=6, seed=3, cfg=TalkingShapesConfig(), rejected=("shift", "jitter", "freeze"))


def test_synthetic_pairs_prefer_the_ground_truth(synth_pairs):
    dm = PortraitDataModule(train=str(synth_pairs), val_fraction=0.0, batch_size=6)
    batch = next(iter(dm._loader("train", shuffle=False)))
    assert batch["rejected"].shape == batch["video"].shape
    chosen = metrics.sync_score(batch["video"], batch["audio"], 16000, 25)
    rejected = metrics.sync_score(batch["rejected"], batch["audio"], 16000, 25)
    assert (chosen > 0.9).all() and chosen.mean() - rejected.mean() > 0.7
    # Only the mouth differs: identity is the same, so a DPO model cannot win by changing the face.
    assert (metrics.identity_drift(batch["rejected"], batch["reference"]) < 0.05).all()


def test_rejected_of_another_length_is_a_clear_error(synth_pairs, tmp_path):
    from prefalign.data import media

    rows = [json.loads(line) for line in synth_pairs.read_text().splitlines()][:1]
    frames, fps = media.read_video(synth_pairs.parent / rows[0]["rejected"])
    media.write_video(tmp_path / "short.mp4", frames[:9], fps)
    rows[0] = {k: str(synth_pairs.parent / v) if k in ("video", "audio", "reference", "pose") else v for k, v in rows[0].items()}
    rows[0]["rejected"] = str(tmp_path / "short.mp4")
    (tmp_path / "m.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="rejected clip is") as error:
        PortraitDataModule(train=str(tmp_path / "m.jsonl"), val_fraction=0.0).dataset("train")[0]
    assert "field 'rejected'" in str(error.value) and "short.mp4" in str(error.value)


def test_human_labels_become_oriented_pairs(tmp_path):
    rows = [
        {"id": "x", "video_a": "a.mp4", "video_b": "b.mp4", "audio": "s.wav", "reference": "r.png",
         "lip_sync": "b", "expression": "b", "motion": "a"},
        {"id": "y", "video_a": "c.mp4", "video_b": "d.mp4", "lip_sync": "tie", "overall": "a"},
        {"id": "z", "video_a": "e.mp4", "video_b": "f.mp4", "lip_sync": "tie"},
    ]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [json.loads(line) for line in import_labels(str(tmp_path / "labels.jsonl"), str(tmp_path / "out")).read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["x", "y"]  # the all-tie judgement is left out
    assert pairs[0]["video"].endswith("b.mp4") and pairs[0]["rejected"].endswith("a.mp4")
    assert pairs[0]["labels"] == {"lip_sync": 1, "expression": 1, "motion": -1}
    assert pairs[1]["video"].endswith("c.mp4") and pairs[1]["labels"] == {"lip_sync": 0}

    (tmp_path / "bad.jsonl").write_text(json.dumps({"video_a": "a", "video_b": "b", "motion": "left"}) + "\n")
    with pytest.raises(DataError) as error:
        import_labels(str(tmp_path / "bad.jsonl"), str(tmp_path / "out2"))
    assert "bad.jsonl" in str(error.value) and "field 'motion'" in str(error.value)


def test_sampled_pairs_then_dpo_trains_on_them(talkingshapes, tmp_path, monkeypatch):
    """`prefalign pairs` samples from a checkpoint, keeps best and worst under the sync expert, and the DPO
    recipe then trains on the pairs it wrote."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(DEMO), "--data.train", str(talkingshapes), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0"])
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    main(["pairs", "--recipe", str(DEMO), "--conditions", str(talkingshapes), "--out", str(tmp_path / "pairs"),
          "--ckpt_path", str(checkpoint), "--num_samples", "3", "--min_gap", "0.0", "--num_steps", "2",
          "--overrides", '["--data.num_frames", "17"]'])
    pairs = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 12
    assert all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
    assert all((tmp_path / "pairs" / p["rejected"]).exists() for p in pairs)

    main(["fit", "--config", str(ROOT / "recipes" / "demo" / "dpo.yaml"), "--data.train", str(tmp_path / "pairs" / "pairs.jsonl"),
          "--data.val", str(talkingshapes), "--model.init_weights", "null", "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"])
    metrics_csv = next(tmp_path.glob("runs/demo-dpo/csv/*/metrics.csv")).read_text()
    assert "train/implicit_accuracy" in metrics_csv and "train/reward_margin" in metrics_csv


def test_dpo_needs_rejected_at_setup(talkingshapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="DiffusionDPO algorithm needs the field 'rejected'"):
        main(["fit", "--config", str(ROOT / "recipes" / "demo" / "dpo.yaml"), "--data.train", str(talkingshapes),
              "--model.init_weights", "null", "--trainer.max_steps", "1"])
