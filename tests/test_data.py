"""Tests for data.py: decoding, sampling, preprocessing layout, rows, the synthetic task, the probe command.

    python -m pytest tests/test_data.py -q

The real clips live in ../shared/videos (see its README.md); tests that need them skip when it is absent.
"""
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from data import VideoError  # noqa: E402

VIDEOS = ROOT.parent / "shared" / "videos"
try:
    import decord  # noqa: F401
    READERS = [None, "decord", "pyav"]
except ImportError:
    READERS = [None, "pyav"]
needs_decord = pytest.mark.skipif("decord" not in READERS, reason="decord is not installed")


def clip(name):
    path = VIDEOS / name
    if not path.exists():
        pytest.skip(f"{path} absent (real test clips come from ../shared/videos)")
    return str(path)


def corrupted(tmp_path):
    """The real broken clip, or (on a fresh clone without ../shared) a file of junk bytes by the same name."""
    if (VIDEOS / "corrupted.mp4").exists():
        return str(VIDEOS / "corrupted.mp4")
    path = tmp_path / "corrupted.mp4"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8)))
    return str(path)


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
# the five real clips

@needs_decord
def test_cockatoo_both_readers_agree():
    path = clip("cockatoo.mp4")
    a, ia = data.read_video(path, nframes=10, reader="decord")
    b, ib = data.read_video(path, nframes=10, reader="pyav")
    assert a.shape == b.shape == (10, 720, 1280, 3) and a.dtype == b.dtype == np.uint8
    assert ia["indices"] == ib["indices"] == np.linspace(0, 279, 10).round().astype(int).tolist()
    assert ia["total_frames"] == ib["total_frames"] == 280 and ia["video_fps"] == ib["video_fps"] == 20
    assert abs(ia["sampled_fps"] - 20 * 10 / 280) < 1e-9
    assert np.abs(a.astype(np.int16) - b).mean() < 1.0
    # frame k must be frame k: neighbouring sampled frames differ far more than the two readers do
    assert np.abs(a[1:].astype(np.int16) - b[:-1]).mean() > 5 * np.abs(a.astype(np.int16) - b).mean() + 1


@needs_decord
def test_rotated_upright_in_both_readers():
    path = clip("rotated_90.mov")
    a, _ = data.read_video(path, nframes=2, reader="decord")
    b, _ = data.read_video(path, nframes=2, reader="pyav")
    assert a.shape == b.shape == (2, 568, 320, 3)  # stored 320x568, displayed upright
    good = np.abs(a.astype(np.int16) - b).mean()
    wrong = np.abs(a.astype(int) - np.rot90(b, 2, axes=(1, 2))).mean()  # rotating the raw frame the other way
    assert good < 2 and wrong > 10 * good + 10


def test_webm_falls_back_to_pyav():
    path = clip("test.webm")
    if "decord" in READERS:
        with pytest.raises(VideoError, match=re.escape(path)):
            data.read_video(path, nframes=8, reader="decord")
    frames, info = data.read_video(path, nframes=8)
    assert info["reader"] == "pyav" and info["total_frames"] == 94 and frames.shape == (8, 480, 640, 3)
    assert info["indices"] == np.linspace(0, 93, 8).round().astype(int).tolist()


def test_realshort_fewer_frames_than_asked():
    path = clip("realshort.mp4")
    with pytest.raises(VideoError, match=re.escape(path) + ".*36.*64"):
        data.read_video(path, nframes=64)
    frames, info = data.read_video(path, fps=1000)  # by fps: clamped to the 36 frames there are
    assert frames.shape[0] == 36 and info["indices"] == list(range(36))


@pytest.mark.parametrize("reader", READERS)
def test_corrupted_names_the_file(reader, tmp_path):
    path = corrupted(tmp_path)
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


def test_video_inputs_second_per_grid():
    path = clip("cockatoo.mp4")
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
        {"id": "x7", "video": "/abs/b.mp4", "question": "How many?", "answer": 3, "reasoning": "r", "category": "c"},
    ])
    rows = data.load_rows(f)
    assert [r["id"] for r in rows] == ["qa.jsonl:1", "x7"]
    assert rows[0]["video"] == str(tmp_path / "v" / "a.mp4") and rows[1]["video"] == "/abs/b.mp4"
    assert rows[0]["answer"] == "B" and rows[1]["answer"] == "3" and rows[0]["extra"] == 1
    assert rows[0]["reasoning"] == "" and rows[0]["category"] == "" and rows[1]["options"] == []
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
        for reader in READERS[1:]:
            frames, info = data.read_video(row["video"], nframes=sampled, reader=reader)
            assert info["total_frames"] == n_frames and frames.shape == (sampled, 56, 56, 3)
            assert oracle(row, frames) == row["answer"], (reader, row)


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
    bad = [dict(rows[0], id="corrupt", video=corrupted(tmp_path)),
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


def test_probe_fails_on_corrupted(tmp_path):
    path = corrupted(tmp_path)
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
