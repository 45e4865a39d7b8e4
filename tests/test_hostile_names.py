"""Hostile names and damaged checkpoints: ids that try to write outside the output folder or onto each other's
files (predict, test, validation samples, pairs, labels, preprocess, hub), checkpoints cut short by a kill (also with
the checkpoints on another filesystem than ``$TMPDIR``), and exports to a dtype that would zero the weights.

Each hostile input is a ``hostile.Case``, run in a forked child under a memory cap and a watchdog."""

import json
import os
import signal
import subprocess
import time
import traceback
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from conftest import TINY_WAN_RECIPE
from hostile import Case, check, run
from prefalign.callbacks import VideoWriter
from prefalign.checkpoints import AtomicCheckpointIO, check_checkpoint, checkpoint_damage
from prefalign.cli import export, main
from prefalign.data import media
from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.files import MAX_NAME_BYTES, inside, safe_name, temp_path
from prefalign.hub import write_adapter
from prefalign.pairs import import_labels, sample_pairs

NAME_LIMIT = 255  # bytes of one file name on ext4, xfs, tmpfs, NFS, Lustre
#: Address space a case that builds a model and runs the CLI may add (decoder and BLAS threads reserve a lot of it).
CLI_MEMORY_MB = 6144

#: Hostile ids by name; ``{root}`` is the case's own folder (an absolute id must stay in the test's tmp folder even
#: where the code under test is broken).
HOSTILE_IDS = {
    "traversal": "../../escaped",
    "deep-traversal": "../" * 12 + "tmp/escaped",
    "absolute": "{root}/absolute/escaped",
    "backslashes": "..\\..\\escaped",
    "empty": "",
    "dot": ".",
    "dotdot": "..",
    "hidden": ".bashrc",
    "nul": "clip\x00.mp4",
    "newline": "clip\nname",
    "long": "x" * 10_000,
    "long-unicode": "é" * 300,
    "unicode": "説話者/ünïcödé\u202egnp.exe",
    "tilde": "~root",
}


def hostile_id(name: str, root: Path) -> str:
    return HOSTILE_IDS[name].replace("{root}", str(root))


def tiny_video(n: int, frames: int = 2) -> torch.Tensor:
    """``n`` distinct 16x16 clips: clip i is uniformly grey level i, so a file tells which clip it holds."""
    levels = torch.linspace(0.1, 0.9, max(n, 2))[:n]
    return levels.view(n, 1, 1, 1, 1).expand(n, frames, 3, 16, 16).contiguous()


def grey_level(path: Path) -> float:
    frames, _ = media.read_video(path)
    return float(frames.astype("float32").mean() / 255)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def fenced(root: Path) -> tuple[Path, set[Path]]:
    """An output folder two levels inside ``root`` and what ``root`` holds before the case writes."""
    out = root / "a" / "b" / "out"
    out.mkdir(parents=True)
    (root / "fence.txt").write_text("must stay alone")
    return out, files_under(root)


def assert_only_inside(root: Path, out: Path, before: set[Path]) -> None:
    outside = {p for p in files_under(root) - before if out.resolve() not in p.resolve().parents}
    assert not outside, f"written outside {out}: {sorted(map(str, outside))}"


@pytest.fixture(scope="module", autouse=True)
def warm_cli(clips, tmp_path_factory):
    """Parse a recipe once in this process, so that every forked case finds jsonargparse's signature and docstring
    caches filled (the first parse in a process takes seconds)."""
    import contextlib
    import io
    import sys
    from unittest import mock

    root = tmp_path_factory.mktemp("warm")
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", ["prefalign"]), \
            pytest.raises(SystemExit):
        main(["fit", "--config", str(tiny_recipe(root, clips, checkpoints=root)), "--print_config"])


# --- one safe-name function -------------------------------------------------------------------------------------------
def names_case(name: str, root: Path) -> Case:
    def act():
        clip_id = hostile_id(name, root)
        stem = safe_name(clip_id)
        file = f"{stem}_rejected.mp4"
        assert "/" not in stem and "\\" not in stem and "\x00" not in stem and stem not in ("", ".", "..")
        assert not stem.startswith("."), stem
        assert len(file.encode()) <= NAME_LIMIT and len(temp_path(Path(file)).name.encode()) <= NAME_LIMIT
        assert len(stem.encode()) <= MAX_NAME_BYTES
        assert inside(root, file).parent == root
        assert safe_name(clip_id) == stem  # deterministic

    return Case(f"safe-name-{name}", act, expect="ok", timeout=20)


@pytest.mark.parametrize("name", list(HOSTILE_IDS))
def test_every_hostile_id_becomes_one_plain_file_name(name, tmp_path):
    assert check(names_case(name, tmp_path)) is None


def test_distinct_ids_never_share_a_file_name():
    ids = ["a/b", "a_b", "a\\b", "a b", "a\x00b", "", "_", ".", "..", "...", "x" * 10_000, "x" * 10_001,
           "x" * MAX_NAME_BYTES, "x" * (MAX_NAME_BYTES + 1), "é", "e\u0301", "a_b~" + safe_name("a/b").split("~")[1]]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids), [n[:40] for n in names]
    assert safe_name("clip_00001") == "clip_00001" and safe_name("説話者-1") == "説話者-1"  # plain ids stay readable


# --- predict's writer and validation samples: media.write_clips ------------------------------------------------------
def write_clips_case(name: str, root: Path) -> Case:
    def act():
        out, before = fenced(root)
        ids = [hostile_id(name, root), "plain"]
        paths = media.write_clips(out, tiny_video(2), ids, fps=25.0)
        assert_only_inside(root, out, before)
        assert len(set(paths)) == 2 and all(p.parent == out and p.is_file() for p in paths)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temporary file left
        assert abs(grey_level(paths[0]) - 0.1) < 0.05 and abs(grey_level(paths[1]) - 0.9) < 0.05

    return Case(f"write-clips-{name}", act, expect="ok", timeout=30)


@pytest.mark.parametrize("name", list(HOSTILE_IDS))
def test_write_clips_keeps_every_hostile_id_inside_its_folder(name, tmp_path):
    assert check(write_clips_case(name, tmp_path)) is None


def video_writer_case(ids: list[str], root: Path, must_name=(), expect="ok") -> Case:
    def act():
        out, before = fenced(root)
        writer = VideoWriter(str(out))
        trainer = SimpleNamespace(datamodule=None)
        module = SimpleNamespace(denoiser=SimpleNamespace(fps=25.0))
        prediction = {"id": ids, "video": tiny_video(len(ids)), "audio": None}
        writer.write_on_batch_end(trainer, module, prediction, None, None, 0)
        assert_only_inside(root, out, before)
        written = sorted(out.iterdir())
        assert len(written) == len(ids), [p.name for p in written]
        levels = sorted(grey_level(p) for p in written)  # every clip kept: none overwrote another
        assert all(abs(a - b) < 0.05 for a, b in zip(levels, torch.linspace(0.1, 0.9, len(ids)).tolist()))

    return Case(f"video-writer-{'-'.join(safe_name(i)[:8] for i in ids)}", act, must_name=must_name, expect=expect,
                timeout=30)


def test_predict_writer_colliding_ids_get_one_file_each(tmp_path):
    assert check(video_writer_case(["a/b", "a_b", "a\\b", "a b"], tmp_path)) is None


def test_predict_writer_hostile_ids_in_one_batch(tmp_path):
    ids = [hostile_id(name, tmp_path) for name in ("traversal", "absolute", "dotdot", "empty", "long", "unicode")]
    assert check(video_writer_case(ids, tmp_path)) is None


def test_predict_writer_refuses_a_repeated_id_in_a_batch(tmp_path):
    assert check(video_writer_case(["same", "same"], tmp_path, must_name=("'same'", "unique"), expect="error")) is None


def validation_samples_case(root: Path) -> Case:
    """``AlignmentModule.log_samples`` (validation samples): a repeated id is written once, colliding ids apart."""

    def act():
        from prefalign.module import AlignmentModule

        log_dir, before = fenced(root)
        ids = ["same", "same", "a/b", "a_b", hostile_id("traversal", root)]
        video = tiny_video(len(ids), frames=4)  # the sample grid shows 4 frames
        batch = {"id": ids, "video": video, "reference": video[:, 0], "audio": torch.zeros(len(ids), 1280)}
        module = SimpleNamespace(trainer=SimpleNamespace(loggers=[], log_dir=str(log_dir)), global_step=3,
                                 denoiser=SimpleNamespace(fps=25.0), sample_rate=16000)
        AlignmentModule.log_samples(module, video, batch)
        assert_only_inside(root, log_dir, before)
        written = sorted((log_dir / "samples" / "step_000003").iterdir())
        assert len(written) == 4, [p.name for p in written]
        levels = sorted(grey_level(p) for p in written)  # the first "same", and each of the others
        assert all(abs(a - b) < 0.05 for a, b in zip(levels, [0.1, 0.5, 0.7, 0.9]))

    return Case("validation-samples-ids", act, expect="ok", timeout=30)


def test_validation_samples_write_one_video_per_id(tmp_path):
    assert check(validation_samples_case(tmp_path)) is None


def symlinked_file_case(root: Path) -> Case:
    """A planted symlink in the output folder pointing outside: refused, the outside file untouched."""

    def act():
        out, _ = fenced(root)
        victim = root / "victim.mp4"
        victim.write_bytes(b"precious")
        (out / "clip.mp4").symlink_to(victim)
        try:
            media.write_clips(out, tiny_video(1), ["clip"], fps=25.0)
        finally:
            assert victim.read_bytes() == b"precious"

    return Case("write-clips-symlink-escape", act, must_name=("outside", "clip.mp4"), errors=(ValueError,), timeout=30)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    assert check(symlinked_file_case(tmp_path)) is None


# --- data loading: repeated ids are refused for predict and test (they name the outputs) -----------------------------
@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Four TalkingShapes clips (17 frames, 32x32) and their manifest."""
    return write_dataset(tmp_path_factory.mktemp("clips"), num_clips=4, seed=3, cfg=TalkingShapesConfig())


def manifest_with_ids(clips: Path, ids: list[str], path: Path) -> Path:
    videos = [json.loads(line)["video"] for line in clips.read_text().splitlines()]
    rows = [{"id": clip_id, "video": str(clips.parent / videos[i % len(videos)])} for i, clip_id in enumerate(ids)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def duplicate_split_case(split: str, clips: Path, root: Path) -> Case:
    def act():
        manifest = manifest_with_ids(clips, ["a", "same", "b", "same"], root / f"{split}.jsonl")
        datamodule = PortraitDataModule(**{split: str(manifest)}, num_frames=9, eval_batch_size=2)
        getattr(datamodule, f"{split}_dataloader")()

    return Case(f"duplicate-ids-{split}", act, must_name=(f"{split}.jsonl", "rows 1 and 3", "'same'", "field 'id'"),
                errors=(DataError,), timeout=30)


@pytest.mark.parametrize("split", ["predict", "test"])
def test_repeated_ids_are_refused_at_loading(split, clips, tmp_path):
    assert check(duplicate_split_case(split, clips, tmp_path)) is None


# --- the CLI end to end: test and pairs ------------------------------------------------------------------------------
def tiny_recipe(root: Path, data: Path, checkpoints: Path = None, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(root / "run"), **trainer},
        "model": {"denoiser": TINY_WAN_RECIPE, "process": {"class_path": "prefalign.processes.FlowMatching"},
                  "algorithm": {"class_path": "prefalign.algorithms.SFT"}, "sampling": {"num_steps": 1}},
        "data": {"train": str(data), "val_fraction": 0.0, "batch_size": 2, "eval_batch_size": 8, "num_frames": 9},
    }
    if checkpoints is not None:
        config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"dirpath": str(checkpoints), "save_last": True,
                                                         "save_top_k": 0, "every_n_train_steps": 1}}]
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


#: Ids for the end-to-end runs: every hostile kind at once, with the pair that collides once sanitised.
E2E_NAMES = ["traversal", "absolute", "empty", "dotdot", "nul", "long", "unicode"]


def e2e_ids(root: Path) -> list[str]:
    return [hostile_id(name, root) for name in E2E_NAMES] + ["a/b", "a_b"]


def evaluation_case(clips: Path, root: Path) -> Case:
    def act():
        ids = e2e_ids(root)
        manifest, recipe = manifest_with_ids(clips, ids, root / "test.jsonl"), tiny_recipe(root, clips)
        out, before = fenced(root)
        main(["test", "--config", str(recipe), "--data.test", str(manifest), "--model.evaluation_dir", str(out)])
        assert_only_inside(root, out, before | files_under(root / "run"))
        with open(out / "metrics.csv", newline="") as handle:
            import csv

            rows = list(csv.DictReader(handle))
        assert [row["id"] for row in rows] == ids
        videos = [row["video"] for row in rows]
        assert len(set(videos)) == len(ids), videos  # one file per row, none shared
        assert sorted(f"videos/{p.name}" for p in (out / "videos").iterdir()) == sorted(videos)
        clips_json = json.loads((out / "metrics.json").read_text())["clips"]
        assert [(c["id"], c["video"]) for c in clips_json] == [(row["id"], row["video"]) for row in rows]

    return Case("test-command-hostile-ids", act, expect="ok", timeout=90, memory_mb=CLI_MEMORY_MB)


def test_the_test_command_writes_one_video_per_row_inside_its_folder(clips, tmp_path):
    assert check(evaluation_case(clips, tmp_path)) is None


def pairs_case(clips: Path, root: Path) -> Case:
    def act():
        ids = e2e_ids(root)
        conditions, recipe = manifest_with_ids(clips, ids, root / "conditions.jsonl"), tiny_recipe(root, clips)
        out, before = fenced(root)
        path = sample_pairs(str(recipe), str(conditions), str(out), num_samples=2, min_gap=0.0, batch_size=8,
                            num_steps=1)
        assert_only_inside(root, out, before)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in records] == ids
        files = [r[key] for r in records for key in ("video", "rejected")]
        assert len(set(files)) == 2 * len(ids) and all((out / f).is_file() for f in files)
        assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(Path(f).name for f in files)

    return Case("pairs-command-hostile-ids", act, expect="ok", timeout=90, memory_mb=CLI_MEMORY_MB)


def test_pairs_writes_every_clip_inside_out(clips, tmp_path):
    assert check(pairs_case(clips, tmp_path)) is None


def pairs_duplicates_case(clips: Path, root: Path) -> Case:
    def act():
        conditions = manifest_with_ids(clips, ["same", "other", "same"], root / "conditions.jsonl")
        sample_pairs(str(tiny_recipe(root, clips)), str(conditions), str(root / "out"), num_samples=2, num_steps=1)

    return Case("pairs-command-duplicate-ids", act, must_name=("conditions.jsonl", "rows 0 and 2", "'same'"),
                errors=(DataError,), timeout=90, memory_mb=CLI_MEMORY_MB)


def test_pairs_refuses_repeated_ids_naming_the_rows(clips, tmp_path):
    assert check(pairs_duplicates_case(clips, tmp_path)) is None


# --- the other writers: labels, preprocess, hub -----------------------------------------------------------------------
def planted_symlink_case(name: str, root: Path, target_name: str, write) -> Case:
    """The output folder holds ``target_name`` as a symlink to a file outside it: the writer must refuse."""

    def act():
        out, _ = fenced(root)
        victim = root / "victim"
        victim.write_text("precious")
        (out / target_name).symlink_to(victim)
        try:
            write(out)
        finally:
            assert victim.read_text() == "precious"

    return Case(f"symlink-{name}", act, must_name=("outside", target_name), errors=(ValueError,), timeout=60,
                memory_mb=CLI_MEMORY_MB)


def labels_writer(out: Path) -> None:
    labels = out.parent / "labels.jsonl"
    labels.write_text(json.dumps({"id": "../../x", "video_a": "a.mp4", "video_b": "b.mp4", "lip_sync": "a"}) + "\n")
    import_labels(str(labels), str(out))


def preprocess_writer(clips: Path):
    def write(out: Path) -> None:
        from prefalign.preprocess import preprocess

        from conftest import tiny_wan

        datamodule = PortraitDataModule(train=str(clips), val_fraction=0.0, num_frames=9)
        preprocess(tiny_wan(), datamodule, out, batch_size=4)

    return write


def hub_writer(out: Path) -> None:
    state = {"denoiser.backbone.blocks.0.attn1.to_q.lora_A.default.weight": torch.zeros(4, 32),
             "denoiser.backbone.blocks.0.attn1.to_q.lora_B.default.weight": torch.zeros(32, 4)}
    lora = {"rank": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["to_q"], "train_new_modules": True}
    write_adapter({"state_dict": state, "prefalign": {"lora": lora, "denoiser": "WanDenoiser"}}, out)


def test_labels_refuse_a_symlinked_pairs_file(tmp_path):
    assert check(planted_symlink_case("labels", tmp_path, "pairs.jsonl", labels_writer)) is None


def test_preprocess_refuses_a_symlinked_shard(clips, tmp_path):
    case = planted_symlink_case("preprocess", tmp_path, "shard-00000.safetensors", preprocess_writer(clips))
    assert check(case) is None


def test_hub_folder_refuses_a_symlinked_card(tmp_path):
    assert check(planted_symlink_case("hub", tmp_path, "README.md", hub_writer)) is None


# --- damaged checkpoints: named, with the newest whole one beside them ------------------------------------------------
@pytest.fixture(scope="module")
def whole_checkpoint(clips, tmp_path_factory) -> Path:
    """A whole checkpoint of a one-step full fine-tuning fit through the CLI (made in a forked child too)."""
    root = tmp_path_factory.mktemp("whole")
    folder = root / "checkpoints"
    recipe = tiny_recipe(root, clips, checkpoints=folder)
    result = run(Case("make-checkpoint", lambda: main(["fit", "--config", str(recipe)]), expect="ok", timeout=120,
                      memory_mb=CLI_MEMORY_MB))
    assert result.passed, result.detail
    return folder / "last.ckpt"


def _zip_without(data: bytes, drop) -> bytes:
    import io

    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if not drop(info.filename):
                target.writestr(info, source.read(info.filename))
    return out.getvalue()


def _zip_with_bad_pickle(data: bytes) -> bytes:
    import io

    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            body = source.read(info.filename)
            target.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else body)
    return out.getvalue()


#: How a checkpoint gets damaged: its bytes from the whole file's (None: a folder in its place).
DAMAGE = {
    "empty": lambda whole: b"",
    "cut-at-1-byte": lambda whole: whole[:1],
    "cut-at-100-bytes": lambda whole: whole[:100],
    "cut-at-4-KiB": lambda whole: whole[:4096],
    "cut-in-half": lambda whole: whole[: len(whole) // 2],
    "cut-1-byte-short": lambda whole: whole[:-1],
    "random-bytes": lambda whole: __import__("random").Random(0).randbytes(len(whole)),
    "text": lambda whole: b"not a checkpoint\n",
    "zip-missing-tensor": lambda whole: _zip_without(whole, lambda name: name.endswith("/data/3")),
    "zip-missing-pickle": lambda whole: _zip_without(whole, lambda name: name.endswith("data.pkl")),
    "zip-bad-pickle": _zip_with_bad_pickle,
    "folder": None,
}


def damaged_folder(root: Path, whole: Path, damage: str, with_whole: bool = True) -> Path:
    """``root/checkpoints``: two whole checkpoints (step=1 older, step=2 newer), a newer empty step=3, and a
    damaged ``last.ckpt`` newest of all."""
    folder = root / "checkpoints"
    folder.mkdir(parents=True)
    data = whole.read_bytes()
    now = time.time()
    if with_whole:
        for name, age in (("step=1.ckpt", 30), ("step=2.ckpt", 20)):
            (folder / name).write_bytes(data)
            os.utime(folder / name, (now - age, now - age))
        (folder / "step=3.ckpt").write_bytes(b"")
        os.utime(folder / "step=3.ckpt", (now - 10, now - 10))
    target = folder / "last.ckpt"
    if DAMAGE[damage] is None:
        target.mkdir()
    else:
        target.write_bytes(DAMAGE[damage](data))
    return target


def damaged_check_case(damage: str, whole: Path, root: Path) -> Case:
    """What ``--ckpt_path`` (and loading ``last``) runs first: the file named as damaged, the newest whole one
    beside it."""

    def act():
        check_checkpoint(damaged_folder(root, whole, damage))

    return Case(f"check-{damage}", act, must_name=("last.ckpt", "damaged", "step=2.ckpt", "field 'ckpt_path'"),
                errors=(DataError,), timeout=30)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_kind_of_damage_is_named_with_the_newest_whole_checkpoint(damage, whole_checkpoint, tmp_path):
    assert check(damaged_check_case(damage, whole_checkpoint, tmp_path)) is None


def test_fit_from_a_damaged_ckpt_path_names_it_before_building_anything(clips, whole_checkpoint, tmp_path):
    def act():
        target = damaged_folder(tmp_path, whole_checkpoint, "empty")
        main(["fit", "--config", str(tiny_recipe(tmp_path, clips)), "--ckpt_path", str(target)])

    case = Case("fit-from-empty", act, must_name=("last.ckpt", "damaged", "empty", "step=2.ckpt"),
                errors=(DataError,), timeout=60, memory_mb=CLI_MEMORY_MB)
    assert check(case) is None


def test_a_damaged_checkpoint_alone_says_there_is_no_whole_one(clips, whole_checkpoint, tmp_path):
    def act():
        target = damaged_folder(tmp_path, whole_checkpoint, "cut-in-half", with_whole=False)
        main(["test", "--config", str(tiny_recipe(tmp_path, clips)), "--data.test", str(clips),
              "--ckpt_path", str(target)])

    case = Case("test-from-damaged-alone", act, must_name=("last.ckpt", "damaged", "no whole checkpoint"),
                errors=(DataError,), timeout=60, memory_mb=CLI_MEMORY_MB)
    assert check(case) is None


def test_ckpt_path_last_refuses_a_damaged_last_and_never_picks_a_temporary_file(clips, whole_checkpoint, tmp_path):
    """``--ckpt_path last`` as Lightning resolves it: a cut ``last.ckpt`` is named as damaged (the whole file a
    killed save left under its temporary name is not taken for a checkpoint)."""

    def act():
        target = damaged_folder(tmp_path, whole_checkpoint, "cut-in-half")
        (target.parent / ".last.ckpt.999999.tmp").write_bytes(whole_checkpoint.read_bytes())
        recipe = tiny_recipe(tmp_path, clips, checkpoints=target.parent)
        main(["fit", "--config", str(recipe), "--ckpt_path", "last", "--trainer.max_steps", "2"])

    case = Case("resume-from-last-damaged", act, must_name=("last.ckpt", "damaged", "step=2.ckpt"),
                errors=(DataError,), timeout=90, memory_mb=CLI_MEMORY_MB)
    assert check(case) is None


def test_whole_and_sharded_checkpoints_pass_the_check(whole_checkpoint, tmp_path):
    def act():
        assert checkpoint_damage(whole_checkpoint) is None
        sharded = tmp_path / "sharded.ckpt"
        sharded.mkdir()
        (sharded / "meta.pt").write_bytes(b"")  # FSDP's sharded layout: its shards are checked as they load
        assert checkpoint_damage(sharded) is None

    assert check(Case("whole-checkpoints", act, expect="ok", timeout=30)) is None


# --- checkpoints are written in their own folder, and a killed save's temporary file is cleaned -----------------------
def test_checkpoint_temporary_files_live_beside_the_checkpoint(tmp_path):
    """The save never touches ``$TMPDIR`` (here unusable), and removes what killed saves left, not a live one's."""

    def act():
        import tempfile

        tempfile.tempdir = str(tmp_path / "no-such-tmpdir")
        folder = tmp_path / "checkpoints"
        folder.mkdir()
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale, live = folder / f".last.ckpt.{dead.pid}.tmp", folder / f".last.ckpt.{os.getppid()}.tmp"
        stale.write_bytes(b"half a checkpoint")
        live.write_bytes(b"a save in progress")
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(7)}, folder / "last.ckpt")
        assert torch.load(folder / "last.ckpt", weights_only=True)["step"] == 7
        assert not stale.exists() and live.exists()
        assert sorted(p.name for p in folder.iterdir()) == sorted(["last.ckpt", live.name])

    assert check(Case("atomic-save-in-folder", act, expect="ok", timeout=30)) is None


class Ballast(L.Callback):
    """Makes every checkpoint 32 MiB, so that a save lasts long enough to be killed in the middle of it."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["ballast"] = torch.ones(8 * 2**20)


class StepMarker(L.Callback):
    """Writes the step reached to a file: once it says ``s``, the checkpoint of step ``s - 1`` is saved
    (checkpoint callbacks run after the others)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Path(self.path).write_text(str(trainer.global_step))


def _step(marker: Path) -> int:
    try:
        return int(marker.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return -1


def _folder_state(folder: Path) -> tuple:
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)))
    except FileNotFoundError:  # an entry renamed away between listing and stat
        return ("changing",)


def kill_fit_mid_save(args: list[str], folder: Path, marker: Path, tmpdir: Path, step: int) -> int:
    """Fork a ``prefalign fit`` (``main(args)``) with ``$TMPDIR`` at ``tmpdir``; once it has reached ``step`` (and saved
    the step before), SIGKILL it the moment the checkpoint folder changes (a save has begun). Returns its id."""
    marker.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the fit
        try:
            import tempfile

            os.environ["TMPDIR"] = str(tmpdir)
            tempfile.tempdir = str(tmpdir)
            main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)  # a fit that ends or fails on its own is not what this test wants
    deadline = time.monotonic() + 60
    while _step(marker) < step:
        assert time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0), "the fit ended or never saved"
        time.sleep(0.01)
    before = _folder_state(folder)
    while _folder_state(folder) == before:
        assert time.monotonic() < deadline, "no save began"
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return pid


def sigkill_case(clips: Path, root: Path, folder: Path, kills: int = 2) -> Case:
    def act():
        tmpdir = root / "tmpdir"  # on the disk; the checkpoints are on a tmpfs: a rename between them is a copy
        tmpdir.mkdir()
        marker = root / "step.txt"
        callbacks = json.dumps([{"class_path": f"{__name__}.Ballast"},
                                {"class_path": f"{__name__}.StepMarker", "init_args": {"path": str(marker)}}])
        recipe = tiny_recipe(root, clips, checkpoints=folder, max_steps=10_000)
        args = ["fit", "--config", str(recipe), "--trainer.callbacks+", callbacks]
        steps = []
        for round_ in range(kills):
            resume = ["--ckpt_path", "last"] if steps else []
            killed = kill_fit_mid_save(args + resume, folder, marker, tmpdir, (steps[-1] if steps else 0) + 2)
            last = folder / "last.ckpt"
            assert checkpoint_damage(last) is None, f"kill {round_ + 1}: {checkpoint_damage(last)}"
            steps.append(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
            # At most the temporary file of the save just killed: the resumed run's saves removed the older ones
            # (and `--ckpt_path last` did not take one for a checkpoint).
            leftovers = [p.name for p in folder.iterdir() if p.name != "last.ckpt"]
            assert all(name == f".last.ckpt.{killed}.tmp" for name in leftovers), leftovers
        assert steps == sorted(steps) and steps[-1] > steps[0], steps  # each resume went on from the last

    return Case("sigkill-fit-mid-save-across-filesystems", act, expect="ok", timeout=110, memory_mb=CLI_MEMORY_MB)


@pytest.fixture
def other_filesystem(tmp_path):
    """A tmpfs mounted in the test's folder: another filesystem than ``$TMPDIR``'s, as NFS or Lustre would be."""
    mount = tmp_path / "other-fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): needs root or "
                    "CAP_SYS_ADMIN")
    assert os.stat(mount).st_dev != os.stat(tmp_path).st_dev
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_sigkill_mid_save_across_filesystems_leaves_last_ckpt_whole(clips, tmp_path, other_filesystem):
    assert check(sigkill_case(clips, tmp_path, other_filesystem / "checkpoints")) is None


# --- export: floating dtypes only -------------------------------------------------------------------------------------
def export_case(dtype: str, whole: Path, root: Path) -> Case:
    out = root / "weights.safetensors"

    def refused():
        try:
            if dtype == "int8":  # the reported command, through the CLI
                main(["export", "--ckpt_path", str(whole), "--out", str(out), "--dtype", dtype])
            else:
                export(str(whole), str(out), dtype)
        finally:
            assert not out.exists()

    def written():
        from safetensors.torch import load_file

        export(str(whole), str(out), dtype)
        weights = load_file(out)
        state = torch.load(whole, map_location="cpu", weights_only=True)["state_dict"]
        assert weights and all(value.dtype == getattr(torch, dtype) for value in weights.values())
        for key, value in weights.items():
            torch.testing.assert_close(value, state["denoiser." + key].to(value.dtype))

    if dtype in ("float32", "float16", "bfloat16"):
        return Case(f"export-{dtype}", written, expect="ok", timeout=60)
    return Case(f"export-{dtype or 'empty'}", refused, must_name=("--dtype", "float32", "float16", "bfloat16"),
                errors=(ValueError,), timeout=60)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "int64", "bool", "float64", "banana", "", "float16"])
def test_export_writes_floating_dtypes_only(dtype, whole_checkpoint, tmp_path):
    assert check(export_case(dtype, whole_checkpoint, tmp_path)) is None
