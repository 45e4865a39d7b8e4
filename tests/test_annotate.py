"""`prefalign annotate` without a browser: the pairs file checked at start, the HTTP API and media ranges, durable
answers that resume, a SIGKILLed server, and `prefalign labels` merging annotators with their agreement (kappa)."""

import csv
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from prefalign.annotate import MAX_POST_BYTES, display_order, load_pairs, open_server
from prefalign.cli import main
from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.pairs import cohen_kappa, fleiss_kappa, import_labels

ROOT = Path(__file__).parents[1]
ASPECTS = ["lip_sync", "expression", "motion"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Six TalkingShapes pairs (ground truth as ``video``, a spoiled mouth as ``rejected``), videos with sound."""
    out = tmp_path_factory.mktemp("annotate_pairs")
    return write_dataset(out, num_clips=6, seed=3, cfg=TalkingShapesConfig(), rejected=("shift", "jitter", "freeze"))


class Running:
    """An annotation server serving in a thread; ``stop()`` closes it and its judgements file."""

    def __init__(self, pairs, out, annotator="ann", **kwargs):
        self.server = open_server(str(pairs), str(out), annotator=annotator, port=0, **kwargs)
        self.url = self.server.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def request(url, data=None, headers=None, method=None):
    """(status, headers, body bytes) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def post_answer(url, payload, headers=None):
    body = json.dumps(payload).encode()
    status, _, data = request(url + "api/answer", body, {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(data)


def side_of(letter, annotator, pair_id):
    """The side on which ``annotator`` sees video ``letter`` (a: the pair's video, b: its rejected one)."""
    return "left" if display_order(annotator, pair_id)[0] == letter else "right"


def answer(url, index, pair_id, annotator, votes):
    """Post an answer given as letters (``{"lip_sync": "a", ...}``), translated to the sides the annotator saw."""
    choices = {key: "tie" if vote == "tie" else side_of(vote, annotator, pair_id) for key, vote in votes.items()}
    return post_answer(url, {"index": index, "id": pair_id, "choices": choices})


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def ids_of(pairs_file):
    return [json.loads(line)["id"] for line in Path(pairs_file).read_text().splitlines()]


# --- the pairs file, checked at start ----------------------------------------------------------------------------


def test_pairs_load_inside_their_folder(pairs_file):
    pairs = load_pairs(pairs_file)
    folder = pairs_file.parent.resolve()
    assert [p.id for p in pairs] == ids_of(pairs_file)
    assert all(folder in p.videos["a"].parents and folder in p.videos["b"].parents for p in pairs)
    assert pairs[0].videos["a"].name == "clip_00000.mp4" and pairs[0].videos["b"].name == "clip_00000_rejected.mp4"
    assert all(p.speech is None for p in pairs)  # the videos carry their own sound
    assert pairs[0].conditions["audio"] == str(folder / "clips" / "clip_00000.wav")


def _hostile_world(tmp_path, pairs_file):
    """A pairs folder with one good pair, plus files to point rows at."""
    folder = tmp_path / "pairs"
    (folder / "clips").mkdir(parents=True)
    good = json.loads(pairs_file.read_text().splitlines()[0])
    for column in ("video", "rejected", "audio"):
        (folder / good[column]).write_bytes((pairs_file.parent / good[column]).read_bytes())
    outside = tmp_path / "outside.mp4"
    outside.write_bytes((pairs_file.parent / good["video"]).read_bytes())
    (folder / "clips" / "escape.mp4").symlink_to(outside)
    (folder / "clips" / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "clips" / "notes.mp4").write_text("this is not a video\n")
    frames, fps = media.read_video(folder / good["video"])
    media.write_video(folder / "clips" / "silent.mp4", frames, fps)  # no sound track
    with av.open(str(folder / "clips" / "mpeg4.mp4"), "w") as container:  # a codec browsers do not play
        stream = container.add_stream("mpeg4", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    good = {"id": "good", "video": good["video"], "rejected": good["rejected"], "audio": good["audio"]}
    return folder, good, outside


HOSTILE = {
    # name: (the second row, or raw bytes for the second line; what the error must say besides file and line 2)
    "parent_path": ({"video": "../outside.mp4"}, ["'video'", "outside the pairs file's folder"]),
    "absolute_path": ({"rejected": "OUTSIDE"}, ["'rejected'", "outside the pairs file's folder"]),
    "escaping_symlink": ({"video": "clips/escape.mp4"}, ["'video'", "outside the pairs file's folder"]),
    "missing_video": ({"rejected": "clips/gone.mp4"}, ["'rejected'", "file not found"]),
    "random_bytes_mp4": ({"video": "clips/broken.mp4"}, ["'video'", "not a readable video"]),
    "text_as_mp4": ({"video": "clips/notes.mp4"}, ["'video'", "not a readable video"]),
    "not_a_video_suffix": ({"video": "clips/good_audio.wav"}, ["'video'", "not a video file browsers play"]),
    "browser_codec": ({"video": "clips/mpeg4.mp4"}, ["'video'", "mpeg4 does not play in browsers"]),
    "silent_without_audio": ({"video": "clips/silent.mp4", "audio": None}, ["'video'", "no sound track"]),
    "path_not_a_string": ({"video": ["a.mp4"]}, ["'video'", "non-empty string"]),
    "no_rejected": ({"rejected": None}, ["'rejected'", "no 'rejected'"]),
    "no_id": ({"id": None}, ["'id'", "no 'id'"]),
    "id_a_list": ({"id": ["x"]}, ["'id'", "non-empty string or an integer"]),
    "duplicate_id": ({"id": "good"}, ["'id'", "also the id of line 1"]),
    "garbage_line": (b"<html>not json</html>", ["not valid JSON"]),
    "row_a_list": (b'["clips/a.mp4", "clips/b.mp4"]', ["not an object"]),
    "not_utf8": (b'{"id": "caf\xe9"}', ["not UTF-8"]),
    "huge_line": (b'{"id": "' + b"x" * 70_000 + b'"}', ["longer than 65536 bytes"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_pairs_file_is_refused_at_start_naming_the_row(case, tmp_path, pairs_file):
    folder, good, outside = _hostile_world(tmp_path, pairs_file)
    (folder / "clips" / "good_audio.wav").write_bytes((folder / good["audio"]).read_bytes())
    change, expected = HOSTILE[case]
    if isinstance(change, bytes):
        second = change
    else:
        row = {**good, "id": "second", **{k: v for k, v in change.items()}}
        row = {k: (str(outside) if v == "OUTSIDE" else v) for k, v in row.items() if v is not None}
        second = json.dumps(row).encode()
    (folder / "pairs.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + second + b"\n")
    with pytest.raises(DataError) as error:
        open_server(str(folder / "pairs.jsonl"), str(tmp_path / "judgements.jsonl"), port=0)
    message = str(error.value)
    assert "pairs.jsonl" in message and "line 2" in message, message
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "judgements.jsonl").exists()  # refused before anything was opened for writing


def test_frames_larger_than_the_pixel_bound_are_refused_from_the_header(tmp_path, pairs_file, monkeypatch):
    """A video whose frames exceed ``media.MAX_FRAME_PIXELS`` is refused before a frame is decoded (here the bound
    is lowered below the 32x32 test clips instead of writing a huge video)."""
    folder, good, _ = _hostile_world(tmp_path, pairs_file)
    (folder / "pairs.jsonl").write_text(json.dumps(good) + "\n")
    monkeypatch.setattr(media, "MAX_FRAME_PIXELS", 32 * 31)
    with pytest.raises(DataError, match=r"line 1.*frames of 32x32 exceed 992 pixels"):
        load_pairs(folder / "pairs.jsonl")


def test_ids_with_slashes_are_served_by_index_and_silent_videos_play_the_row_speech(tmp_path, pairs_file):
    folder, good, _ = _hostile_world(tmp_path, pairs_file)
    rows = [{**good, "id": "speaker/../../etc/passwd"}, {**good, "id": 7, "video": "clips/silent.mp4"}]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    running = Running(folder / "pairs.jsonl", tmp_path / "j.jsonl")
    try:
        first = json.loads(request(running.url + "api/pair/0")[2])
        assert first["id"] == "speaker/../../etc/passwd" and first["media"]["left"] == "/media/0/left"
        second = json.loads(request(running.url + "api/pair/1")[2])
        assert second["id"] == "7" and second["media"]["speech"] == "/media/1/speech"
        status, headers, body = request(running.url + "media/1/speech")
        assert status == 200 and headers["Content-Type"] == "audio/wav"
        assert body == (folder / good["audio"]).read_bytes()
        assert request(running.url + "media/0/speech")[0] == 404  # its videos have sound: no separate speech
        status, reply = answer(running.url, 0, "speaker/../../etc/passwd", "ann", dict.fromkeys(ASPECTS, "a"))
        assert status == 200 and reply["saved"]
    finally:
        running.stop()
    assert rows_of(tmp_path / "j.jsonl")[0]["id"] == "speaker/../../etc/passwd"


# --- the HTTP API ----------------------------------------------------------------------------------------------


def test_page_api_and_video_ranges(tmp_path, pairs_file):
    running = Running(pairs_file, tmp_path / "j.jsonl", annotator="alice")
    url = running.url
    try:
        assert url.startswith("http://127.0.0.1:")
        status, headers, page = request(url)
        assert status == 200 and b'<script src="/page.js"' in page
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert request(url + "page.js")[0] == 200
        state = json.loads(request(url + "api/state")[2])
        assert state == {"annotator": "alice", "aspects": ASPECTS, "total": 6, "done": 0, "next": 0}

        pair_id = ids_of(pairs_file)[0]
        order = display_order("alice", pair_id)
        videos = {"a": pairs_file.parent / "clips" / f"{pair_id}.mp4",
                  "b": pairs_file.parent / "clips" / f"{pair_id}_rejected.mp4"}
        for side, letter in zip(("left", "right"), order):
            status, headers, body = request(url + f"media/0/{side}")
            assert status == 200 and headers["Content-Type"] == "video/mp4" and headers["Accept-Ranges"] == "bytes"
            assert body == videos[letter].read_bytes()
        whole = videos[order[0]].read_bytes()
        status, headers, body = request(url + "media/0/left", headers={"Range": "bytes=100-199"})
        assert status == 206 and body == whole[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(whole)}"
        assert request(url + "media/0/left", headers={"Range": "bytes=-50"})[2] == whole[-50:]
        assert request(url + "media/0/left", headers={"Range": "bytes=1000-"})[2] == whole[1000:]
        status, headers, _ = request(url + "media/0/left", headers={"Range": f"bytes={len(whole)}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(whole)}"
        status, _, body = request(url + "media/0/left", headers={"Range": "bytes=" + "9" * 5000 + "-"})
        assert status == 200 and body == whole  # a range no file can have is ignored, not a crashed request
        # Files are named by pair index and side only: anything else is not found.
        for path in ("media/6/left", "media/0/middle", "media/0/../../../etc/passwd", "media/-1/left",
                     "api/pair/6", "clips/clip_00000.mp4", "manifest.jsonl", "etc/passwd"):
            assert request(url + path)[0] == 404, path

        status, reply = post_answer(url, {"index": 0, "id": pair_id,
                                          "choices": {"lip_sync": "left", "expression": "tie", "motion": "right"}})
        assert status == 200 and reply == {"saved": True, "id": pair_id, "done": 1, "total": 6, "next": 1}
        view = json.loads(request(url + "api/pair/0")[2])
        assert view["answer"] == {"lip_sync": "left", "expression": "tie", "motion": "right"}
    finally:
        running.stop()
    (row,) = rows_of(tmp_path / "j.jsonl")
    assert row["id"] == pair_id and row["order"] == list(order) and row["annotator"] == "alice"
    assert (row["lip_sync"], row["expression"], row["motion"]) == (order[0], "tie", order[1])
    assert row["video_a"] == str(videos["a"].resolve()) and row["video_b"] == str(videos["b"].resolve())
    assert "overall" not in row and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["time"])


def test_bad_answers_are_refused_and_nothing_is_written(tmp_path, pairs_file):
    running = Running(pairs_file, tmp_path / "j.jsonl")
    url = running.url
    pair_id = ids_of(pairs_file)[0]
    good = {"index": 0, "id": pair_id, "choices": dict.fromkeys(ASPECTS, "tie")}
    try:
        cases = [
            ({**good, "choices": {"lip_sync": "left"}}, 400, "no answer for"),
            ({**good, "choices": {**good["choices"], "motion": ["left"]}}, 400, "one of"),
            ({**good, "choices": {**good["choices"], "lip_sync": "a"}}, 400, "one of"),
            ({**good, "choices": {**good["choices"], "beauty": "left"}}, 400, "choices must be"),
            ({**good, "id": "another"}, 400, "does not match"),
            ({**good, "index": 6}, 400, "unknown pair index"),
            ({**good, "index": True}, 400, "unknown pair index"),
            ({**good, "path": "/etc/passwd"}, 400, "unknown keys"),
            ([good], 400, "JSON object"),
        ]
        for payload, status, text in cases:
            got, reply = post_answer(url, payload)
            assert got == status and text in reply["error"], (payload, reply)
        body = json.dumps(good).encode()
        assert request(url + "api/answer", body, {"Content-Type": "text/plain"})[0] == 415  # no CSRF by simple form
        assert request(url + "api/answer", body, {"Content-Type": "application/json",
                                                   "Origin": "http://evil.example"})[0] == 403
        assert request(url + "api/answer", body, {"Content-Type": "application/json",
                                                   "Host": "evil.example:80"})[0] == 403  # DNS rebinding
        assert request(url + "api/state", headers={"Host": "evil.example"})[0] == 403
        assert request(url + "api/state", headers={"Host": "[::1]"})[0] == 200  # loopback, no port
        big = json.dumps({**good, "pad": "x" * MAX_POST_BYTES}).encode()
        assert request(url + "api/answer", big, {"Content-Type": "application/json"})[0] == 413
        assert request(url + "api/elsewhere", body, {"Content-Type": "application/json"})[0] == 404
        assert post_answer(url, good)[0] == 200  # the server still answers after all that
    finally:
        running.stop()
    assert len(rows_of(tmp_path / "j.jsonl")) == 1


def test_the_command_takes_aspects_and_warns_on_any_other_host(tmp_path, pairs_file, monkeypatch, capsys):
    from prefalign.annotate import AnnotationServer

    served = []
    monkeypatch.setattr(AnnotationServer, "serve_forever", lambda self: served.append((self.aspects, self.url)))
    main(["annotate", "--pairs", str(pairs_file), "--out", str(tmp_path / "j.jsonl"), "--port", "0",
          "--aspects", "lip_sync,expressiveness,motion_quality"])
    assert served[0][0] == ["lip_sync", "expressiveness", "motion_quality"]
    assert "6 pairs, 0 answered" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="open to every machine"):
        main(["annotate", "--pairs", str(pairs_file), "--out", str(tmp_path / "j.jsonl"), "--port", "0",
              "--host", "0.0.0.0"])
    assert served[1][1].startswith("http://0.0.0.0:")


# --- durability and resume -------------------------------------------------------------------------------------


def test_answers_resume_and_the_last_answer_per_pair_wins(tmp_path, pairs_file, capsys):
    out = tmp_path / "j.jsonl"
    ids = ids_of(pairs_file)
    running = Running(pairs_file, out, annotator="bob")
    try:
        answer(running.url, 0, ids[0], "bob", {"lip_sync": "a", "expression": "a", "motion": "a"})
        answer(running.url, 1, ids[1], "bob", {"lip_sync": "b", "expression": "tie", "motion": "b"})
        # Back to the first pair, changed: a new line, which wins.
        answer(running.url, 0, ids[0], "bob", {"lip_sync": "b", "expression": "b", "motion": "b", "overall": "b"})
    finally:
        running.stop()
    assert len(rows_of(out)) == 3
    running = Running(pairs_file, out, annotator="bob")
    try:
        state = json.loads(request(running.url + "api/state")[2])
        assert state["done"] == 2 and state["next"] == 2  # resumes at the first pair without an answer
        view = json.loads(request(running.url + "api/pair/0")[2])
        assert view["answer"]["overall"] == side_of("b", "bob", ids[0])
    finally:
        running.stop()
    pairs = rows_of(import_labels(str(out), str(tmp_path / "labelled")))
    assert [p["id"] for p in pairs] == [ids[1], ids[0]]
    assert pairs[0]["labels"] == {"lip_sync": 1, "expression": 0, "motion": 1}
    assert pairs[1]["video"].endswith(f"{ids[0]}_rejected.mp4") and pairs[1]["labels"] == dict.fromkeys(ASPECTS, 1)
    assert "1 earlier judgements replaced" in capsys.readouterr().out


def answer_the_first_pair_and_stop(pairs_file, out) -> list[str]:
    """One server answers the first pair and stops; the pairs' ids."""
    ids = ids_of(pairs_file)
    running = Running(pairs_file, out)
    answer(running.url, 0, ids[0], "ann", dict.fromkeys(ASPECTS, "a"))
    running.stop()
    return ids


def resumes_at_the_second_pair(running, out, ids) -> None:
    """The restarted server counts the first answer done, takes the second, and the file holds both."""
    try:
        assert json.loads(request(running.url + "api/state")[2])["done"] == 1
        answer(running.url, 1, ids[1], "ann", dict.fromkeys(ASPECTS, "b"))
    finally:
        running.stop()
    assert [r["id"] for r in rows_of(out)] == ids[:2]


def test_a_torn_last_line_is_dropped_with_a_warning_and_never_glued_to_the_next(tmp_path, pairs_file):
    out = tmp_path / "j.jsonl"
    ids = answer_the_first_pair_and_stop(pairs_file, out)
    with open(out, "ab") as handle:  # what a crash in the middle of a write could leave
        handle.write(b'{"id": "' + ids[1].encode() + b'", "video_a": "/x')
    with pytest.warns(UserWarning, match="cut short"):
        running = Running(pairs_file, out)
    resumes_at_the_second_pair(running, out, ids)


def test_a_whole_last_answer_without_its_line_end_is_kept(tmp_path, pairs_file, recwarn):
    out = tmp_path / "j.jsonl"
    ids = answer_the_first_pair_and_stop(pairs_file, out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # an editor that drops the final newline
    resumes_at_the_second_pair(Running(pairs_file, out), out, ids)
    assert not [w for w in recwarn if "cut short" in str(w.message)]


def test_a_write_that_fails_midway_leaves_no_part_line(tmp_path, pairs_file, monkeypatch):
    """A disk that fills in the middle of an answer: not saved, and the next answer still reads back."""
    from prefalign import annotate as module

    out = tmp_path / "j.jsonl"
    ids = ids_of(pairs_file)
    server = open_server(str(pairs_file), str(out), annotator="ann", port=0)
    try:
        server.record({"index": 0, "id": ids[0], "choices": dict.fromkeys(ASPECTS, "tie")})
        write = os.write

        def full_disk(fd, data):
            if len(data) > 10:
                return write(fd, bytes(data[:10]))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(module.os, "write", full_disk)
        with pytest.raises(OSError, match="No space left"):
            server.record({"index": 1, "id": ids[1], "choices": dict.fromkeys(ASPECTS, "tie")})
        monkeypatch.setattr(module.os, "write", write)
        assert server.done() == 1
        server.record({"index": 2, "id": ids[2], "choices": dict.fromkeys(ASPECTS, "tie")})
    finally:
        server.server_close()
    assert [r["id"] for r in rows_of(out)] == [ids[0], ids[2]]


def test_the_judgements_file_is_guarded(tmp_path, pairs_file):
    out = tmp_path / "j.jsonl"
    ids = ids_of(pairs_file)
    running = Running(pairs_file, out, annotator="carol")
    try:
        with pytest.raises(RuntimeError, match="in use by another prefalign annotate"):
            open_server(str(pairs_file), str(out), port=0)
        answer(running.url, 0, ids[0], "carol", dict.fromkeys(ASPECTS, "a"))
    finally:
        running.stop()
    with pytest.raises(DataError, match=r"holds answers by \['carol'\], not by 'dave'"):
        open_server(str(pairs_file), str(out), annotator="dave", port=0)
    server = open_server(str(pairs_file), str(out), port=0)  # no --annotator: the name the file holds
    assert server.log.annotator == "carol"
    server.server_close()

    (tmp_path / "broken.jsonl").write_text(out.read_text() + "{not json\n" + out.read_text())
    with pytest.raises(DataError, match="line 2 is not a JSON answer"):
        open_server(str(pairs_file), str(tmp_path / "broken.jsonl"), port=0)
    (tmp_path / "other.jsonl").write_text(json.dumps({**rows_of(out)[0], "id": "not-in-these-pairs"}) + "\n")
    with pytest.raises(DataError, match="line 1 answers a pair id that the pairs file does not hold"):
        open_server(str(pairs_file), str(tmp_path / "other.jsonl"), port=0)
    with pytest.raises(ValueError, match="not an aspect name"):
        open_server(str(pairs_file), str(tmp_path / "x.jsonl"), port=0, aspects="lip_sync,video_a")
    with pytest.raises(ValueError, match="is the pairs file"):
        open_server(str(pairs_file), str(pairs_file), port=0)
    (tmp_path / "notes.txt").write_text("shopping: milk")  # not a judgements file: refused, left as it was
    with pytest.raises(DataError, match="is this a judgements file"):
        open_server(str(pairs_file), str(tmp_path / "notes.txt"), port=0)
    assert (tmp_path / "notes.txt").read_text() == "shopping: milk"


def test_display_order_is_a_stable_coin_flip_per_pair_and_annotator():
    orders = [display_order("alice", f"pair{i}") for i in range(400)]
    assert set(orders) == {("a", "b"), ("b", "a")}
    assert 150 < orders.count(("a", "b")) < 250
    assert orders == [display_order("alice", f"pair{i}") for i in range(400)]
    assert orders != [display_order("bob", f"pair{i}") for i in range(400)]


def test_a_sigkilled_server_keeps_every_answer_it_acknowledged(tmp_path, pairs_file):
    """Two clients post answers as fast as they can; the server is SIGKILLed mid-stream. Every answer the server
    acknowledged is in the file, whole, and a new server resumes from it."""
    out = tmp_path / "j.jsonl"
    ids = ids_of(pairs_file)
    code = ("import sys; from prefalign.annotate import annotate; "
            "annotate(sys.argv[1], sys.argv[2], annotator='kim', port=0)")
    server = subprocess.Popen([sys.executable, "-c", code, str(pairs_file), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"open (http://\S+)", server.stdout.readline()).group(1)
        acknowledged, stop = [], threading.Event()
        values = ["left", "right", "tie"]

        def client(offset):
            k = offset
            while not stop.is_set():
                index = k % len(ids)
                choices = {a: values[(k // (len(ids) * 3 ** j)) % 3] for j, a in enumerate(ASPECTS)}
                try:
                    status, reply = post_answer(url, {"index": index, "id": ids[index], "choices": choices})
                except (OSError, http.client.HTTPException):  # the server is gone
                    return
                if status == 200 and reply.get("saved"):
                    acknowledged.append((ids[index], tuple(choices.values())))
                k += 2

        clients = [threading.Thread(target=client, args=(offset,)) for offset in (0, 1)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        stop.set()
        for thread in clients:
            thread.join(15)
    finally:
        if server.poll() is None:
            server.kill()
        server.stdout.close()
        server.stderr.close()
    assert len(acknowledged) >= 40
    data = out.read_bytes()
    lines = data.split(b"\n")
    rows = [json.loads(line) for line in (lines if data.endswith(b"\n") else lines[:-1]) if line]
    side = {row["id"]: {"left": row["order"][0], "right": row["order"][1], "tie": "tie"} for row in rows}
    written = {(row["id"], tuple(row[a] for a in ASPECTS)) for row in rows}
    for pair_id, choices in acknowledged:
        assert (pair_id, tuple(side[pair_id][c] for c in choices)) in written
    resumed = open_server(str(pairs_file), str(out), port=0)  # the lock died with the process
    assert resumed.done() == len({pair_id for pair_id, _ in acknowledged})
    resumed.server_close()


# --- prefalign labels: several annotators, agreement -----------------------------------------------------------


def test_cohen_and_fleiss_kappa_match_a_hand_computation():
    first = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
    second = ["a", "a", "b", "a", "b", "b", "a", "tie", "b", "a"]
    # Agreement 7/10; chance: a .5*.5 + b .3*.4 + tie .2*.1 = .39, so kappa = (.7 - .39) / (1 - .39).
    assert cohen_kappa(first, second) == pytest.approx(0.31 / 0.61)
    # Fleiss pools the raters' shares: a 10/20, b 7/20, tie 3/20, chance .395: kappa = (.7 - .395) / .605.
    assert fleiss_kappa(list(zip(first, second))) == pytest.approx(0.305 / 0.605)
    # Three raters: P_i = 1, 1/3, 1/3, 0 (mean 5/12); shares a 1/2, b 1/3, tie 1/6 (chance 7/18): kappa 1/22.
    three = [("a", "a", "a"), ("a", "a", "b"), ("b", "b", "tie"), ("tie", "a", "b")]
    assert fleiss_kappa(three) == pytest.approx(1 / 22)
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # everyone always says a: agreement by chance is 1
    assert fleiss_kappa([]) is None
    # Systematic disagreement is below zero.
    assert cohen_kappa(["a", "b", "a", "b"], ["b", "a", "b", "a"]) == pytest.approx(-1.0)


#: Two annotators' (lip_sync, expression, motion) votes on six pairs (a: the ground truth better, b: the spoiled
#: one). They agree on lip sync except at pair 5, split on expression at pairs 1 and 3 and on motion at pair 2,
#: and only alice gives an overall verdict (at pair 2).
VOTES = {
    "alice": [("a", "a", "a"), ("a", "a", "tie"), ("a", "tie", "a"), ("a", "a", "a"), ("a", "b", "a"), ("b", "a", "a")],
    "bob": [("a", "a", "a"), ("a", "b", "tie"), ("a", "tie", "b"), ("a", "tie", "a"), ("a", "b", "a"), ("a", "a", "a")],
}


def _two_annotators(tmp_path, pairs_file):
    """Two annotators judge the same six pairs at the same time, each on their own server and file."""
    ids = ids_of(pairs_file)
    servers = {name: Running(pairs_file, tmp_path / f"{name}.jsonl", annotator=name) for name in VOTES}
    try:
        for index, pair_id in enumerate(ids):
            for name, running in servers.items():
                given = dict(zip(ASPECTS, VOTES[name][index]))
                if name == "alice" and index == 2:
                    given["overall"] = "a"
                status, reply = answer(running.url, index, pair_id, name, given)
                assert status == 200 and reply["saved"]
    finally:
        for running in servers.values():
            running.stop()
    return [tmp_path / f"{name}.jsonl" for name in VOTES], ids


def test_labels_merge_annotators_and_report_their_agreement(tmp_path, pairs_file, capsys):
    files, ids = _two_annotators(tmp_path, pairs_file)
    pairs = rows_of(import_labels([str(f) for f in files], str(tmp_path / "merged")))
    printed = capsys.readouterr().out
    # Every pair has a winner: the ground truth (video a), except pair 5 where lip sync split 1:1 (a tie by
    # disagreement) and the other aspects favour a.
    assert [p["id"] for p in pairs] == ids and all(p["annotators"] == 2 for p in pairs)
    assert all(p["video"].endswith(f"{i}.mp4") and p["rejected"].endswith(f"{i}_rejected.mp4")
               for p, i in zip(pairs, ids))
    assert pairs[1]["labels"] == {"lip_sync": 1, "expression": 0, "motion": 0}  # a vs b on expression: no majority
    assert pairs[5]["labels"] == {"lip_sync": 0, "expression": 1, "motion": 1}
    assert pairs[0]["audio"].endswith("clip_00000.wav") and pairs[0]["reference"].endswith("_ref.png")

    summary = json.loads((tmp_path / "merged" / "agreement.json").read_text())
    assert summary["pairs"] == 6 and summary["written"] == 6 and summary["ties"] == 0
    assert [f["annotator"] for f in summary["files"]] == ["alice", "bob"]
    lip = summary["aspects"]["lip_sync"]
    assert lip["judged_by_all"] == 6 and lip["observed_agreement"] == pytest.approx(5 / 6)
    # alice: a x5, b x1; bob: a x6. Chance agreement 5/6, observed 5/6: kappa 0.
    assert lip["cohen_kappa"] == pytest.approx(0.0) and lip["no_majority_ids"] == [ids[5]]
    expression = summary["aspects"]["expression"]
    assert expression["split"] == 2 and expression["no_majority"] == 2
    first, second = ([v[1] for v in VOTES[name]] for name in ("alice", "bob"))
    assert expression["cohen_kappa"] == pytest.approx(cohen_kappa(first, second))
    assert expression["fleiss_kappa"] == pytest.approx(fleiss_kappa(list(zip(first, second))))
    assert summary["aspects"]["overall"]["judged_by_all"] == 0 and summary["aspects"]["overall"]["cohen_kappa"] is None
    assert all(0 <= f["left_chosen"] <= 1 for f in summary["files"])
    assert "Cohen κ" in printed and "Fleiss κ" in printed and "lip_sync" in printed and "agreement.json" in printed


def test_labels_refuse_files_that_judge_different_videos_under_one_id(tmp_path):
    rows = {"x.jsonl": {"id": "p", "video_a": "a.mp4", "video_b": "b.mp4", "lip_sync": "a"},
            "y.jsonl": {"id": "p", "video_a": "a.mp4", "video_b": "c.mp4", "lip_sync": "a"},
            "swapped.jsonl": {"id": "p", "video_a": "b.mp4", "video_b": "a.mp4", "lip_sync": "b"},
            "noid.jsonl": {"video_a": "a.mp4", "video_b": "b.mp4", "lip_sync": "a"}}
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="judged on videos") as error:
        import_labels([str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")], str(tmp_path / "out"))
    assert "y.jsonl" in str(error.value) and "x.jsonl line 1" in str(error.value)
    with pytest.raises(DataError, match="has no 'id'"):
        import_labels([str(tmp_path / "x.jsonl"), str(tmp_path / "noid.jsonl")], str(tmp_path / "out"))
    # The same two videos in the other order: the vote is flipped, so both say a.mp4 is better.
    (merged,) = rows_of(import_labels([str(tmp_path / "x.jsonl"), str(tmp_path / "swapped.jsonl")],
                                      str(tmp_path / "out")))
    assert merged["video"].endswith("a.mp4") and merged["labels"] == {"lip_sync": 1}
    summary = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert summary["aspects"]["lip_sync"]["split"] == 0
    # One file may judge several pairs of one condition under one id: each is a pair, but merging needs one per id.
    (tmp_path / "several.jsonl").write_text(json.dumps(rows["x.jsonl"]) + "\n" + json.dumps(rows["y.jsonl"]) + "\n")
    assert len(rows_of(import_labels(str(tmp_path / "several.jsonl"), str(tmp_path / "one")))) == 2
    with pytest.raises(DataError, match="also names other videos at line 1") as error:
        import_labels([str(tmp_path / "x.jsonl"), str(tmp_path / "several.jsonl")], str(tmp_path / "out"))
    assert "several.jsonl" in str(error.value) and "line 2" in str(error.value)


def test_dpo_trains_on_two_annotators_merged_pairs(tmp_path, pairs_file, talkingshapes, monkeypatch):
    """`prefalign labels --labels [alice, bob]` (the CLI) merges two annotators; DiffusionDPO trains 2 steps on it."""
    files, _ = _two_annotators(tmp_path, pairs_file)
    monkeypatch.chdir(tmp_path)
    main(["labels", "--labels", f"[{files[0]}, {files[1]}]", "--out", str(tmp_path / "merged")])
    merged = tmp_path / "merged" / "pairs.jsonl"
    assert len(rows_of(merged)) == 6 and (tmp_path / "merged" / "agreement.json").exists()
    main(["fit", "--config", str(ROOT / "recipes" / "demo" / "dpo.yaml"), "--data.train", str(merged),
          "--data.val", str(talkingshapes), "--model.init_weights", "null", "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"])
    with open(next(tmp_path.glob("runs/demo-dpo/csv/*/metrics.csv"))) as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("train/implicit_accuracy")]
    assert [row["step"] for row in logged] == ["0", "1"]
    assert all(np.isfinite(float(row["train/reward_margin"])) for row in logged)
