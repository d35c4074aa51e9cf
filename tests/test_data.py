"""Tests for data.py: decoding, sampling, preprocessing layout, rows, the synthetic task, the probe command.

    python -m pytest tests/test_data.py -q

Two real clips live in tests/data (see its README.md); the stand-ins for real clips that cannot be
shipped are written by tests/media.py (conftest.py's media_files fixture).
"""
import json
import re
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import av  # before decord: decord's bundled libvpx, loaded first, breaks PyAV's VP8/VP9 encoders
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from data import VideoError  # noqa: E402
from media import CAMERA, DATA, NO_COUNT, SHORT  # noqa: E402

CORRUPTED = str(DATA / "corrupted.mp4")  # a broken H.264 stream (decord's tests)
try:
    import decord  # noqa: F401
    READERS = [None, "decord", "pyav"]
except ImportError:
    READERS = [None, "pyav"]
needs_decord = pytest.mark.skipif("decord" not in READERS, reason="decord is not installed")


def normalize(frames):
    """The reference per-pixel normalization, (T, H, W, 3) uint8 -> (T, 3, H, W) float32."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() * (1 / 255)
    return (x.float() - torch.tensor(data.MEAN).view(1, 3, 1, 1)) / torch.tensor(data.STD).view(1, 3, 1, 1)


def hf_image_processing():
    """transformers' numpy (PIL-backend) Qwen2-VL image processor module; its torch twin needs torchvision."""
    try:  # transformers imports lazily: the error may come at attribute access
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as m
        return m.smart_resize, m.Qwen2VLImageProcessorPil
    except ImportError as e:
        pytest.skip(f"HF's numpy image processor does not import ({e}); it needs pillow")


def unpatchify(pixel_values, grid):
    """Naive inverse of the patch layout, one row at a time: (T, 3, H, W)."""
    gt, gh, gw = grid[0].tolist()
    out = torch.zeros(gt * 2, 3, gh * 14, gw * 14)
    k = 0
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        patch = pixel_values[k].view(3, 2, 14, 14)  # (C, T, 14, 14): what Conv3d in the tower reads
                        out[2 * t:2 * t + 2, :, y:y + 14, x:x + 14] = patch.permute(1, 0, 2, 3)
                        k += 1
    assert k == pixel_values.shape[0]
    return out


# -----------------------------------------------------------------------------
# the clips media_files gives: two real, three written to stand in for real ones

def test_camera_default_reader(media_files):
    path = media_files["camera.mp4"]
    frames, info = data.read_video(path, nframes=10)
    assert frames.shape == (10, CAMERA["height"], CAMERA["width"], 3) and frames.dtype == np.uint8
    assert info["reader"] == "pyav"
    assert info["indices"] == np.linspace(0, 279, 10).round().astype(int).tolist()
    assert info["total_frames"] == 280 == CAMERA["frames"] and info["stream"] == 0
    assert info["video_fps"] == 20 == CAMERA["fps"]
    assert abs(info["sampled_fps"] - 20 * 10 / 280) < 1e-9
    if "decord" in READERS:  # H.264 with B-frames: decord's seeking is not trusted there
        with pytest.raises(VideoError, match=re.escape(path) + ".*out of display order"):
            data.read_video(path, nframes=10, reader="decord")


@needs_decord
def test_rotated_upright_in_both_readers(media_files):
    path = media_files["rotated_90.mov"]
    a, _ = data.read_video(path, nframes=2, reader="decord")
    b, _ = data.read_video(path, nframes=2, reader="pyav")
    assert a.shape == b.shape == (2, 568, 320, 3)  # stored 320x568, displayed upright
    good = np.abs(a.astype(np.int16) - b).mean()
    wrong = np.abs(a.astype(int) - np.rot90(b, 2, axes=(1, 2))).mean()  # rotating the raw frame the other way
    assert good < 2 and wrong > 10 * good + 10


def test_webm_without_frame_count(media_files):
    path = media_files["no_count.webm"]
    with av.open(path) as c:  # what the test is about: neither a frame count nor a duration
        assert c.streams.video[0].frames == 0 and c.duration is None
    if "decord" in READERS:  # it refuses the file: 'Failed to measure duration'
        with pytest.raises(VideoError, match=re.escape(path)):
            data.read_video(path, nframes=8, reader="decord")
    frames, info = data.read_video(path, nframes=8)
    assert info["reader"] == "pyav" and info["total_frames"] == 94 == NO_COUNT["frames"]
    assert frames.shape == (8, NO_COUNT["height"], NO_COUNT["width"], 3)
    assert info["indices"] == np.linspace(0, 93, 8).round().astype(int).tolist()


def test_short_fewer_frames_than_asked(media_files):
    path, n = media_files["short.mp4"], SHORT["frames"]  # 36
    with pytest.raises(VideoError, match=re.escape(path) + f".*{n}.*64"):
        data.read_video(path, nframes=64)
    frames, info = data.read_video(path, fps=1000)  # by fps: clamped to the 36 frames there are
    assert frames.shape[0] == n and info["indices"] == list(range(n))


@pytest.mark.parametrize("reader", READERS)
def test_corrupted_names_the_file(reader):
    path = CORRUPTED
    with pytest.raises(VideoError) as e:
        data.read_video(path, nframes=50, reader=reader)
    assert path in str(e.value) and e.value.path == path


def test_missing_and_non_video_files(tmp_path):
    with pytest.raises(VideoError, match="nope.mp4: no such file"):
        data.read_video(str(tmp_path / "nope.mp4"), nframes=4)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    for reader in READERS:
        with pytest.raises(VideoError, match=re.escape(str(text))):
            data.read_video(str(text), nframes=4, reader=reader)


# -----------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize("total,asked", [(280, 32), (1024, 31), (37, 36), (9, 2), (1000, 7)])
def test_sample_indices_uniform_even(total, asked):
    idx, sampled_fps = data.sample_indices("x", total, 25.0, nframes=asked)
    n = max(2, round(asked / 2) * 2)
    assert len(idx) == n and n % 2 == 0
    assert idx.tolist() == np.linspace(0, total - 1, n).round().astype(int).tolist()
    assert len(set(idx.tolist())) == n and abs(sampled_fps - 25.0 * n / total) < 1e-9


def test_sample_by_fps_clamps():
    assert len(data.sample_indices("x", 3600, 30.0, fps=2)[0]) == 240            # 120 s at 2 fps
    assert len(data.sample_indices("x", 36000, 30.0, fps=2)[0]) == 768           # max_frames
    assert len(data.sample_indices("x", 30, 30.0, fps=0.5)[0]) == 4              # min_frames
    assert len(data.sample_indices("x", 35, 30.0, fps=100)[0]) == 34             # odd total: round down, not past it
    with pytest.raises(ValueError):
        data.sample_indices("x", 100, 30.0)


# -----------------------------------------------------------------------------
# preprocessing

def test_smart_resize_invariants():
    for h, w in [(720, 1280), (240, 320), (56, 56), (300, 1000), (1080, 1920), (568, 320), (20, 20)]:
        for max_pixels in (4 * 28 * 28, 128 * 28 * 28, 768 * 28 * 28):
            rh, rw = data.smart_resize(h, w, min_pixels=4 * 28 * 28, max_pixels=max_pixels)
            assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
            assert rh * rw <= max_pixels and (h * w >= 4 * 28 * 28 or rh * rw >= 4 * 28 * 28)
            assert abs(np.log(rh / rw) - np.log(h / w)) < np.log(2)


def test_smart_resize_matches_hf():
    hf_smart_resize, _ = hf_image_processing()
    rng = np.random.default_rng(0)
    for h, w in rng.integers(20, 2000, (300, 2)).tolist():
        lo, hi = 4 * 28 * 28, 128 * 28 * 28
        assert data.smart_resize(h, w, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


def test_patch_layout_matches_naive_reference():
    frames = np.random.default_rng(0).integers(0, 256, (6, 56, 84, 3), dtype=np.uint8)
    pv, grid = data.preprocess(frames)  # 56x84 is already a multiple of 28: no resize
    assert grid.tolist() == [[3, 4, 6]] and grid.dtype == torch.int64
    assert pv.shape == (3 * 4 * 6, 3 * 2 * 14 * 14) and pv.dtype == torch.float32
    assert torch.equal(unpatchify(pv, grid), normalize(frames))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_patch_layout_bit_identical_to_hf(family):
    """Each family's patch size and normalization (model.processor_config; Qwen3-VL: 16 pixels, mean
    and std 0.5), against HF's image processor given the same values."""
    import model as M
    cfg = M.processor_config(M.tiny_config(M.tiny_tokenizer(), family))
    proc = hf_image_processing()[1](**{k: cfg[k] for k in ("patch_size", "image_mean", "image_std")})
    side = cfg["patch_size"] * 2
    for f in np.random.default_rng(1).integers(0, 256, (3, 3 * side, 4 * side, 3), dtype=np.uint8):
        ref = proc(images=[f], do_resize=False, return_tensors="pt")  # an image is a 2-frame video of itself
        pv, grid = data.preprocess(np.stack([f, f]), proc=cfg)
        assert torch.equal(pv, ref["pixel_values"]) and torch.equal(grid, ref["image_grid_thw"])
    assert data.preprocess(np.stack([f, f]), max_pixels=side * side * 12, proc=cfg)[1].tolist() == [[1, 6, 8]]


def test_image_rows_and_text_rows(tmp_path):
    """A row may carry an image (read with PIL: one temporal patch) or nothing (text only); a bad
    image is skipped and counted like a bad video."""
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = data.load_rows(write(tmp_path / "r.jsonl", [
        {"id": "i", "images": ["a.png"], "question": "q", "answer": "A"}, {"id": "t", "question": "q", "answer": "7"},
        {"id": "b", "image": "bad.png", "question": "q", "answer": "A"}]))
    assert rows[0]["image"] == str(tmp_path / "a.png") and rows[0]["video"] is None and rows[1]["image"] is None
    ds = data.VideoDataset(rows, max_pixels=56 * 84)
    with pytest.warns(UserWarning, match="bad.png: not a readable image"):
        got = list(ds.iter_samples())
    assert [s["kind"] for s in got] == ["image", None] and ds.n_bad == 1
    assert got[0]["grid_thw"].tolist() == [[1, 4, 6]] and got[0]["pixel_values"].shape == (24, 3 * 2 * 14 * 14)


def test_odd_frame_count_repeats_last():
    frames = np.random.default_rng(2).integers(0, 256, (3, 28, 56, 3), dtype=np.uint8)
    pv, grid = data.preprocess(frames, min_pixels=28 * 28)
    assert grid.tolist() == [[2, 2, 4]]
    assert torch.equal(pv, data.preprocess(np.concatenate([frames, frames[-1:]]), min_pixels=28 * 28)[0])


def test_resize_keeps_orientation():
    frames = np.full((2, 240, 320, 3), 128, np.uint8)
    frames[:, :120, :, 0] = 255  # top half red
    frames[:, :, 160:, 2] = 0     # right half without blue
    pv, grid = data.preprocess(frames)
    assert grid.tolist() == [[1, 18, 22]]  # 240x320 -> 252x308
    img = unpatchify(pv, grid)[0] * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    img = (img * 255).round()
    assert (img[0, :100] == 255).all() and (img[0, -100:] == 128).all()
    assert (img[2, :, :130] == 128).all() and (img[2, :, -130:] == 0).all()
    assert img.min() >= 0 and img.max() <= 255


def test_video_inputs_second_per_grid(media_files):
    path = media_files["camera.mp4"]  # 280 frames at 20 fps
    x = data.video_inputs(path, nframes=4, reader="pyav", max_pixels=64 * 28 * 28)
    gt, gh, gw = x["grid_thw"][0].tolist()
    assert gt == 2 and x["pixel_values"].shape[0] == gt * gh * gw and gh * 14 * gw * 14 <= 64 * 28 * 28
    assert abs(x["second_per_grid"] - 2 / (20 * 4 / 280)) < 1e-9  # 2 frames per grid at the sampled rate


# -----------------------------------------------------------------------------
# rows

def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_rows_normalizes(tmp_path):
    f = write(tmp_path / "qa.jsonl", [
        {"video": "v/a.mp4", "question": "Which?", "options": ["red", "blue"], "answer": "B", "extra": 1},
        "",
        {"id": "x7", "video": "/abs/b.mp4", "question": "How many?", "answer": 3, "reasoning": "r", "category": "c",
         "trace_answer": 3},
    ])
    rows = data.load_rows(f)
    assert [r["id"] for r in rows] == ["qa.jsonl:1", "x7"]
    assert rows[0]["video"] == str(tmp_path / "v" / "a.mp4") and rows[1]["video"] == "/abs/b.mp4"
    assert rows[0]["answer"] == "B" and rows[1]["answer"] == "3" and rows[0]["extra"] == 1
    assert rows[0]["reasoning"] == "" and rows[0]["category"] == "" and rows[1]["options"] == []
    assert rows[1]["trace_answer"] == "3"  # a string as answer is, so sft.trains_bare compares alike
    assert data.load_rows(f, video_root="/videos")[0]["video"] == "/videos/v/a.mp4"
    q = data.question_text(rows[0])
    assert "Which?\nA. red\nB. blue\n" in q and "<think>" in q and "<answer>" in q and "letter" in q
    assert data.target_text(rows[1]) == "<think>r</think><answer>3</answer>"


def test_load_rows_longvideo_reason_fields(tmp_path):
    problem = "What happens first?\nA. x\nB. y\nC. z\nD. w"
    f = write(tmp_path / "lvr.jsonl", [{"problem": problem, "answer": "C", "videos": ["clips/1.mp4"], "reasoning": "t"},
                                       {"problem": problem, "answer": "A", "videos": "clips/2.mp4"}])
    rows = data.load_rows(f, video_root=tmp_path / "root")
    assert rows[0]["question"] == problem and rows[0]["answer"] == "C" and rows[0]["options"] == []
    assert rows[0]["video"] == str(tmp_path / "root" / "clips" / "1.mp4")
    assert rows[1]["video"] == str(tmp_path / "root" / "clips" / "2.mp4")
    assert "problem" not in rows[0] and "videos" not in rows[0]


def test_split_rows_thirds():
    rows = [{"id": str(i)} for i in range(10)]
    sft, rl = data.split_rows(rows, "sft"), data.split_rows(rows, "rl")
    assert [r["id"] for r in sft] == ["0", "3", "6", "9"] and len(rl) == 6
    assert sorted(r["id"] for r in sft + rl) == sorted(r["id"] for r in rows) and data.split_rows(rows, "all") == rows
    with pytest.raises(ValueError):
        data.split_rows(rows, "train")


@pytest.mark.parametrize("bad,message", [
    ('{"video": "a.mp4", "question": "q", "answer": "A"', "malformed JSON"),
    ({"video": "a.mp4", "question": "q"}, "missing field 'answer'"),
    ({"video": "a.mp4", "image": "a.png", "question": "q", "answer": "A"}, "not both"),
    ({"video": "a.mp4", "question": "q", "options": ["x", "y", "z", "w"], "answer": "E"}, "not one of the option"),
    ({"video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "yes"}, "not one of the option letters"),
    ({"video": "a.mp4", "question": "q", "options": "A. x B. y", "answer": "A"}, "options must be"),
    ({"videos": ["a.mp4", "b.mp4"], "problem": "q", "answer": "A"}, "expected one video"),
    ({"id": "q1", "video": "a.mp4", "question": "q", "answer": "A"}, "duplicate id"),
])
def test_load_rows_errors_name_file_and_line(tmp_path, bad, message):
    good = {"id": "q1", "video": "a.mp4", "question": "q", "answer": "A"}
    f = write(tmp_path / "bad.jsonl", [good, "", bad])
    with pytest.raises(ValueError, match=re.escape(f"{f}:3: ") + ".*" + re.escape(message)):
        data.load_rows(f)


# -----------------------------------------------------------------------------
# the synthetic task

@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth64")
    data.synth(out, n=8, n_frames=64, seed=0, n_test=2)
    return out


def oracle(row, frames):
    """The answer a perfect viewer of these frames gives, from pixels alone."""
    def color(x):  # mean color of a frame -> palette name, or None for the gray background
        rgb = x.reshape(-1, 3).astype(float).mean(0)
        if rgb.max() - rgb.min() < 40:
            return None
        return min(data.COLORS, key=lambda c: np.abs(np.array(data.COLORS[c]) - rgb).sum())

    seq = [color(x) for x in frames]
    runs = [c for i, c in enumerate(seq) if c and (i == 0 or seq[i - 1] != c)]  # one run per flash
    cat, opts = row["category"], row["options"]
    white = [np.argwhere((x > 230).all(-1)) for x in frames]  # the square's pixels
    at = [tuple(w.mean(0) / (frames.shape[1] - 1)) for w in white if len(w)]  # its centre, (row, col) in 0..1
    corner = [" ".join((("top", "bottom")[int(r > 0.5)], ("left", "right")[int(c > 0.5)])) for r, c in at]
    if cat == "direction":
        (r0, c0), (r1, c1) = at[0], at[-1]
        return ("down" if r1 > r0 else "up") if abs(r1 - r0) > abs(c1 - c0) else ("right" if c1 > c0 else "left")
    if cat == "return":
        return "yes" if corner[0] == corner[-1] else "no"
    if cat == "corner":
        return max(set(corner), key=corner.count)
    if cat == "jumps":
        return str(sum(a != b for a, b in zip(corner, corner[1:])))
    if cat in ("count", "flashes"):
        return str(len(runs))
    if cat == "when":
        return data.LETTERS[next(i for i, c in enumerate(seq) if c) * 4 // len(seq)]
    if cat == "longest":
        return data.LETTERS[opts.index(max(opts, key=seq.count))]
    if cat == "after":
        cue = re.search(r"after (\w+)\?", row["question"]).group(1)
        return data.LETTERS[opts.index(next(c for c in runs[runs.index(cue) + 1:] if c in opts))]
    if cat == "counting":
        target = re.search(r"flash (\w+)\?", row["question"]).group(1)
        return data.LETTERS[opts.index(str(runs.count(target)))]
    if cat == "order":
        return data.LETTERS[opts.index(runs[0] if "first" in row["question"] else runs[-1])]
    counts = [runs.count(c) for c in opts]
    if cat == "majority":
        assert sorted(counts)[-2] < max(counts)
        return data.LETTERS[counts.index(max(counts))]
    assert counts.count(0) == 1
    return data.LETTERS[counts.index(0)]


@pytest.mark.parametrize("n_frames,sampled", [(8, 8), (64, 18), (1000, 18)])
def test_synth_decodes_and_answers_survive_sampling(tmp_path, n_frames, sampled):
    counts = data.synth(tmp_path, n=4, n_frames=n_frames, seed=3, n_test=1)
    assert counts == {"train": 3, "test": 1}
    rows = data.load_rows(tmp_path / "train.jsonl") + data.load_rows(tmp_path / "test.jsonl")
    assert sorted(r["category"] for r in rows) == sorted(data.CATEGORIES)
    for row in rows:
        frames, info = data.read_video(row["video"], nframes=sampled)
        assert info["total_frames"] == n_frames and frames.shape == (sampled, 56, 56, 3)
        assert oracle(row, frames) == row["answer"], row


@pytest.mark.parametrize("family", ["motion", "aside"])
def test_other_task_families_answer_from_pixels(tmp_path, family):
    """Every category's answer is what a perfect viewer of the decoded mp4 gives, from all 64 frames
    and from the 32 that sft.py and grpo.py sample by default (brief flashes survive sampling); its
    trace ends in it, a noisy trace in its trace_answer; answer forms: words, numbers, yes/no, letters."""
    data.synth(tmp_path, n=16, n_frames=64, seed=5, n_test=4, noise=0.5, family=family)
    rows = data.load_rows(tmp_path / "train.jsonl") + data.load_rows(tmp_path / "test.jsonl")
    assert sorted({r["category"] for r in rows}) == sorted(data.FAMILIES[family])
    for row in rows:
        for n in (64, 32):
            assert oracle(row, data.read_video(row["video"], nframes=n)[0]) == row["answer"], (n, row)
        said = row.get("trace_answer", row["answer"])
        assert row["reasoning"].endswith(f" {said}.") and (said == row["answer"]) == row["trace_correct"]
        assert data.reward(data.target_text(row), row)["accuracy"] == row["trace_correct"]
    assert any(not r["options"] and r["answer"].isdigit() for r in rows)  # a number to answer
    assert any(not r["trace_correct"] for r in rows)


def beeps_heard(wave):
    """[start, end) samples of each sound well above the hiss, found by energy in 10 ms windows."""
    loud = np.sqrt((wave[:len(wave) // 160 * 160].reshape(-1, 160) ** 2).mean(1)) > 0.1
    edges = np.flatnonzero(np.diff(np.r_[0, loud.astype(int), 0])) * 160
    return list(zip(edges[::2], edges[1::2]))


def listener(row, wave):
    """The answer a perfect listener of the decoded 16 kHz track gives, from the sound alone."""
    beeps, cat = beeps_heard(wave), row["category"]
    if cat == "beeps":
        return str(len(beeps))
    if cat == "heard_when":  # the onset's quarter of the clip
        (start, _), = beeps
        return data.LETTERS[int(4 * start / (row["frames"] / row["fps"] * 16000))]
    assert cat == "pitch"
    hz = [np.abs(np.fft.rfft(wave[a:b])).argmax() * 16000 / (b - a) for a, b in beeps]
    return "high" if hz[0] > hz[1] else "low"


def test_sound_family_answers_from_the_soundtrack(tmp_path):
    """The sound family's mp4s carry a 16 kHz AAC track. Its audio categories are answered by a
    listener to the decoded track, and the frames show nothing (no flash, no square); its video
    category ("flashes") is answered from the pixels, and the track holds no beep. Traces as in the
    other families; answers uniform; the same seed writes the same files."""
    data.synth(tmp_path / "a", n=16, n_frames=64, seed=5, n_test=4, noise=0.5, family="sound")
    rows = [r for s in ("train", "test") for r in data.load_rows(tmp_path / "a" / f"{s}.jsonl")]
    assert sorted({r["category"] for r in rows}) == sorted(data.FAMILIES["sound"])
    for row in rows:
        assert row["audio"] == row["video"]  # "video": its own track
        wave, info = data.read_audio(row["audio"])
        assert info["codec"] == "aac" and info["sample_rate"] == 16000
        assert 0 <= len(wave) - 8 * 16000 < 1024  # 8 s; AAC may pad its last frame of 1024 samples
        frames = data.read_video(row["video"], nframes=24)[0]  # the fewest that see every flash
        flashes = oracle(dict(row, category="flashes"), frames)  # what a viewer counts
        if row["category"] == "flashes":
            assert flashes == row["answer"] and beeps_heard(wave) == [], row
        else:
            assert listener(row, wave) == row["answer"], row
            assert flashes == "0" and not (frames > 230).all(-1).any(), row  # nothing to see
        said = row.get("trace_answer", row["answer"])
        assert row["reasoning"].endswith(f" {said}.")
        assert (said == row["answer"]) == row["trace_correct"]
    assert any(not r["trace_correct"] for r in rows)
    rng = np.random.default_rng(0)
    for cat in ("beeps", "pitch", "heard_when"):
        answers = [data.motion_scenario(rng, cat, 64)["answer"] for _ in range(400)]
        k = max(answers) + 1
        assert all(abs(answers.count(j) - 400 / k) < 60 for j in range(k)), np.bincount(answers)
    data.synth(tmp_path / "b", n=16, n_frames=64, seed=5, n_test=4, noise=0.5, family="sound")
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f


def test_synth_answers_from_pixels(synth64):
    rows = data.load_rows(synth64 / "train.jsonl") + data.load_rows(synth64 / "test.jsonl")
    assert len(rows) == 8 and [r["id"] for r in rows] == [f"synth0-{i:06d}" for i in range(8)]
    for row in rows:
        frames, _ = data.read_video(row["video"], nframes=64, reader="pyav")
        assert oracle(row, frames) == row["answer"]
        assert row["trace_correct"] and row["reasoning"].endswith(f"the answer is {row['answer']}.")


def test_synth_deterministic(synth64, tmp_path):
    data.synth(tmp_path / "same", n=8, n_frames=64, seed=0, n_test=2)
    data.synth(tmp_path / "other", n=8, n_frames=64, seed=1, n_test=2)
    for split in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "same" / split).read_bytes() == (synth64 / split).read_bytes()
        assert (tmp_path / "other" / split).read_bytes() != (synth64 / split).read_bytes()
    a, _ = data.read_video(str(synth64 / "videos" / "000001.mp4"), nframes=64)
    b, _ = data.read_video(str(tmp_path / "same" / "videos" / "000001.mp4"), nframes=64)
    c, _ = data.read_video(str(tmp_path / "other" / "videos" / "000001.mp4"), nframes=64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_synth_noise_changes_traces_only(synth64, tmp_path):
    data.synth(tmp_path, n=8, n_frames=64, seed=0, n_test=2, noise=1.0)
    for split in ("train", "test"):
        clean = data.load_rows(synth64 / f"{split}.jsonl")
        noisy = data.load_rows(tmp_path / f"{split}.jsonl")
        assert len(clean) == len(noisy)
        for c, n in zip(clean, noisy):
            assert n["answer"] == c["answer"] and n["question"] == c["question"] and n["options"] == c["options"]
            if split == "test":
                assert n == {**c, "video": n["video"]}  # test traces are never noisy
                continue
            assert n["trace_correct"] is False and n["trace_answer"] != n["answer"]
            assert n["reasoning"].endswith(f"the answer is {n['trace_answer']}.") and n["reasoning"] != c["reasoning"]
            assert data.target_text(n).endswith(f"<answer>{n['trace_answer']}</answer>")
    a, _ = data.read_video(str(synth64 / "videos" / "000000.mp4"), nframes=64)
    b, _ = data.read_video(str(tmp_path / "videos" / "000000.mp4"), nframes=64)
    assert np.array_equal(a, b)


def test_synth_answer_letters_balanced():
    for category in data.CATEGORIES:
        rng = np.random.default_rng(0)
        for n_pos in (4, 8):  # short videos still answer one of the options
            assert all(len(data.synth_scenario(rng, category, n_pos)["events"]) <= n_pos for _ in range(50))
        letters = [data.synth_scenario(rng, category, 8)["answer"] for _ in range(400)]
        assert all(60 < letters.count(k) < 140 for k in range(4)), (category, np.bincount(letters))


# -----------------------------------------------------------------------------
# dataset: bad videos are skipped, counted, never replaced

def test_dataset_skips_bad_videos(synth64, tmp_path):
    rows = data.load_rows(synth64 / "train.jsonl")[:2]
    bad = [dict(rows[0], id="corrupt", video=CORRUPTED),
           dict(rows[0], id="gone", video=str(tmp_path / "x.mp4"))]
    ds = data.VideoDataset([rows[0], bad[0], bad[1], rows[1]], nframes=8, max_pixels=56 * 56)
    with pytest.warns(UserWarning) as caught:
        got = list(ds.iter_samples())
    assert [s["id"] for s in got] == [rows[0]["id"], rows[1]["id"]]
    assert [s["video"] for s in got] == [rows[0]["video"], rows[1]["video"]]
    assert ds.n_bad == 2 and [i for i, _ in ds.bad] == ["corrupt", "gone"]
    assert "corrupted.mp4" in ds.bad[0][1] and "no such file" in ds.bad[1][1]
    assert len(caught) == 2 and "corrupt" in str(caught[0].message) and "corrupted.mp4" in str(caught[0].message)
    s = got[0]
    assert s["grid_thw"].tolist() == [[4, 4, 4]] and s["pixel_values"].shape == (64, 1176)
    assert abs(s["second_per_grid"] - 2 / (8 * 8 / 64)) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad sample warns once, not once per epoch
        assert [s["id"] for s in ds.iter_samples([3, 2, 1, 0])] == [rows[1]["id"], rows[0]["id"]]
    assert ds.n_bad == 2
    with pytest.raises(VideoError):
        list(data.VideoDataset(bad, nframes=8, skip_bad=False).iter_samples())


# -----------------------------------------------------------------------------
# the probe command

def run_probe(*args):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), "probe", *args],
                          capture_output=True, text=True, timeout=120)


def test_probe_prints_json_last(synth64):
    r = run_probe(str(synth64 / "videos" / "000000.mp4"), "--frames", "16", "--max-pixels", str(56 * 56))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["total_frames"] == 64 and res["frames_sampled"] == 16 and res["grid_thw"] == [8, 4, 4]
    assert res["video_tokens"] == 8 * 4 * 4 // 4 and res["frame_size"] == [56, 56] and res["source_size"] == [56, 56]
    assert res["reader"] in ("decord", "pyav") and res["seconds"] >= 0


def test_probe_fails_on_corrupted():
    path = CORRUPTED
    r = run_probe(path, "--frames", "8")
    assert r.returncode == 1
    assert path in r.stderr.strip().splitlines()[-1]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert path in res["error"]


def test_synth_unknown_category_raises():
    """A category that does not exist is an error, not silently another category's scenario."""
    with pytest.raises(ValueError, match="unknown synthetic-task category 'temporal_order'"):
        data.synth_scenario(np.random.default_rng(0), "temporal_order", 8)
    assert data.synth_scenario(np.random.default_rng(0), "absent", 8)["options"] == data.OPTION_COLORS


# -----------------------------------------------------------------------------
# real-world kinds of file, written in code: the right frames or a VideoError, never wrong frames

def blocks(n, h, w, seed=0):
    """n distinct frames of flat 8x8 colour blocks (flat areas make chroma subsampling exact)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)


def stream(frames, codec="libx264", fps=25, pix_fmt="yuv420p", sar=None, **options):
    return dict(frames=frames, codec=codec, fps=fps, pix_fmt=pix_fmt, sar=sar, options=options)


def write_clip(path, *streams):
    """Mux one or more video streams with PyAV (frames interleaved, as a camera writes them)."""
    with av.open(str(path), "w") as c:
        out = []
        for st in streams:
            s = c.add_stream(st["codec"], rate=st["fps"])
            s.height, s.width, s.pix_fmt = *st["frames"].shape[1:3], st["pix_fmt"]
            s.options = st["options"]
            if st["sar"]:
                s.codec_context.sample_aspect_ratio = st["sar"]
            out.append(s)
        for i in range(max(len(st["frames"]) for st in streams)):
            for s, st in zip(out, streams):
                if i < len(st["frames"]):
                    c.mux(s.encode(av.VideoFrame.from_ndarray(st["frames"][i], format="rgb24")))
        for s in out:
            c.mux(s.encode())
    return str(path)


def write_cover_art(path):
    """An mp3 with a cover picture: a video stream of one still, marked attached_pic."""
    with av.open(str(path), "w") as c:
        a = c.add_stream("libmp3lame", rate=8000, layout="mono")
        v = c.add_stream("mjpeg")
        v.width, v.height, v.pix_fmt = 32, 32, "yuvj420p"
        v.disposition = av.stream.Disposition.attached_pic
        cover = av.VideoFrame.from_ndarray(blocks(1, 32, 32)[0], format="rgb24")
        for p in v.encode(cover) + v.encode():
            c.mux(p)
        sound = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16",
                                           layout="mono")
        sound.sample_rate = 8000
        for p in a.encode(sound) + a.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory, media_files):
    """The kinds of file the issue found, a few KB each (about 2 s to write them all), and the
    clips of media_files."""
    d = tmp_path_factory.mktemp("clips")
    hevc = "libx265" in av.codecs_available
    # open GOPs: keyframes whose leading B-frames are shown before them, as x265 writes by default;
    # decord's frame counting after a seek lands on the wrong frames there
    if hevc:
        reorder = dict(codec="libx265", preset="ultrafast",
                       **{"x265-params": "bframes=3:keyint=8:min-keyint=8:log-level=error"})
    else:
        reorder = dict(codec="libx264", x264opts="bframes=3:keyint=6:open-gop=1:b-pyramid=normal")
    deep = dict(codec="libx265", **{"x265-params": "lossless=1:log-level=error"}) if hevc else \
        dict(codec="libx264", qp="0")
    clips = {
        "bframes.mp4": write_clip(d / "bframes.mp4", stream(blocks(30, 64, 64), **reorder)),
        "bframes.mkv": write_clip(d / "bframes.mkv", stream(blocks(30, 64, 64), **reorder)),
        "open_gop_h264.mp4": write_clip(d / "open_gop_h264.mp4", stream(
            blocks(30, 32, 32), x264opts="bframes=3:keyint=6:open-gop=1:b-pyramid=normal")),
        "two_streams.mp4": write_clip(d / "two_streams.mp4", stream(blocks(12, 32, 32)),
                                      stream(blocks(15, 48, 64, seed=1), fps=30)),
        "wide.mp4": write_clip(d / "wide.mp4", stream(blocks(4, 8, 1704))),  # 213:1
        "one_frame.mp4": write_clip(d / "one_frame.mp4", stream(blocks(1, 32, 32))),
        "ten_bit.mp4": write_clip(d / "ten_bit.mp4",
                                  stream(blocks(6, 64, 64), pix_fmt="yuv420p10le", **deep)),
        "non_square.mp4": write_clip(d / "non_square.mp4",
                                     stream(blocks(4, 56, 56), sar=Fraction(2))),  # 2:1 pixels
        "cover.mp3": write_cover_art(d / "cover.mp3"),
    }
    whole = write_clip(d / "whole.webm", stream(blocks(24, 32, 32), codec="libvpx-vp9"))
    (d / "truncated.webm").write_bytes(Path(whole).read_bytes()[:Path(whole).stat().st_size // 3])
    clips["truncated.webm"] = str(d / "truncated.webm")
    mp4 = Path(write_clip(d / "whole.mp4", stream(blocks(24, 32, 32))))  # its index is at the end
    (d / "truncated.mp4").write_bytes(mp4.read_bytes()[:mp4.stat().st_size * 2 // 3])
    clips["truncated.mp4"] = str(d / "truncated.mp4")
    return dict(clips, **media_files)


def sequential(path, indices):
    """The naive reference: PyAV decodes the best video stream from its first frame, one frame
    after another, stretches non-square pixels, converts >8-bit video with exact rounding, turns
    each frame upright."""
    exact = av.video.reformatter.Interpolation
    exact = exact.BILINEAR | exact.ACCURATE_RND | exact.FULL_CHR_H_INT
    with av.open(path) as c:
        s, frames = c.streams.best("video"), {}
        sar = s.sample_aspect_ratio or 1
        size = dict(width=round(s.width * max(sar, 1)), height=round(s.height / min(sar, 1)))
        for i, f in enumerate(c.decode(s)):
            if i in indices:
                deep = max(x.bits for x in f.format.components) > 8
                a = f.to_ndarray(format="rgb24", interpolation=exact if deep else None, **size)
                frames[i] = np.rot90(a, k=round(f.rotation / 90) % 4)
    return np.stack([frames[i] for i in indices])


REORDERED = ["bframes.mp4", "bframes.mkv", "open_gop_h264.mp4"]
GOOD = ["bframes.mp4", "bframes.mkv", "open_gop_h264.mp4", "two_streams.mp4", "one_frame.mp4",
        "ten_bit.mp4", "non_square.mp4", "truncated.webm"]
REAL = ["camera.mp4", "short.mp4", "rotated_90.mov", "no_count.webm"]


@pytest.mark.parametrize("name", GOOD + REAL)
def test_default_reader_gives_the_display_positions(made, name):
    path = made[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncated clip warns; its own test checks that
        for n in (2, 8, 10, 16):
            try:
                frames, info = data.read_video(path, nframes=n)
            except data.TooFewFrames:
                continue
            assert np.array_equal(frames, sequential(path, info["indices"])), (n, info["indices"])


@pytest.mark.parametrize("name", REORDERED + ["camera.mp4"])
def test_pyav_reader_any_positions(made, name):
    """Positions that skip frame 0 and jump across keyframes."""
    path = made[name]
    ix = data.video_stream(path)
    n = ix["total"]
    rng = np.random.default_rng(0)
    sets = [[n - 1], [n // 2, n - 1]] + [sorted(rng.choice(n, 3, replace=False)) for _ in range(3)]
    union = sorted({i for idx in sets for i in idx})
    ref = dict(zip(union, sequential(path, union)))
    for idx in sets:
        got, _ = data.read_video_pyav(path, ix, np.array(idx))
        assert np.array_equal(got, np.stack([ref[i] for i in idx])), idx


@needs_decord
@pytest.mark.parametrize("name", GOOD + REAL)
def test_decord_gives_the_same_frames_or_refuses(made, name):
    path = made[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames, info = data.read_video(path, nframes=2)
        try:
            got, _ = data.read_video(path, nframes=2, reader="decord")
        except VideoError as e:
            assert e.path == path and e.reason
            return
    assert np.array_equal(got, frames)


@pytest.mark.parametrize("name", GOOD + REAL)
def test_probe_names_the_stream(made, name, capsys):
    path = made[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert data.main(["probe", path, "--frames", "2"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    with av.open(path) as c:
        best, n = c.streams.best("video").index, len(c.streams.video)
    assert res["stream"] == best and res["video_streams"] == n
    assert f"video stream #{best} of {n}" in out


def test_two_video_streams_read_as_one_choice(made):
    path = made["two_streams.mp4"]
    frames, info = data.read_video(path, nframes=4)  # ffmpeg's best: the first, 32x32, 12 frames
    assert frames.shape == (4, 32, 32, 3) and info["total_frames"] == 12 and info["stream"] == 0
    if "decord" in READERS:  # decord cannot be told which stream; it picks 64x48 here
        with pytest.raises(VideoError, match=re.escape(path) + ".*2 video streams"):
            data.read_video(path, nframes=4, reader="decord")


@needs_decord
@pytest.mark.parametrize("name", REORDERED)
def test_decord_refuses_streams_stored_out_of_order(made, name):
    with pytest.raises(VideoError, match="out of display order"):
        data.read_video(made[name], nframes=8, reader="decord")


def test_extreme_aspect_is_a_video_error(made):
    with pytest.raises(VideoError, match=re.escape(made["wide.mp4"]) + ".*aspect ratio"):
        data.video_inputs(made["wide.mp4"], nframes=4)


def test_one_frame_fills_a_temporal_patch(made):
    path = made["one_frame.mp4"]
    for kw in (dict(nframes=1), dict(nframes=2), dict(fps=2)):
        frames, info = data.read_video(path, **kw)
        assert frames.shape == (2, 32, 32, 3) and info["indices"] == [0, 0]
        assert np.array_equal(frames, sequential(path, [0, 0]))
    with pytest.raises(data.TooFewFrames):
        data.read_video(path, nframes=4)
    assert data.video_inputs(path, nframes=1)["grid_thw"].tolist()[0][0] == 1


def test_cover_art_is_not_a_video(made):
    with pytest.raises(VideoError, match=re.escape(made["cover.mp3"]) + ": no video stream"):
        data.read_video(made["cover.mp3"], nframes=2)


def test_directory_says_so(tmp_path):
    with pytest.raises(VideoError, match=re.escape(str(tmp_path)) + ": is a directory"):
        data.read_video(str(tmp_path), nframes=2)


def test_truncated_webm_warns_with_both_counts(made):
    path = made["truncated.webm"]
    with pytest.warns(UserWarning, match=re.escape(path) + r".* 24 frames.* 5 ") as caught:
        frames, info = data.read_video(path, nframes=4)
    assert len(caught) == 1 and info["total_frames"] == 5 and info["container_frames"] == 24
    assert np.array_equal(frames, sequential(path, info["indices"]))


def test_ten_bit_converted_exactly(made):
    """Against BT.601 limited range computed in float from the decoded 10-bit samples: within
    1/255 everywhere inside the flat blocks (the default conversion: 1.3/255 on average there)."""
    path = made["ten_bit.mp4"]
    frames, _ = data.read_video(path, nframes=6)
    with av.open(path) as c:
        yuv = np.stack([f.to_ndarray(format="yuv444p16le") for f in c.decode(video=0)])
    yuv = yuv.astype(np.float64) / 256  # 16-bit samples, 8-bit scale
    y, u, v = (yuv[..., 0] - 16) / 219, (yuv[..., 1] - 128) / 224, (yuv[..., 2] - 128) / 224
    ref = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    ref = (ref * 255).clip(0, 255).round()
    assert np.abs(frames - ref)[:, inside_blocks(64, 64, 8, 8)].max() <= 1


def inside_blocks(h, w, bh, bw):
    """Mask of the middle half of each bh x bw block, away from where chroma and scaling blend."""
    rows, cols = np.arange(h) % bh, np.arange(w) % bw
    rows, cols = (rows >= bh // 4) & (rows < bh * 3 // 4), (cols >= bw // 4) & (cols < bw * 3 // 4)
    return rows[:, None] & cols[None, :]


def test_non_square_pixels_resized_to_display_aspect(made):
    path = made["non_square.mp4"]
    frames, info = data.read_video(path, nframes=2)
    assert frames.shape == (2, 56, 112, 3) and info["pixel_aspect"] == 2.0  # stored 56x56
    with av.open(path) as c:  # the clip's flat 8x8 blocks, each shown 8x16
        raw = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])[info["indices"]]
    diff = np.abs(frames.astype(int) - raw.repeat(2, axis=2))[:, inside_blocks(56, 112, 8, 16)]
    assert diff.mean() < 2  # swscale's 8-bit conversion differs when it scales; other blocks: ~85
    assert data.video_inputs(path, nframes=2)["grid_thw"].tolist() == [[1, 4, 8]]


def test_dataset_yields_exactly_the_good_samples(made, synth64, tmp_path):
    """Every kind of bad file is skipped and counted, with a warning naming file and reason."""
    base = data.load_rows(synth64 / "train.jsonl")[0]
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    bad = {"wide": (made["wide.mp4"], "aspect ratio"),
           "cover": (made["cover.mp3"], "no video stream"),
           "dir": (str(tmp_path), "is a directory"),
           "gone": (str(tmp_path / "gone.mp4"), "no such file"),
           "text": (str(text), "PyAV"),
           "cut": (made["truncated.mp4"], "PyAV"),
           "corrupt": (CORRUPTED, "")}
    good = {name: made[name] for name in GOOD}
    rows = [dict(base, id=rid, video=path) for rid, path in good.items()]
    for k, (rid, (path, _)) in enumerate(bad.items()):  # each bad row just before a good one
        rows.insert(2 * k + 1, dict(base, id=rid, video=path))
    ds = data.VideoDataset(rows, nframes=2, max_pixels=64 * 28 * 28)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [s["id"] for s in ds.iter_samples()]
    assert got == list(good) and ds.n_bad == len(bad) == 7
    assert [i for i, _ in ds.bad] == list(bad)
    skipped = [str(w.message) for w in caught if str(w.message).startswith("skipping")]
    assert len(skipped) == len(bad)
    for message, (rid, (path, reason)) in zip(skipped, bad.items()):
        assert f"skipping sample {rid}: {path}: " in message and reason in message, message


# -----------------------------------------------------------------------------
# frames resized as they are decoded; an SP rank's share of a video

QWEN3 = dict(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def resized_after(path, nframes, reader, proc, max_pixels):
    """The old order of operations: every frame at the file's size, then preprocess."""
    frames, _ = data.read_video(path, nframes=nframes, reader=reader)
    return data.preprocess(frames, proc=proc, max_pixels=max_pixels)


@pytest.mark.parametrize("name", ["camera.mp4", "rotated_90.mov", "no_count.webm", "non_square.mp4",
                                  "ten_bit.mp4", "one_frame.mp4", "synth"])
def test_resized_as_decoded_equals_resized_after(made, synth64, name):
    """video_inputs resizes each frame as it is decoded: the same bits as resizing them all after,
    for each reader that reads the clip, both patch sizes, and a size that needs no resize."""
    path = str(synth64 / "videos" / "000003.mp4") if name == "synth" else made[name]
    n = max(2, min(6, data.video_stream(path)["total"] // 2 * 2))
    for reader in READERS[1:]:
        for proc, max_pixels in ((None, data.MAX_PIXELS), (QWEN3, 64 * 28 * 28), (None, 56 * 112)):
            try:
                pv, grid = resized_after(path, n, reader, proc, max_pixels)
            except VideoError:  # decord refuses most of them (its own tests say why)
                assert reader == "decord"
                break
            x = data.video_inputs(path, nframes=n, reader=reader, proc=proc, max_pixels=max_pixels)
            assert torch.equal(x["pixel_values"], pv) and torch.equal(x["grid_thw"], grid)
            source = data.read_video(path, nframes=n)[0].shape[1:3]
            assert (x["info"]["height"], x["info"]["width"]) == source


def write_noise_720p(path, n):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, 90, 160, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
    return write_clip(path, stream(frames, preset="ultrafast"))  # 1280x720


def test_reading_holds_frames_at_model_size(tmp_path):
    """24 frames of 1280x720: numpy's peak while reading (traced) stays far below the 66 MB the
    frames take at the file's size (the old reader stacked them, then copied the stack: 133 MB)."""
    import tracemalloc
    path, n = write_noise_720p(tmp_path / "hd.mp4", 24), 24
    tracemalloc.start()
    try:
        x = data.video_inputs(path, nframes=n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    full = 720 * 1280 * 3
    assert x["grid_thw"].tolist() == [[12, 16, 30]] and x["info"]["height"] == 720
    assert peak < n * full / 4, (peak, n * full)
    frames, _ = data.read_video(path, nframes=n, fit=lambda a: a[::4, ::4].copy())
    assert frames.shape == (n, 180, 320, 3)  # what fit gives back is what is kept


def test_sp_shares_join_into_the_whole_video(synth64):
    """Each SP rank keeps a contiguous near-even share of the temporal groups; the shares in rank
    order are the whole video's pixel rows, and the rest of the sample is the whole video's."""
    row = data.load_rows(synth64 / "train.jsonl")[1]
    for n, sp, shares in ((10, 2, [(0, 3), (3, 2)]), (10, 3, [(0, 2), (2, 2), (4, 1)]),
                          (2, 2, [(0, 1), (1, 0)])):
        whole = data.VideoDataset([row], nframes=n, max_pixels=56 * 56)[0]
        parts = [data.VideoDataset([row], nframes=n, max_pixels=56 * 56, sp=(r, sp))[0]
                 for r in range(sp)]
        assert [p["share"] for p in parts] == shares and "share" not in whole
        assert torch.equal(torch.cat([p["pixel_values"] for p in parts]), whole["pixel_values"])
        for p, (_, k) in zip(parts, shares):
            assert p["pixel_values"].shape == (k * 16, 1176)  # 4x4 patches a temporal group
            assert torch.equal(p["grid_thw"], whole["grid_thw"])
            assert all(p[k] == whole[k] for k in ("frame_times", "second_per_grid"))
    one = data.VideoDataset([row], nframes=4, max_pixels=56 * 56, sp=(0, 1))[0]
    assert "share" not in one and one["pixel_values"].shape == (2 * 16, 1176)  # sp 1: as without


@pytest.mark.parametrize("name", ["wide.mp4", "truncated.mp4", "corrupted"])
def test_every_sp_rank_refuses_a_bad_video(made, name):
    """SP peers skip the same samples (or their collectives would pair different videos): a rank
    decodes the frames outside its share too, and checks the frame size with none of its own."""
    path = CORRUPTED if name == "corrupted" else made[name]
    for r in range(4):
        with pytest.raises(VideoError, match=re.escape(path)):
            data.video_inputs(path, nframes=4, sp=(r, 4))
