"""`prefalign annotate` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which
.ci/run installs) driven by selenium. Both videos play, together and with sound; five pairs are answered by keyboard
with a reload midway; the judgements file then holds exactly those five answers, which `prefalign labels` reads.
A screenshot of the page is saved to tests/artifacts/annotate.png."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.pairs import import_labels

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--autoplay-policy=no-user-gesture-required", "--mute-audio"):  # muted output still decodes
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path):
    """`prefalign annotate` (the CLI, in its own process) on eight two-second pairs, on a free port."""
    pairs = write_dataset(tmp_path / "pairs", num_clips=8, seed=5, cfg=TalkingShapesConfig(num_frames=50, size=64),
                          rejected=("shift", "jitter", "freeze"))
    out = tmp_path / "judgements.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "prefalign.cli", "annotate", "--pairs", str(pairs), "--out", str(out),
         "--annotator", "tester", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background job (CI's) runs with SIGINT ignored, which the server would inherit, and Python then
        # installs no KeyboardInterrupt: Ctrl-C is restored, as a terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stdout.readline()
        match = re.search(r"open (http://\S+)", line)
        assert match, line + process.stderr.read()
        ids = [json.loads(row)["id"] for row in pairs.read_text().splitlines()]
        yield match.group(1), out, ids
    finally:
        process.send_signal(signal.SIGINT)  # the server's own way to stop (Ctrl-C)
        try:
            try:
                code = process.wait(20)
            except subprocess.TimeoutExpired:  # say where it hangs: faulthandler dumps every thread on SIGABRT
                process.send_signal(signal.SIGABRT)
                process.wait(10)
                raise AssertionError("the server did not stop within 20 s of Ctrl-C; its threads:\n"
                                     + process.stderr.read()[-20000:]) from None
            assert code == 0, process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.stderr.close()


def wait_for(driver, script, timeout=30):
    """Wait until the JavaScript expression ``script`` is true on the page."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def showing(driver, pair_id, done):
    wait_for(driver, f"!document.getElementById('workspace').hidden && "
                     f"document.getElementById('pair-id').textContent === {json.dumps(pair_id)} && "
                     f"document.getElementById('done').textContent === '{done}'")


def answer(driver, keys, done_after):
    """Press the answer keys and Enter; wait for the page to say saved and count the answer."""
    from selenium.webdriver.common.keys import Keys

    press(driver, *keys, Keys.ENTER)
    wait_for(driver, f"document.getElementById('done').textContent === '{done_after}' && "
                     "document.getElementById('status').textContent.startsWith('Saved')")


def videos(driver):
    return driver.execute_script(
        "return ['left', 'right'].map((id) => { const v = document.getElementById(id); return {t: v.currentTime, "
        "ready: v.readyState, paused: v.paused, audio: v.webkitAudioDecodedByteCount, error: v.error && v.error.code}"
        "; })")


def test_five_pairs_answered_by_keyboard_with_a_reload(server, browser):
    from selenium.webdriver.common.keys import Keys

    url, out, ids = server
    browser.get(url)
    showing(browser, ids[0], 0)
    assert browser.find_element("id", "annotator").text == "tester"
    assert browser.find_element("id", "total").text == "8"

    # Both videos play, from the same instant, and both decode a sound track.
    wait_for(browser, "['left', 'right'].every((id) => { const v = document.getElementById(id); "
                      "return v.readyState >= 2 && !v.paused && v.currentTime > 0.3 && "
                      "v.webkitAudioDecodedByteCount > 0; })")
    left, right = videos(browser)
    assert left["error"] is None and right["error"] is None
    assert abs(left["t"] - right["t"]) < 0.15, (left, right)
    # Space pauses both; the arrow seeks both to the same instant.
    press(browser, Keys.SPACE)
    wait_for(browser, "document.getElementById('left').paused && document.getElementById('right').paused")
    before = videos(browser)[0]["t"]
    press(browser, Keys.ARROW_RIGHT)
    wait_for(browser, f"Math.abs(document.getElementById('left').currentTime - {before} - 0.5) < 0.01 || "
                      f"document.getElementById('left').currentTime >= document.getElementById('left').duration")
    left, right = videos(browser)
    assert left["paused"] and right["paused"] and abs(left["t"] - right["t"]) < 0.01, (left, right)
    press(browser, Keys.SPACE)
    wait_for(browser, "!document.getElementById('left').paused && !document.getElementById('right').paused")

    # 1: left better, 2: tie, 3: right better, row by row; the fourth row (overall) is optional.
    answer(browser, "112", 1)
    assert len(out.read_text().splitlines()) == 1  # shown as saved: it is in the file
    showing(browser, ids[1], 1)
    answer(browser, "3313", 2)
    showing(browser, ids[2], 2)
    press(browser, "n")  # skip
    showing(browser, ids[3], 2)
    press(browser, "b")  # back
    showing(browser, ids[2], 2)
    answer(browser, "122", 3)
    showing(browser, ids[3], 3)

    browser.refresh()  # midway: the page resumes at the first pair without an answer
    showing(browser, ids[3], 3)
    press(browser, "b")
    showing(browser, ids[2], 3)  # an earlier answer is shown as it was saved
    pressed = browser.execute_script(
        "return [...document.querySelectorAll('#choices tr')].map((tr) => "
        "(tr.querySelector('button[aria-pressed=true]') || {dataset: {}}).dataset.value || null)")
    assert pressed == ["left", "tie", "tie", None]
    press(browser, "n")
    showing(browser, ids[3], 3)

    press(browser, "1", Keys.ENTER)  # two rows unanswered: refused, nothing written
    wait_for(browser, "document.getElementById('status').textContent.startsWith('Answer expression, motion')")
    assert len(out.read_text().splitlines()) == 3
    answer(browser, "31", 4)  # the cursor went to the first unanswered row
    showing(browser, ids[4], 4)
    press(browser, "1", "3")
    wait_for(browser, "['left', 'right'].every((id) => document.getElementById(id).currentTime > 0.5)")
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "annotate.png"))
    answer(browser, "1", 5)

    errors = [entry for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]
    assert errors == []

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ids[:5]
    sides = [("left", "left", "tie", None), ("right", "right", "left", "right"), ("left", "tie", "tie", None),
             ("left", "right", "left", None), ("left", "right", "left", None)]
    for row, expected in zip(rows, sides):
        letter = {"left": row["order"][0], "right": row["order"][1], "tie": "tie", None: None}
        keys = ("lip_sync", "expression", "motion", "overall")
        assert [row.get(key) for key in keys] == [letter[side] for side in expected]
        assert row["annotator"] == "tester" and Path(row["video_a"]).name == f"{row['id']}.mp4"
        assert Path(row["video_b"]).name == f"{row['id']}_rejected.mp4"
    # Position is a coin flip per pair, recorded with each answer.
    assert all(row["order"] in (["a", "b"], ["b", "a"]) for row in rows)

    labelled = import_labels(str(out), str(out.parent / "labelled"))
    pairs = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert [pair["id"] for pair in pairs] == ids[:5]  # no tie among the five: every answer is a pair
