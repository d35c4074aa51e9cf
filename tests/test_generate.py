"""Tests for data.py generate (long videos -> clips, captions, QA rows) and eval.py --keep (the
difficulty filter).

    python -m pytest tests/test_generate.py -q

An OpenAI-style chat endpoint runs in the test (http.server in a thread), scripted to answer, fail,
stall and send junk. Videos are synthetic (data.synth into a tmp folder, and tests/media.py's
camera-like clip).
"""
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as E  # noqa: E402
from media import CAMERA  # noqa: E402

ITEM = dict(category="temporal", question="What happens first?",
            options=["red", "green", "blue", "yellow"], answer="A",
            reasoning="The red flash comes before the others, so the answer is A.")
ITEMS = [dict(ITEM, category=c, question=f"Question {i} about {c}?")
         for i, c in enumerate(data.QA_CATEGORIES)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three synthetic videos of 64 frames at 8 fps (8 s each)."""
    out = tmp_path_factory.mktemp("synth")
    data.synth(out, n=3, n_frames=64, seed=0, n_test=0)
    return out / "videos"


def argv(videos, out, base=None, **kw):
    a = ["generate", str(videos), "--out", str(out), "--clip-seconds", "3", "--clip-frames", "4",
         "--retries", "1", "--backoff", "0", "--timeout", "2"]
    a += ["--api-base", base] if base else []
    return a + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def args(videos, out, base=None, **kw):
    return data.parser().parse_args(argv(videos, out, base, **kw))


def chat(content):
    reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
    return json.dumps(reply).encode()


def scripted(body):
    """A captioner and a writer that behave: a caption per clip, ITEMS for every video."""
    content = body["messages"][0]["content"]
    if isinstance(content, list):  # images and text: the captioner
        return 200, chat(f"A clip of {len(content) - 1} frames: the screen flashes.")
    return 200, chat("```json\n" + json.dumps(ITEMS) + "\n```")


@contextlib.contextmanager
def endpoint(script):
    """An OpenAI-style chat-completions server: script(request body, call number) -> (status,
    bytes), or ("sleep", seconds) to stall."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                server.calls.append(body)
                k = len(server.calls) - 1
            status, payload = script(body, k)
            if status == "sleep":
                time.sleep(payload)
                return
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            with contextlib.suppress(OSError):  # the client may have given up
                self.wfile.write(payload)

        def log_message(self, *a):
            pass

    lock = threading.Lock()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", server
    finally:
        server.shutdown()
        server.server_close()


def lines(path):
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# -----------------------------------------------------------------------------
# clips

def test_clips_of_a_synthetic_video_are_its_frames_by_time(videos):
    path = videos / "000000.mp4"  # 64 frames, 8 fps: 3 s clips, frames [0, 24), [24, 48), [48, 64)
    clips = list(data.cut_clips(path, seconds=3, per_clip=4))
    assert [(c["start"], c["end"]) for c in clips] == [(0, 3), (3, 6), (6, 8)]
    whole, _ = data.read_video(path, nframes=64)
    for c, (a, b) in zip(clips, [(0, 24), (24, 48), (48, 64)]):
        idx = np.linspace(a, b - 1, 4).round().astype(int)
        assert c["times"] == (idx / 8).tolist()
        assert np.array_equal(c["frames"], whole[idx])


def test_clips_of_a_camera_clip(media_files):
    path = media_files["camera.mp4"]  # 280 frames at 20 fps, 384x216
    assert (CAMERA["frames"], CAMERA["fps"]) == (280, 20) and CAMERA["width"] > CAMERA["height"]
    clips = list(data.cut_clips(path, seconds=5, per_clip=4, max_pixels=64 * 28 * 28))
    assert [(c["start"], c["end"]) for c in clips] == [(0, 5), (5, 10), (10, 14)]
    for c in clips:
        t, h, w, _ = c["frames"].shape
        assert t == 4 and h % 28 == 0 and w % 28 == 0 and h * w <= 64 * 28 * 28 and w > h
        assert c["start"] <= min(c["times"]) and max(c["times"]) < c["end"]
    assert not np.array_equal(clips[0]["frames"][0], clips[-1]["frames"][-1])


# -----------------------------------------------------------------------------
# validation, rule by rule

def test_a_valid_item_becomes_a_row():
    why, row = data.check_item(ITEM)
    assert why is None and row == ITEM
    # an answer given as the option's text, options lettered, reasoning ending in the option's text
    why, row = data.check_item(dict(ITEM, answer="Green", options=["A. red", "B. green", "C. blue"],
                                    reasoning="It is the green one: green"))
    assert why is None and row["answer"] == "B" and row["options"] == ["red", "green", "blue"]


@pytest.mark.parametrize("change, reason", [
    (dict(category="causal"), "schema"),
    (dict(question=""), "schema"),
    (dict(question=None), "schema"),
    (dict(options=["red"]), "schema"),
    (dict(options=["red", "Red "]), "schema"),  # two options that read the same
    (dict(options="red, green"), "schema"),
    (dict(reasoning=""), "schema"),
    (dict(answer=3), "schema"),
    (dict(answer="E"), "answer"),  # four options: A to D
    (dict(answer="purple"), "answer"),
    (dict(reasoning="The red flash comes first, so the answer is B."), "reasoning"),
    (dict(reasoning="The red flash comes first."), "reasoning"),
])
def test_each_rule_rejects(change, reason):
    assert data.check_item(dict(ITEM, **change)) == (reason, None)


def test_not_an_object_and_duplicates_are_rejected():
    assert data.check_item(["not", "an", "item"]) == ("schema", None)
    seen = {data.normalize(ITEM["question"])}
    assert data.check_item(dict(ITEM, question="what happens FIRST ?"), seen) == ("duplicate", None)


def test_parse_items():
    assert data.parse_items("Sure!\n```json\n[{\"a\": 1}]\n```") == [{"a": 1}]
    assert data.parse_items('{"questions": [1, 2]}') == [1, 2]
    assert data.parse_items("no JSON here") is None
    assert data.parse_items("[1, 2") is None


# -----------------------------------------------------------------------------
# the command, against a scripted endpoint

def test_generate_from_an_endpoint_writes_rows_the_readers_take(videos, tmp_path):
    with endpoint(lambda body, k: scripted(body)) as (base, server):
        summary = data.generate(args(videos, tmp_path / "out", base))
    assert summary == dict(summary, videos=3, done=3, failed=0, clips=9, captions=9, asked=12,
                           accepted=12, rejected={}, failures={})
    captioner = [c for c in server.calls if isinstance(c["messages"][0]["content"], list)]
    assert len(captioner) == 9 and all(len(c["messages"][0]["content"]) == 5 for c in captioner)
    writer = [c["messages"][0]["content"] for c in server.calls if c not in captioner]
    assert len(writer) == 3 and "[3.0-6.0 s] A clip of 4 frames" in writer[0]
    rows = data.load_rows(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 12 and all(os.path.isfile(r["video"]) for r in rows)
    assert {r["category"] for r in rows} == set(data.QA_CATEGORIES)
    assert "A. red" in data.question_text(rows[0])


def fail_first(body, k):
    return (500, b"busy") if k == 0 else scripted(body)


def writer_junk(body, k):
    return scripted(body) if isinstance(body["messages"][0]["content"], list) else (200, b"{}")


def writer_rambles(body, k):
    if isinstance(body["messages"][0]["content"], list):
        return scripted(body)
    bad = [ITEMS[0], dict(ITEMS[1], answer="Z"), ITEMS[0]]  # valid, bad answer, duplicate; 1 short
    return 200, chat(json.dumps(bad) if k < 8 else "I cannot do that.")


@pytest.mark.parametrize("script, failures, rejected", [
    (fail_first, {}, {}),  # retried once: no failure
    (lambda body, k: (500, b"down"), {"caption_http": 1}, {}),
    (lambda body, k: ("sleep", 1.0), {"caption_timeout": 1}, {}),
    (lambda body, k: (200, b"<html>not json</html>"), {"caption_junk": 1}, {}),
    (writer_junk, {"writer_junk": 1}, {}),
    (writer_rambles, {}, {"answer": 1, "duplicate": 1, "missing": 1}),
])
def test_endpoint_failures_are_counted_by_kind_and_retried_on_rerun(videos, tmp_path, script,
                                                                    failures, rejected):
    out, one = tmp_path / "out", tmp_path / "one"
    one.mkdir()
    shutil.copy(videos / "000000.mp4", one)
    with endpoint(script) as (base, server):
        summary = data.generate(args(one, out, base, timeout=0.3))
    assert (summary["failures"], summary["rejected"]) == (failures, rejected)
    assert summary["done"] + summary["failed"] == 1 and summary["failed"] == bool(failures)
    log = (out / "generate.log").read_text()
    assert all(f"000000.mp4: {kind}" in log for kind in failures)
    if failures:  # nothing written; a rerun against a working endpoint does the video
        assert lines(out / "train.jsonl") == [] and lines(out / "generate.jsonl") == []
        with endpoint(lambda body, k: scripted(body)) as (base, server):
            summary = data.generate(args(one, out, base))
        assert (summary["done"], summary["accepted"], summary["failures"]) == (1, 4, {})


def test_an_unreachable_endpoint_and_an_unreadable_video(videos, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"not a video")
    with endpoint(lambda body, k: scripted(body)) as (base, server):
        summary = data.generate(args(bad, tmp_path / "out", base))
    assert (summary["done"], summary["failures"]) == (1, {"video": 1})  # done: it would fail again
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(videos / "000000.mp4", one)
    with endpoint(lambda body, k: scripted(body)) as (base, server):
        pass  # closed: nothing listens there now
    summary = data.generate(args(one, tmp_path / "out2", base))
    assert (summary["failed"], summary["failures"]) == (1, {"caption_unreachable": 1})


# -----------------------------------------------------------------------------
# resume

def test_kill_and_rerun_gives_the_rows_of_an_uninterrupted_run(videos, tmp_path):
    with endpoint(lambda body, k: scripted(body)) as (base, server):
        whole = data.generate(args(videos, tmp_path / "whole", base))
    expected = lines(tmp_path / "whole" / "train.jsonl")
    assert len(expected) == 12

    # a real kill (SIGKILL) while the writer of the second video waits for its reply
    stalled, release = threading.Event(), threading.Event()

    def stall_second_writer(body, k):
        if not isinstance(body["messages"][0]["content"], list) and \
                sum(not isinstance(c["messages"][0]["content"], list) for c in server.calls) == 2:
            stalled.set()
            release.wait(30)
        return scripted(body)

    out = tmp_path / "killed"
    with endpoint(stall_second_writer) as (base, server):
        cmd = [sys.executable, str(ROOT / "data.py")] + argv(videos, out, base)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            assert stalled.wait(60), "the run never reached the second video's writer"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            release.set()
    assert len(lines(out / "train.jsonl")) == 4 and len(lines(out / "generate.jsonl")) == 1
    with endpoint(lambda body, k: scripted(body)) as (base, server):
        again = data.generate(args(videos, out, base))
    assert lines(out / "train.jsonl") == expected
    assert (again["done_before"], again["done"]) == (1, 3)
    assert {k: again[k] for k in ("clips", "captions", "asked", "accepted", "rejected")} == \
        {k: whole[k] for k in ("clips", "captions", "asked", "accepted", "rejected")}


def test_rerun_drops_what_a_kill_between_appends_or_mid_line_left(videos, tmp_path):
    with endpoint(lambda body, k: scripted(body)) as (base, server):
        data.generate(args(videos, tmp_path / "whole", base))
        expected = lines(tmp_path / "whole" / "train.jsonl")
        out = tmp_path / "cut"
        shutil.copytree(tmp_path / "whole", out)
        # killed after the third video's rows, before its record; then half a line of a 4th write
        records = (out / "generate.jsonl").read_text().splitlines(keepends=True)
        (out / "generate.jsonl").write_text("".join(records[:2]) + records[2][:40])
        with open(out / "train.jsonl", "a") as f:
            f.write(json.dumps(expected[0])[:30])
        again = data.generate(args(videos, out, base))
    assert lines(out / "train.jsonl") == expected and again["done_before"] == 2


def test_tiny_model_offline_plays_both_parts(videos, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(videos / "000000.mp4", one)
    a = args(one, tmp_path / "out", caption_tokens=8, writer_tokens=16)
    summary = data.generate(a)
    assert (summary["done"], summary["clips"], summary["asked"]) == (1, 3, 4)
    assert summary["accepted"] + sum(summary["rejected"].values()) == 4  # nonsense: rejected
    assert data.generate(a)["done_before"] == 1  # rerun: nothing left to do


# -----------------------------------------------------------------------------
# the difficulty filter

def test_pass_bands_against_hand_counts():
    rows = [{"id": i} for i in "abcde"]
    correct = {"a": [0, 0, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 0, 1], "d": [1, 1, 1, 1]}  # e none
    results = [dict(id=i, correct=float(c)) for i, cs in correct.items() for c in cs]
    bands, kept = E.pass_bands(results, rows, 4)
    assert bands == {"0/4": 1, "1/4": 1, "2/4": 0, "3/4": 1, "4/4": 1, "none": 1}
    assert kept == [{"id": "b", "pass_rate": 0.25}, {"id": "c", "pass_rate": 0.75}]
    assert [r["id"] for r in E.pass_bands(results, rows, 4, 0.5, 1.0)[1]] == ["c"]


def test_eval_keep_writes_the_rows_of_the_band(tmp_path):
    task, keep = tmp_path / "task", tmp_path / "kept"
    data.synth(task, n=6, n_frames=16, seed=0, n_test=0)
    E.main(E.ap.parse_args(["--model", "tiny", "--data", str(task), "--split", "train", "--n", "4",
                            "--temperature", "1", "--frames", "8", "--max-new", "8",
                            "--keep", str(keep), "--out", str(tmp_path / "eval")]))
    summary = json.loads((keep / "filter.json").read_text())
    results = lines(tmp_path / "eval" / "results.jsonl")
    bands, kept = E.pass_bands(results, data.load_rows(task / "train.jsonl"), 4)
    assert summary["bands"] == bands and sum(bands.values()) == 6
    assert [r["id"] for r in data.load_rows(keep / "train.jsonl")] == [r["id"] for r in kept]
