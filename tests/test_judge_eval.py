"""Judge calibration: agreement, Kendall's tau-b and Spearman against hand computations, and ``prefalign judge-eval``
on TalkingShapes pairs with test judges (the true sync, random, dropping, pairwise with and without position bias)."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from prefalign import metrics
from prefalign.cli import main
from prefalign.data.errors import DataError
from prefalign.data.synthetic import write_dataset
from prefalign.judge_eval import (COLUMNS, agreement_stats, average_ranks, judge_eval_command, kendall_tau_b,
                                  position_bias_rate, spearman)
from prefalign.rewards.base import Reward

TEXT = "a cartoon face talking in front of a plain background"  # what write_dataset gives every clip
ASPECTS = ["lip_sync", "expressiveness", "motion_quality"]
NUM_CLIPS = 6


# --- test judges ------------------------------------------------------------------------------------------------------
class SyncJudge(Reward):
    """A judge that knows the truth: its lip sync is the TalkingShapes sync score mapped to [0, 1]."""

    def __init__(self, sample_rate: int = 16000, fps: float = 25.0):
        self.sample_rate = sample_rate
        self.fps = fps
        self.aspects = list(ASPECTS)
        self.aspect_terms = [f"judge/{aspect}" for aspect in ASPECTS]
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self.shapes = []

    def score(self, videos, cond):
        self.stats["requests"] += videos.shape[0]
        self.shapes.append((tuple(videos.shape), tuple(cond["audio"].shape), tuple(cond["reference"].shape)))
        assert len(cond["text"]) == videos.shape[0] and cond["pose"].shape[:2] == videos.shape[:2]
        sync = metrics.sync_score(videos, cond["audio"], self.sample_rate, self.fps)
        return {
            "judge/lip_sync": (sync + 1) / 2,
            "judge/expressiveness": videos.mean(dim=(1, 2, 3, 4)),
            "judge/motion_quality": 1 - (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4)),
            "judge_valid": torch.ones(videos.shape[0]),
        }


class RandomJudge(SyncJudge):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, videos, cond):
        self.stats["requests"] += videos.shape[0]
        self.shapes.append((tuple(videos.shape), tuple(cond["audio"].shape), tuple(cond["reference"].shape)))
        return {term: torch.rand(videos.shape[0], generator=self.generator) for term in self.aspect_terms}


class DroppingJudge(SyncJudge):
    """Drops (NaN, one failure each) the videos whose text is marked ``[drop]``."""

    def score(self, videos, cond):
        terms = super().score(videos, cond)
        dropped = torch.tensor(["[drop]" in text for text in cond["text"]])
        self.stats["failures"] += int(dropped.sum())
        return {name: torch.where(dropped, torch.nan, value) for name, value in terms.items()}


class PairwiseJudge(SyncJudge):
    """A pairwise judge: its preference for the first video is the difference of the sync judge's scores, plus
    ``bias`` (a judge that favours the first position whatever it is shown)."""

    def __init__(self, bias: float = 0.0):
        super().__init__()
        self.bias = bias

    def compare(self, videos_a, videos_b, cond):
        a, b = super().score(videos_a, cond), super().score(videos_b, cond)
        return {term: a[term] - b[term] + self.bias for term in self.aspect_terms}


# --- data -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 TalkingShapes clips, each with a rejected clip whose mouth is shifted, jittered or frozen."""
    return write_dataset(tmp_path_factory.mktemp("judge_eval"), num_clips=NUM_CLIPS, seed=3,
                         rejected=("shift", "jitter", "freeze"))


def label_rows(root=None, drop=()):
    """Human labels of (clip, rejected): lip sync always prefers the clip (a or b, by the order), expression and
    motion are arbitrary; the first pair again, judged a tie. Paths relative to the dataset, or under ``root``."""
    prefix = "" if root is None else f"{root}/"
    rows = []
    for i in range(NUM_CLIPS):
        clip, rejected = f"{prefix}clips/clip_{i:05d}.mp4", f"{prefix}clips/clip_{i:05d}_rejected.mp4"
        swap = i % 2 == 1
        row = {
            "id": f"pair{i}",
            "video_a": rejected if swap else clip,
            "video_b": clip if swap else rejected,
            "audio": f"{prefix}clips/clip_{i:05d}.wav",
            "reference": f"{prefix}clips/clip_{i:05d}_ref.png",
            "pose": f"{prefix}clips/clip_{i:05d}_pose.npy",
            "text": f"[drop] {TEXT}" if i in drop else TEXT,
            "lip_sync": "b" if swap else "a",
            "expression": ("a", "b", "tie")[i % 3],
        }
        if i != 5:
            row["motion"] = "tie" if i == 2 else row["lip_sync"]
        rows.append(row)
    rows.append({**rows[0], "id": "pair0-again", "lip_sync": "tie"})
    return rows


def write_labels(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def labels(dataset):
    return write_labels(dataset.parent / "labels.jsonl", label_rows())


def by_aspect(report):
    return {row["aspect"]: row for row in report["rows"]}


# --- the statistics ---------------------------------------------------------------------------------------------------
def brute_force_tau_b(x, y):
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sign = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
        concordant += sign > 0
        discordant += sign < 0
        tied_x += x[i] == x[j]
        tied_y += y[i] == y[j]
    total = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((total - tied_x) * (total - tied_y))


def test_kendall_tau_b_by_hand():
    human = [1, 1, -1, 0, -1]
    difference = [0.3, 0.1, -0.2, 0.0, 0.1]
    # The 10 pairs: (0,1) and (2,4) tie in x, (1,4) ties in y; (3,4) is discordant (x up, y down); the other 6 are
    # concordant. n0 = 10, n1 = 2 (the two 1s, the two -1s), n2 = 1 (the two 0.1s): (6 - 1) / sqrt(8 * 9).
    assert kendall_tau_b(human, difference) == pytest.approx(5 / math.sqrt(72))
    assert kendall_tau_b(difference, human) == pytest.approx(5 / math.sqrt(72))  # symmetric
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))  # a constant side: undefined
    assert math.isnan(kendall_tau_b([1], [2]))
    rng = np.random.default_rng(0)
    for _ in range(5):  # labels with ties against scores with ties
        x, y = rng.integers(-1, 2, 40), rng.integers(0, 6, 40) / 5
        assert kendall_tau_b(x, y) == pytest.approx(brute_force_tau_b(x, y))
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return
    assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)
    assert kendall_tau_b(human, difference) == pytest.approx(kendalltau(human, difference).statistic)


def test_tau_refuses_non_finite_values():
    with pytest.raises(ValueError, match="finite"):
        kendall_tau_b([1, 0], [np.nan, 1])


def test_spearman_with_ties_by_hand():
    assert average_ranks([3, 1, 2, 2]).tolist() == [4, 1, 2.5, 2.5]
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4], centred [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]:
    # 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # only the order counts
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return
    assert spearman([1, 2, 2, 3, 0], [1, 3, 2, 4, 4]) == pytest.approx(spearmanr([1, 2, 2, 3, 0], [1, 3, 2, 4, 4])[0])


def test_agreement_counts_ties_drops_and_judge_ties():
    human = [1, -1, 1, 0, -1, 1]
    score_a = [1.0, 0.25, 0.5, 0.25, np.nan, 0.5]  # binary fractions: the differences are exact
    score_b = [0.25, 0.75, 0.5, 0.75, 0.25, 1.0]
    stats = agreement_stats(human, score_a, score_b)
    # Compared: pairs 0, 1, 2, 5 (3 is a human tie, 4 dropped); 0 and 1 agree, 2 is a judge tie, 5 disagrees.
    assert stats == dict(pairs=6, human_ties=1, judge_ties=1, dropped=1, agreement=0.5,
                         kendall_tau=pytest.approx(kendall_tau_b([1, -1, 1, 0, 1], [0.75, -0.5, 0, -0.5, -0.5])))
    assert agreement_stats([0, 0], [1, 2], [2, 1])["agreement"] is None  # nothing to agree on


def test_position_bias_rate():
    assert position_bias_rate([0.5, -0.2, 0.1, np.nan], [-0.5, 0.3, 0.2, 1.0]) == pytest.approx(1 / 3)
    assert position_bias_rate([1.0, -1.0], [1.0, -1.0]) == 1.0  # the first, then the second, both times
    assert position_bias_rate([0.0], [0.0]) == 0.0  # no preference is no bias
    assert position_bias_rate([np.nan], [1.0]) is None


# --- the command ------------------------------------------------------------------------------------------------------
def test_a_judge_of_the_true_sync_agrees_with_humans_and_the_truth(dataset, labels, tmp_path, capsys):
    judge = SyncJudge()
    path = judge_eval_command(str(labels), judge, str(tmp_path / "out"), synth=str(dataset), batch_size=4,
                              device="cpu")
    report = json.loads(path.read_text())
    rows = by_aspect(report)
    assert report["aspects"] == {"lip_sync": "judge/lip_sync", "expression": "judge/expressiveness",
                                 "motion": "judge/motion_quality"}
    lip = rows["lip_sync"]
    assert (lip["pairs"], lip["human_ties"], lip["dropped"], lip["judge_ties"]) == (7, 1, 0, 0)
    assert lip["agreement"] == 1.0 and lip["kendall_tau"] > 0.5
    assert (rows["motion"]["pairs"], rows["motion"]["human_ties"]) == (6, 1)  # one row judges no motion
    assert report["spearman_sync"] == pytest.approx(1.0)
    assert report["synth_videos"] == 2 * NUM_CLIPS and report["synth_dropped"] == 0
    # The labels' 12 videos are the --synth ones, with the same conditions: each is scored once.
    assert report["totals"]["videos"] == 2 * NUM_CLIPS == judge.stats["requests"]
    assert all(shape[0][0] <= 4 for shape in judge.shapes)
    assert report["judge_kind"] == "pointwise" and all(row["position_bias"] is None for row in report["rows"])
    assert all(row["failure_rate"] == 0 and row["requests_per_s"] > 0 for row in report["rows"])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == list(COLUMNS) and "spearman(judge/lip_sync, true sync)" in printed


def test_a_random_judge_scores_frames_capped(labels, tmp_path):
    judge = RandomJudge(seed=1)
    path = judge_eval_command(str(labels), judge, str(tmp_path / "out"), num_frames=9, batch_size=3, device="cpu")
    report = json.loads(path.read_text())
    for row in report["rows"]:
        assert -1 <= row["kendall_tau"] <= 1 and 0 <= row["agreement"] <= 1
    # 9 frames of 32x32, 9 frames of 16 kHz audio at 25 fps, the reference image; at most 3 videos a call.
    assert {shape[1:] for shape, _, _ in judge.shapes} == {(9, 3, 32, 32)}
    assert {audio[1] for _, audio, _ in judge.shapes} == {9 * 640}
    assert sum(shape[0] for shape, _, _ in judge.shapes) == 2 * NUM_CLIPS and max(s[0] for s, _, _ in judge.shapes) == 3


def test_dropped_videos_are_counted_with_the_failure_rate(dataset, tmp_path):
    labels = write_labels(tmp_path / "labels.jsonl", label_rows(root=dataset.parent, drop=(1, 3)))
    path = judge_eval_command(str(labels), DroppingJudge(), str(tmp_path / "out"), device="cpu")
    report = json.loads(path.read_text())
    lip = by_aspect(report)["lip_sync"]
    assert lip["dropped"] == 2 and lip["agreement"] == 1.0  # over the 4 pairs left that humans did not tie
    assert report["totals"]["failures"] == 4 and lip["failure_rate"] == pytest.approx(4 / 12)


@pytest.mark.parametrize("bias, expected", [(0.0, 0.0), (10.0, 1.0)])
def test_a_pairwise_judge_is_asked_both_ways(labels, tmp_path, bias, expected):
    report = json.loads(judge_eval_command(str(labels), PairwiseJudge(bias), str(tmp_path / "out"),
                                           aspects={"lip_sync": "judge/lip_sync"}, device="cpu").read_text())
    assert report["judge_kind"] == "pairwise"
    assert [row["aspect"] for row in report["rows"]] == ["lip_sync"]
    assert report["rows"][0]["position_bias"] == expected


def test_the_cli_writes_the_table_the_report_and_the_plot(labels, tmp_path, capsys):
    out = tmp_path / "cli"
    main(["judge-eval", "--labels", str(labels), "--judge.class_path", "test_judge_eval.SyncJudge", "--out", str(out),
          "--batch_size", "5", "--device", "cpu"])
    with open(out / "judge_eval.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(COLUMNS) and [row["aspect"] for row in table] == ["lip_sync", "expression", "motion"]
    assert table[0]["judge_term"] == "judge/lip_sync" and float(table[0]["agreement"]) == 1.0
    assert table[0]["position_bias"] == ""
    report = json.loads((out / "judge_eval.json").read_text())
    assert {"labels", "judge", "judge_kind", "rows", "totals"} <= set(report) and "spearman_sync" not in report
    assert (out / "judge_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "judge/expressiveness" in capsys.readouterr().out
    # The judge as a YAML file of class_path and init_args.
    (tmp_path / "judge.yaml").write_text("class_path: test_judge_eval.RandomJudge\ninit_args:\n  seed: 2\n")
    main(["judge-eval", "--labels", str(labels), "--judge", str(tmp_path / "judge.yaml"), "--out", str(tmp_path / "y"),
          "--aspects", '{"motion": "judge/motion_quality"}', "--device", "cpu"])
    report = json.loads((tmp_path / "y" / "judge_eval.json").read_text())
    assert report["judge_class"] == "test_judge_eval.RandomJudge" and list(report["aspects"]) == ["motion"]


# --- bad input --------------------------------------------------------------------------------------------------------
def test_an_unknown_label_value_names_the_line_and_field(dataset, tmp_path):
    rows = label_rows(root=dataset.parent)
    rows[1]["lip_sync"] = "maybe"
    labels = write_labels(tmp_path / "labels.jsonl", rows)
    expected = r"labels.jsonl: field 'lip_sync': line 2: expected one of a, b, tie; got \"maybe\""
    with pytest.raises(DataError, match=expected):
        judge_eval_command(str(labels), SyncJudge(), str(tmp_path / "out"), device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_missing_video_names_the_file_and_the_labels_line(dataset, tmp_path):
    rows = label_rows(root=dataset.parent)
    rows[2]["video_b"] = str(dataset.parent / "clips" / "gone.mp4")
    labels = write_labels(tmp_path / "labels.jsonl", rows)
    judge = SyncJudge()
    with pytest.raises(DataError, match=r"gone.mp4: field 'video': file not found \(named by line 3 \('video_b'\)"):
        judge_eval_command(str(labels), judge, str(tmp_path / "out"), device="cpu")
    assert judge.stats["requests"] == 0  # refused before the first request


def test_a_missing_labels_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: labels manifest not found"):
        judge_eval_command(str(tmp_path / "nope.jsonl"), SyncJudge(), str(tmp_path / "out"))


def test_unknown_aspect_mappings_list_the_judges_terms(labels, tmp_path):
    with pytest.raises(ValueError, match=r"'lip_sync' to 'judge/lipsync'.*\['judge/lip_sync', 'judge/expressiveness'"):
        judge_eval_command(str(labels), SyncJudge(), str(tmp_path / "out"), aspects={"lip_sync": "judge/lipsync"})
    with pytest.raises(DataError, match=r"field 'smile': no row labels the aspect 'smile'"):
        judge_eval_command(str(labels), SyncJudge(), str(tmp_path / "out"), aspects={"smile": "judge/lip_sync"})
    with pytest.raises(ValueError, match="no aspect of .* matches a term of SyncJudge"):
        judge = SyncJudge()
        judge.aspects, judge.aspect_terms = ["lips"], ["other/lips"]
        judge_eval_command(str(labels), judge, str(tmp_path / "out"))


def test_batches_hold_at_most_batch_size_decoded_clips_whatever_their_shapes():
    from prefalign.judge_eval import _batches

    held, peak = set(), 0

    def decode(unit):
        nonlocal peak
        held.add(unit)
        peak = max(peak, len(held))
        return unit

    shapes = [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 0]  # clips of many shapes, as real labels have
    seen = []
    for batch in _batches(range(len(shapes)), decode, lambda unit: shapes[unit], batch_size=3):
        assert len(batch) <= 3 and len({shapes[u] for u, _ in batch}) == 1
        seen += [u for u, _ in batch]
        held.difference_update(u for u, _ in batch)
    assert sorted(seen) == list(range(len(shapes))) and peak <= 3
