"""Video data for longrl: decode, sample, preprocess (Qwen's patch layout), QA rows, a synthetic
task.

    python data.py probe VIDEO --frames 32   # decode, preprocess; its audio; last line JSON
    python data.py probe VIDEO --fps 2 --max-pixels 50176
    python data.py synth --out data/synth --n 1000 --frames 256 --seed 0  # videos/*.mp4, {train,test}.jsonl
    python data.py synth --out data/sound --family sound --frames 64  # with a soundtrack
    python data.py generate VIDEOS_DIR --out DIR   # clips, captions, QA rows; tiny model: offline
    python data.py generate VIDEOS_DIR --out DIR --api-base http://localhost:8000/v1 \\
        --captioner Qwen/Qwen2.5-VL-7B-Instruct --writer Qwen/Qwen3-8B   # any OpenAI-style server
    python -m pytest tests/test_data.py -q
    python -m pytest tests/test_audio.py -q

In Python (what model.py and the training scripts use):
    frames, info = read_video(path, nframes=32)  # uint8 (T, H, W, 3), T even, upright
    pixel_values, grid_thw = preprocess(frames)  # (T/2*H/14*W/14, 3*2*14*14) float32, [[T/2, H/14, W/14]]
    x = video_inputs(path, nframes=32)           # dict(kind, pixel_values, grid_thw, second_per_grid, ...)
    x = image_inputs(path)                       # an image: one temporal patch, grid [[1, H/14, W/14]]
    rows = load_rows("data/synth/train.jsonl")   # normalized rows: a video, an image, or neither (text)
    ds = VideoDataset(rows, nframes=32, proc=model.processor_config(config))  # the family's patches
    # a row's "audio" (a file, or "video": its own track) reaches a model that hears (Qwen2.5-Omni's
    # proc) as input_features; VideoDataset(..., mute=True): silence instead (audio-blind control)
    ds.iter_samples(range(rank, len(ds), world))  # skips bad videos and images, counting them
    wave, info = read_audio(path, start, end)    # 16 kHz mono float32 of [start, end) s; or NoAudio
    feats, mask = audio_features(wave)           # Qwen2.5-Omni's log-mels (1, 128, n), mask (1, n)
    audio_tokens(n)                              # the thinker's tokens for n mel frames: 25/second

Sampling as in Long-RL / qwen-vl-utils: n rounded to even, indices linspace(0, total-1, n).round();
second_per_grid = 2 / sampled_fps feeds M-RoPE's temporal positions. Position i is the i-th frame
shown (display order) of the file's best video stream. PyAV reads it and finds each frame by its
timestamp, seeking only across keyframes; decord is an opt-in reader, refused on streams where it
would return other frames (decord_refuses). video_inputs resizes each frame to the model's size as
soon as it is decoded: host memory holds the sampled frames at that size and one at the file's.
Under sequence parallelism (sp=(rank, degree)) a rank keeps only its share of the temporal groups
(sp_share), yet decodes them all, so that every rank refuses the same bad files. Anything wrong
with a file (missing, a directory, no video stream, undecodable, an aspect ratio Qwen refuses)
raises VideoError naming it; a dataset skips and counts it, never substituting another video. A
file shorter than its container says (truncated) warns with both counts and is sampled from the
frames it has.

Synthetic task (`synth`): mildly textured gray background; time is cut into 16 equal slots (one
frame each when F < 16), events fill whole odd slots, so each event and gap lasts >= floor(F/16)
frames. n uniform frames see them all when n >= 1 + (F-1)/floor(F/16): 18 when 16 divides F (18 of
1024, 18 of 64), all when F <= 16; fewer miss events. Categories (4 fixed options, answers uniform):
  order           red, green, blue and yellow flash once each; which came first / last
  counting        how many times the screen flashed a color (1-4), among flashes of other colors
  majority        which of red, green, blue, yellow flashed most often
  absent          three of red, green, blue, yellow flash; which never did
The letter follows from what was seen; questions need events from the whole video. In CPU minutes a
2.6M-parameter model learns full-screen colour events, not where in the frame or when in seconds.
"""
import argparse
import bisect
import collections
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE  # frame sides are multiples of 28 so 2x2 patches merge into one token
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS, MIN_PIXELS = 128 * 28 * 28, 4 * 28 * 28  # per frame; Long-RL's video runs use 128*28*28
LETTERS = "ABCDEFGHIJ"


class VideoError(Exception):
    """A video that cannot be used; the message always starts with the file's path."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class TooFewFrames(VideoError):
    """More frames asked for than the video has."""


def _short(e):
    lines = str(e).strip().splitlines()  # decord appends a C++ backtrace: keep the first line
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


# -----------------------------------------------------------------------------
# decoding and frame sampling

def sample_indices(path, total, video_fps, nframes=None, fps=None, min_frames=4, max_frames=768):
    """Frame indices to keep, and the effective frame rate of the kept frames."""
    if (nframes is None) == (fps is None):
        raise ValueError("give exactly one of nframes, fps")
    if nframes is not None:
        n = max(2, round(nframes / 2) * 2)
    else:
        if not video_fps > 0:
            raise VideoError(path, "unknown frame rate, cannot sample by fps (use nframes)")
        n = min(max(total / video_fps * fps, min_frames), max_frames, total)
        n = max(2, min(round(n / 2) * 2, total // 2 * 2))  # never round past the last frame
    if total == 1 and n == 2:  # a still: its one frame fills the temporal patch twice
        return np.zeros(2, int), video_fps * 2
    if n > total:
        raise TooFewFrames(path, f"has {total} frames, asked for {n}")
    idx = np.linspace(0, total - 1, n).round().astype(int)
    return idx, video_fps * n / total


def video_stream(path):
    """The video stream both readers decode, and where its frames are: PyAV reads the packets'
    timestamps without decoding anything. The stream is ffmpeg's best (av_find_best_stream, as its
    command line picks); a cover picture is not a video. A dict: stream (its index), video_streams,
    codec, pix_fmt, bits, fps, pixel_aspect, width and height as shown, container_frames, total
    (frames present), pts (display order), keys (keyframes' pts), reordered."""
    import av
    if os.path.isdir(path):
        raise VideoError(path, "is a directory, not a video file")
    if not os.path.isfile(path):
        raise VideoError(path, "no such file")
    try:
        with av.open(str(path)) as c:
            s = c.streams.best("video")
            if s is None or s.disposition & av.stream.Disposition.attached_pic:
                raise VideoError(path, "no video stream" + (" (only a cover picture)" if s else ""))
            rate = s.average_rate or s.guessed_rate
            fps = float(rate) if rate else 0.0
            fmt = s.codec_context.format
            # WebM/MKV give no stream duration; the file's is the stream's only if it has no other
            seconds = float(s.duration * s.time_base) if s.duration else \
                (c.duration or 0) / 1e6 if len(c.streams) == 1 else 0
            aspect = s.sample_aspect_ratio or 1  # width / height of one pixel as shown
            ix = dict(stream=s.index, video_streams=len(c.streams.video),
                      codec=s.codec_context.name, pix_fmt=fmt.name if fmt else "", fps=fps,
                      bits=max(x.bits for x in fmt.components) if fmt else 8,
                      # the size shown (before rotation): non-square pixels stretched, not squeezed
                      pixel_aspect=float(aspect), width=round(s.width * max(aspect, 1)) or None,
                      height=round(s.height / min(aspect, 1)) or None,  # None: as decoded
                      container_frames=s.frames or round(seconds * fps) or None,
                      counted=bool(s.frames))  # else a guess from the duration, maybe 1 off
            packets = [(p.pts, p.dts, p.is_keyframe) for p in c.demux(s) if p.size]
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(path, f"PyAV cannot read it ({_short(e)})") from e
    pts = [p for p, _, _ in packets]
    ix["total"] = len(pts)
    if not pts:
        raise VideoError(path, f"no frames (the container says {ix['container_frames'] or 0})")
    # Frames are found by their timestamps when every packet has its own, otherwise by counting
    # from the first; keyframes (by pts) are where decoding may start after a seek
    timed = None not in pts and len(set(pts)) == len(pts)
    ix["pts"] = sorted(pts) if timed else None  # display order
    ix["keys"] = sorted(p for p, _, k in packets if k) if timed else []
    # B-frames are decoded before they are shown; a stream that allows them (dts behind pts) keeps
    # the decoder a few frames behind even when none are used
    ix["reordered"] = not timed or any(d != p for p, d, _ in packets)
    declared = ix["container_frames"]
    if declared and declared > ix["total"] + (not ix["counted"]):
        warnings.warn(f"{path}: the container says {declared} frames, only {ix['total']} are there "
                      "(truncated?); sampling from those", stacklevel=3)
    return ix


def decord_refuses(ix):
    """Why decord would not give the frames PyAV gives for this stream, or None. decord places a
    frame by counting the frames its decoder returns after a seek to the keyframe before it; where
    frames are stored out of display order (B-frames) or the decoder runs behind (dts before pts),
    that count lands on other frames (seen with H.264 and HEVC, open and closed GOPs, mp4 and mkv).
    It cannot be told which stream to read, converts 10-bit video to 8 bits less accurately (3/255
    off on average) and ignores non-square pixels."""
    if ix["video_streams"] > 1:
        return f"{ix['video_streams']} video streams, and decord cannot be told which to read"
    if ix["reordered"]:
        return ("frames stored out of display order (B-frames, dts != pts): decord's seeking can "
                "return other frames")
    if ix["bits"] > 8:
        return f"{ix['bits']}-bit video: decord converts it to 8 bits inaccurately"
    if ix["pixel_aspect"] != 1:
        return "non-square pixels, which decord ignores"
    return None


def read_video_decord(path, ix, idx, keep=None, fit=None):
    """The frames at display positions idx with decord (which applies rotation metadata itself).
    keep, fit and what it returns: as read_video_pyav's (decord converts every frame it decodes)."""
    import decord
    why = decord_refuses(ix)
    if why:
        raise VideoError(path, f"not read with decord: {why}")
    uniq, back = np.unique(idx, return_inverse=True)  # a still repeats its one frame
    order = back[range(len(idx)) if keep is None else keep]  # what to return, as indices of uniq
    kept, out, size = set(order.tolist()), np.empty((0, 0, 0, 3), np.uint8), None
    try:
        vr = decord.VideoReader(str(path))
        if len(vr) != ix["total"]:
            raise VideoError(path, f"decord counts {len(vr)} frames, the stream has {ix['total']}")
        # one frame a call: get_batch seeks for each index alike, and a batch would hold them all
        for j, i in enumerate(uniq.tolist()):
            a = vr.get_batch([i]).asnumpy()[0]
            size = a.shape[:2]
            if j in kept:
                out = _put(out, order, j, fit(a) if fit else a)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(path, f"decord failed ({_short(e)})") from e
    return out, size


def read_video_pyav(path, ix, idx, keep=None, fit=None):
    """The frames at display positions idx with PyAV. Frames are known by their timestamps, so no
    decoding order can shift them. Decoding starts at the first frame, runs forward and jumps to a
    keyframe only when one lies between the last decoded frame and the next wanted one (seeking to
    each frame is 4-20x slower). Without usable timestamps it counts frames and never seeks.

    keep: the positions of idx to return (a range; default all). The others are decoded too, so
    that a broken file fails alike whichever share an SP rank keeps, but never converted. fit:
    applied to each kept frame as soon as it is converted (video_inputs resizes it there), so one
    frame at the file's resolution is alive at a time. Returns the frames, uint8 (len(keep), h, w,
    3), and the size (height, width) of the upright frames as decoded."""
    import av
    exact = av.video.reformatter.Interpolation
    exact = exact.BILINEAR | exact.ACCURATE_RND | exact.FULL_CHR_H_INT
    # one reformatter for all frames: frame.to_ndarray(format=) builds a new swscale context
    # per frame, which costs 2 ms even at 56x56 (50x the decoding)
    rgb = av.video.reformatter.VideoReformatter()
    uniq, back = np.unique(idx, return_inverse=True)  # a still repeats its one frame
    order = back[range(len(idx)) if keep is None else keep]  # what to return, as indices of uniq
    want = [ix["pts"][i] for i in uniq] if ix["pts"] else uniq.tolist()
    keys, kept, size = ix["keys"], set(order.tolist()), None
    out = np.empty((0, 0, 0, 3), np.uint8)
    try:
        with av.open(str(path)) as c:
            s = c.streams[ix["stream"]]
            s.thread_type = "AUTO"
            # from the first frame: a decoder learns from it what a seek would skip (x264 writes
            # its version there, which switches on the workaround for its old 4:4:4 bug)
            decoded = ((f.pts if ix["pts"] else j, f) for j, f in enumerate(c.decode(s)))
            at = None  # timestamp (or count) of the last decoded frame
            for j, (i, t) in enumerate(zip(uniq, want)):
                k = bisect.bisect_right(keys, t) - 1  # the last keyframe shown at or before t
                if at is not None and k >= 0 and keys[k] > at:
                    # backward: onto this keyframe or an earlier one (mp4 indexes keyframes by dts
                    # plus the B-frame delay, so seeking to a dts lands a whole GOP early)
                    c.seek(keys[k], stream=s)
                    decoded = ((f.pts, f) for f in c.decode(s))
                for at, f in decoded:
                    if at >= t:
                        break
                if at != t:
                    raise VideoError(path, f"frame {i} of {ix['total']} could not be decoded")
                turn = round(f.rotation / 90) % 4  # display rotation: degrees ccw, -90 on phones
                h, w = ix["height"] or f.height, ix["width"] or f.width
                size = (w, h) if turn % 2 else (h, w)
                if j not in kept:
                    continue
                # more than 8 bits: swscale's default drops chroma interpolation and rounding
                # (2/255 off on average); 8 bits keeps the default that decord shares bit for bit
                a = rgb.reformat(f, format="rgb24", width=ix["width"], height=ix["height"],
                                 interpolation=exact if ix["bits"] > 8 else None)
                a = np.rot90(a.to_ndarray(), k=turn)
                out = _put(out, order, j, fit(a) if fit else a)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(path, f"PyAV failed ({_short(e)})") from e
    return out, size


def _put(out, order, j, frame):
    """frame (uniq's j-th) wherever order has it, in one array for all the frames returned, made at
    the first: frames kept one by one between the large temporaries of resizing fragment the heap
    (RSS grew by 12 MB a frame at 1080p, 3.3 GB for 240 frames at 224x420)."""
    if len(out) < len(order):
        out = np.empty((len(order), *frame.shape), np.uint8)
    out[order == j] = frame
    return out


def read_video(path, nframes=None, fps=None, min_frames=4, max_frames=768, reader=None, fit=None,
               sp=None):
    """Sampled frames, uint8 (T, H, W, 3) upright with T even, and an info dict. Give exactly one
    of nframes (rounded to even) or fps (frames per second of video, clamped to [min_frames,
    max_frames] and to the frame count). reader: None or "pyav" (PyAV), "decord" (refused where
    its frames would differ: see decord_refuses). Any failure is a VideoError naming the file.
    fit: applied to each frame as it is decoded (video_inputs: the resize to the model's size).
    sp: (rank in the SP group, SP degree): only that rank's share of the temporal groups (2 frames
    each, sp_share), info["share"] = (first group, groups); info's height and width are the
    frames' as decoded, its indices all sampled frames' either way."""
    path, t0 = str(path), time.time()
    ix = video_stream(path)
    idx, sampled_fps = sample_indices(path, ix["total"], ix["fps"], nframes, fps, min_frames,
                                      max_frames)
    first, n = sp_share(len(idx) // TEMPORAL, *sp) if sp else (0, len(idx) // TEMPORAL)
    reader = reader or "pyav"
    frames, (height, width) = {"decord": read_video_decord, "pyav": read_video_pyav}[reader](
        path, ix, idx, range(first * TEMPORAL, (first + n) * TEMPORAL), fit)
    keep = ("stream", "video_streams", "codec", "pix_fmt", "pixel_aspect", "container_frames")
    info = dict(reader=reader, total_frames=ix["total"], video_fps=ix["fps"], indices=idx.tolist(),
                sampled_fps=sampled_fps, height=int(height), width=int(width),
                seconds=time.time() - t0, **{k: ix[k] for k in keep})
    return frames, dict(info, share=(first, n)) if sp else info


def sp_share(t, rank, sp):
    """The temporal groups of t that SP rank `rank` of `sp` holds: (first, count), contiguous and
    near-even (the first t % sp ranks one more). mr_sp.encode_visual splits a video the same way."""
    counts = [t // sp + (i < t % sp) for i in range(sp)]
    return sum(counts[:rank]), counts[rank]


# -----------------------------------------------------------------------------
# preprocessing: resize, normalize, patchify exactly like Qwen2-VL's image processor

def smart_resize(height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, factor=FACTOR):
    """Qwen's rule: sides rounded to multiples of 28, area brought into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be under 200, got {height}x{width}")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(frames, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, chunk=32, proc=None,
               size=None):
    """uint8 (T, H, W, 3) -> pixel_values (T/2 * h/p * w/p, 3*2*p*p) float32, grid_thw [[T/2, h/p,
    w/p]], p the patch size. Each row is one 2 x p x p spatio-temporal patch laid out (C, T, p, p);
    the 4 patches of each 2x2 merge group are consecutive rows, as Qwen's vision towers expect.
    proc: the model's preprocessor config (model.processor_config: patch_size, image_mean,
    image_std); default Qwen2/2.5-VL's (14 pixels, CLIP's mean and std); Qwen3-VL's patches are 16.
    size: (h, w) to resize to; default smart_resize of (H, W) (video_inputs resized while
    reading: resizing is not idempotent at extreme aspect ratios)."""
    patch = proc["patch_size"] if proc else PATCH
    mean, std = (proc["image_mean"], proc["image_std"]) if proc else (MEAN, STD)
    T, H, W, _ = frames.shape
    h, w = size or smart_resize(H, W, min_pixels, max_pixels, factor=patch * MERGE)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    if T % 2:
        x = torch.cat([x, x[-1:]])  # the last temporal patch needs two frames
        T += 1
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    gt, gh, gw = T // TEMPORAL, h // patch, w // patch
    out = torch.empty(gt * gh * gw, 3 * TEMPORAL * patch * patch)
    groups = out.view(gt, gh // MERGE, gw // MERGE, MERGE, MERGE, 3, TEMPORAL, patch, patch)
    chunk += chunk % TEMPORAL  # whole temporal groups
    # chunks bound the float copies of full-size frames, and each is written in its patch layout:
    # a float copy of the video in frame layout would double the peak
    for i in range(0, T, chunk):
        c = x[i:i + chunk]
        if (h, w) != (H, W):
            c = resize(c, h, w)
        c = (c.float() / 255 - mean) / std  # bit-identical to HF's float64 rescale
        c = c.reshape(-1, TEMPORAL, 3, gh // MERGE, MERGE, patch, gw // MERGE, MERGE, patch)
        g = i // TEMPORAL
        # (gt, gh/2, gw/2, 2, 2, C, T, p, p)
        groups[g:g + len(c)] = c.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return out, torch.tensor([[gt, gh, gw]])


def resize(x, h, w):
    """uint8 (N, 3, H, W) -> float32 (N, 3, h, w) of whole numbers in [0, 255], as Qwen's image
    processor resizes. Each image is resized on its own: one at a time gives the same bits."""
    x = F.interpolate(x.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 255).round()  # the model was trained on uint8 frames, keep their values


def video_inputs(path, nframes=None, fps=None, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                 reader=None, proc=None, sp=None):
    """Everything the model needs from one video: kind "video", pixel_values, grid_thw,
    second_per_grid, frame_times (seconds of each sampled frame: Qwen3-VL's timestamps), info.
    Each frame is resized as it is decoded: host memory holds the sampled frames at the model's
    size, not the file's. sp: (rank in the SP group, SP degree): pixel_values holds only that
    rank's share of the temporal groups, "share" = (first group, groups); grid_thw, frame_times
    and second_per_grid describe the whole video."""
    patch = proc["patch_size"] if proc else PATCH
    fit = fitter(path, min_pixels, max_pixels, patch * MERGE)
    frames, info = read_video(path, nframes=nframes, fps=fps, reader=reader, fit=fit, sp=sp)
    h, w = _smart_resize(path, info["height"], info["width"], min_pixels, max_pixels, patch * MERGE)
    if len(frames):
        pixel_values = preprocess(frames, proc=proc, size=(h, w))[0]
    else:  # an SP rank whose share of a short video is empty
        pixel_values = torch.empty(0, 3 * TEMPORAL * patch * patch)
    out = dict(kind="video", pixel_values=pixel_values,
               grid_thw=torch.tensor([[len(info["indices"]) // TEMPORAL, h // patch, w // patch]]),
               second_per_grid=TEMPORAL / info["sampled_fps"],
               frame_times=[i / info["video_fps"] for i in info["indices"]], info=info)
    return dict(out, share=info["share"]) if sp else out


def fitter(path, min_pixels, max_pixels, factor):
    """A function uint8 (H, W, 3) -> (h, w, 3): a frame resized to the values preprocess would
    resize it to (smart_resize's size), to apply as each frame is decoded."""
    def fit(a):
        h, w = _smart_resize(path, *a.shape[:2], min_pixels, max_pixels, factor)
        if (h, w) == a.shape[:2]:
            return a
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]  # preprocess's layout
        return resize(x, h, w)[0].to(torch.uint8).permute(1, 2, 0).numpy()
    return fit


def _smart_resize(path, *args):
    try:
        return smart_resize(*args)
    except ValueError as e:  # Qwen's resize refuses aspect ratios over 200: a bad sample, no crash
        raise VideoError(path, str(e)) from e


def _preprocess(path, frames, **kw):
    try:
        return preprocess(frames, **kw)
    except ValueError as e:  # Qwen's resize refuses aspect ratios over 200: a bad sample, no crash
        raise VideoError(path, str(e)) from e


def image_inputs(path, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, proc=None):
    """An image file as the model takes it: kind "image", one temporal patch (the image twice, as
    Qwen's image processor tiles it), grid_thw [[1, h/p, w/p]]. A file PIL cannot read:
    VideoError."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise VideoError(path, "is a directory" if os.path.isdir(path) else "no such file")
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise VideoError(path, f"not a readable image ({_short(e)})") from None
    pixel_values, grid_thw = _preprocess(path, np.stack([a, a]), max_pixels=max_pixels,
                                         min_pixels=min_pixels, proc=proc)
    return dict(kind="image", pixel_values=pixel_values, grid_thw=grid_thw, second_per_grid=1.0,
                info=dict(height=a.shape[0], width=a.shape[1]))


# -----------------------------------------------------------------------------
# audio: the sound Qwen2.5-Omni's thinker hears, as its processor prepares it

# Qwen2.5-Omni's preprocessor_config.json: WhisperFeatureExtractor with feature_size 128,
# sampling_rate 16000, n_fft 400, hop_length 160, dither 0, chunk_length 300 (pads, cuts to 300 s)
AUDIO_RATE, N_FFT, HOP, N_MELS = 16000, 400, 160, 128


class NoAudio(VideoError):
    """A file without an audio stream: the caller decides (video only, or refuse the row)."""


def read_audio(path, start=None, end=None):
    """The audio of a video or audio file: its best audio stream (ffmpeg's pick, as for video),
    decoded, resampled to 16 kHz by libswresample, channels averaged to mono (as librosa.load, which
    Qwen's own loader uses), float32 in [-1, 1]. start, end: seconds from the first sample; keeps
    samples [round(start * 16000), round(end * 16000)), the span the sampled frames cover, and stops
    decoding there. Returns the 1-D wave and an info dict: stream, audio_streams, codec,
    sample_rate and channels (the file's). No audio stream raises NoAudio; anything else wrong
    (missing, undecodable, nothing in the span) a VideoError naming the file."""
    import av
    if not os.path.isfile(path):
        raise VideoError(path, "is a directory" if os.path.isdir(path) else "no such file")
    lo = round((start or 0) * AUDIO_RATE)
    hi = sys.maxsize if end is None else round(end * AUDIO_RATE)
    kept, n = [], 0  # n: samples at 16 kHz before the current frame
    try:
        with av.open(str(path)) as c:
            s = c.streams.best("audio")
            if s is None:
                raise NoAudio(path, "no audio stream")
            info = dict(stream=s.index, audio_streams=len(c.streams.audio),
                        codec=s.codec_context.name, sample_rate=s.rate, channels=s.channels)
            # the file's channels through the resampler, averaged after: swresample's own downmix
            # to float mono sums them at 1/sqrt(2) each, 1.41x a mean for a centred sound
            resampler = av.AudioResampler(format="fltp", rate=AUDIO_RATE)
            for frame in itertools.chain(c.decode(s), [None]):  # None: flush the resampler
                for g in resampler.resample(frame):
                    a = g.to_ndarray().mean(0)  # (channels, samples) -> (samples,)
                    kept.append(a[max(lo - n, 0):max(hi - n, 0)])
                    n += len(a)
                if n >= hi:
                    break
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(path, f"PyAV failed on its audio ({_short(e)})") from e
    wave = np.concatenate(kept) if kept else np.zeros(0, np.float32)
    if not len(wave):
        span = "" if start is None and end is None else f" in [{start or 0}, {end}) s"
        raise VideoError(path, f"no audio{span} ({n / AUDIO_RATE:.2f} s read)")
    return wave.astype(np.float32, copy=False), info


def mel_filters(n_mels=N_MELS, n_fft=N_FFT, rate=AUDIO_RATE):
    """(n_fft/2 + 1, n_mels) float64: triangles on the Slaney mel scale (linear below 1 kHz, log
    above) from 0 to rate/2, each scaled to unit area: librosa's and Whisper's bank
    (transformers.audio_utils.mel_filter_bank with norm and mel_scale "slaney")."""
    def mel(f):
        return torch.where(f < 1000, 3 * f / 200, 15 + torch.log(f / 1000) * 27 / math.log(6.4))

    def hz(m):
        return torch.where(m < 15, 200 * m / 3, 1000 * torch.exp((m - 15) * math.log(6.4) / 27))

    top = mel(torch.tensor(rate / 2, dtype=torch.float64))
    edges = hz(torch.linspace(0, top, n_mels + 2, dtype=torch.float64))  # band i: edges i, i+1, i+2
    d = edges[None] - torch.linspace(0, rate // 2, n_fft // 2 + 1, dtype=torch.float64)[:, None]
    rise, fall = -d[:, :-2] / (edges[1:-1] - edges[:-2]), d[:, 2:] / (edges[2:] - edges[1:-1])
    return torch.minimum(rise, fall).clamp(min=0) * 2 / (edges[2:] - edges[:-2])


def audio_features(wave):
    """16 kHz mono wave (numpy or torch, 1-D) -> input_features (1, 128, n) float32 and
    feature_attention_mask (1, n) int64 of ones, as Qwen2.5-Omni's thinker takes them; n =
    ceil(len / 160) frames of 10 ms. Equal to its processor's features (WhisperFeatureExtractor:
    power STFT, n_fft 400, hop 160, Hann; 128 Slaney mels; log10 floored at 1e-10 and at 8 below the
    clip's max; (x + 4) / 4) on the frames its mask keeps. The processor pads every clip with
    zeros to 300 s and cuts longer ones to 300 s; here nothing is padded or cut: a longer clip gets
    the same rule (what the processor gives with a longer chunk_length). Several clips in one
    batch: pad each to the longest (any value) with zeros in the mask."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    n = -(-len(x) // HOP)
    # The processor's zero padding, as far as it matters: the last frames' windows reach 200
    # samples past the end, and frames past the end that still overlap the sound count for the max
    x = F.pad(x, (0, N_FFT))
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    mel = (mel_filters().float().T @ spec.abs() ** 2).clamp(min=1e-10).log10()  # (128, frames)
    mel = torch.maximum(mel, mel.max() - 8.0)  # 80 dB below the loudest
    return ((mel[:, :n] + 4.0) / 4.0)[None], torch.ones(1, n, dtype=torch.long)


def audio_tokens(n_frames):
    """Tokens the thinker's audio encoder makes of n mel frames (int or tensor): conv2 (stride 2)
    halves them, an average pool (stride 2) halves them again: 25 a second.
    Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths, and the processor's own count."""
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


# -----------------------------------------------------------------------------
# QA rows

def load_rows(path, video_root=None):
    """jsonl rows, normalized to id, video (absolute), image, audio, question, options, answer,
    reasoning, category; other fields kept. Long-RL's fields work too (problem with the options in
    it, answer, videos: a path or [path]). Relative paths start at video_root, else the jsonl's
    folder. audio (optional; absolute path or None): a file, or "video" for the video's own track
    (normalized to the video's path): the sound of the video, or a row's only input without one.
    Never implied: rows without the field are silent even for a model that hears (Qwen's processor
    too takes a video's sound only when asked, use_audio_in_video)."""
    path = Path(path)
    root = Path(video_root) if video_root is not None else path.resolve().parent
    rows, seen = [], {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object")
        row = _normalize(dict(raw), where, root, f"{path.name}:{line_no}")
        if row["id"] in seen:  # answers are keyed by id: a repeat would overwrite
            raise ValueError(f"{where}: duplicate id {row['id']!r} (first at line {seen[row['id']]})")
        seen[row["id"]] = line_no
        rows.append(row)
    return rows


def split_rows(rows, part):
    """The paper's split of train: part "sft" (1/3: rows 0, 3, 6, ...), "rl" (other 2/3), "all"."""
    if part not in ("sft", "rl", "all"):
        raise ValueError(f"part must be sft, rl or all, got {part!r}")
    return rows if part == "all" else [r for i, r in enumerate(rows) if (i % 3 == 0) == (part == "sft")]


def _normalize(row, where, root, default_id):
    media = {}
    for k in ("video", "image"):  # Long-RL's "videos" / "images" hold a path or a one-path list
        v = row.pop(k + "s", None) if k not in row else row[k]
        if isinstance(v, list):
            if len(v) > 1:
                raise ValueError(f"{where}: expected one {k}, got {len(v)}")
            v = v[0] if v else None
        media[k] = os.path.abspath(root / v) if v else None
    if media["video"] and media["image"]:
        raise ValueError(f"{where}: a row has a video, an image or neither, not both")
    audio = row.get("audio")  # a file's path, or "video": the video's own track
    if audio is not None:
        if not isinstance(audio, str) or not audio:
            raise ValueError(f"{where}: audio must be a file's path or \"video\" (the video's own "
                             f"track), got {audio!r}")
        if media["image"]:
            raise ValueError(f"{where}: audio goes with a video or alone, not with an image")
        if audio == "video" and not media["video"]:
            raise ValueError(f"{where}: audio \"video\" asks for the video's own track, and "
                             "the row has no video")
        audio = media["video"] if audio == "video" else os.path.abspath(root / audio)
    question = row.pop("problem", None) if "question" not in row else row["question"]
    for name, value in (("question", question), ("answer", row.get("answer"))):
        if value is None or value == "":
            raise ValueError(f"{where}: missing field {name!r}")
    options = row.get("options") or []
    if not (isinstance(options, list) and all(isinstance(o, str) for o in options)) or len(options) == 1:
        raise ValueError(f"{where}: options must be a list of at least 2 strings")
    answer = str(row["answer"]).strip()
    if options and answer not in LETTERS[:len(options)]:
        raise ValueError(f"{where}: answer {answer!r} is not one of the option letters "
                         f"{LETTERS[:len(options)]}")
    if row.get("trace_answer") is not None:  # compared with answer (sft.trains_bare): alike
        row["trace_answer"] = str(row["trace_answer"]).strip()
    rid = row.get("id")
    row.update(id=default_id if rid is None or rid == "" else str(rid), **media, audio=audio,
               question=str(question), options=options, answer=answer,
               reasoning=str(row.get("reasoning") or ""), category=str(row.get("category") or ""))
    return row


DEFAULT_TASK = "data/synth"
# The default models the paper's situation: auto-written reasoning traces are imperfect (30% reason
# to a wrong answer here), RL is rewarded by the ground truth; sft.py trains such rows on their bare
# true answers (sft.trains_bare), since their traces kept `counting` at chance.
DEFAULT_NOISE = 0.3


def prepare_task(folder, rank=0):
    """Path of folder/train.jsonl. The default folder gets the synthetic task written on first use
    (rank 0 writes, the others wait), so every stage runs offline with no arguments."""
    path = os.path.join(folder, "train.jsonl")
    if not os.path.exists(path) and os.path.normpath(folder) == DEFAULT_TASK:
        if rank == 0:
            print(f"{path} not found: writing the synthetic task (python data.py synth --out {folder} "
                  f"--n 3000 --frames 256 --seed 0 --n-test 750 --noise {DEFAULT_NOISE})", flush=True)
            synth(folder, n=3000, n_frames=256, seed=0, n_test=750, noise=DEFAULT_NOISE)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file "
                                f"(write a task with python data.py synth --out {folder})")
    return path


def question_text(row, bare=False):
    """The user turn: question, options as "A. ...", and the answer-format instruction (bare: the
    answer alone, sft.py's --answer-epochs)."""
    parts = [row["question"]] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"])]
    what = "the letter of the correct option" if row["options"] else \
        "the final answer (the option's letter if there are options)"
    parts.append(f"Give only {what} inside <answer> </answer>." if bare else
                 f"Think step by step inside <think> </think>, then give {what} inside <answer> </answer>.")
    return "\n".join(parts)


def target_text(row):
    """The row's trace and the answer it reaches: a noisy trace's (wrong) trace_answer (sft.py
    trains such a row on its bare true answer instead)."""
    return f"<think>{row['reasoning']}</think><answer>{row.get('trace_answer', row['answer'])}</answer>"


# The reward parses the format question_text asks for (Long-RL's r1v reward; answer graded by type).
FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize(s):
    return re.sub(r"\s+", "", s).strip(".()[]:").lower()


def grade(pred, truth):
    """1.0 when the answer equals the truth as a choice letter, a number or normalized text."""
    p, t = normalize(pred), normalize(truth)
    if p == t:
        return 1.0
    try:
        return float(math.isclose(float(p), float(t), rel_tol=1e-6))
    except ValueError:
        return 0.0


def reward(text, row):
    """0.9 * accuracy + 0.1 * format (a FORMAT fullmatch); accuracy grades the answer span."""
    fmt = float(FORMAT.fullmatch(text.strip()) is not None)
    m = ANSWER.search(text)
    acc = grade(m.group(1), row["answer"]) if m else 0.0
    return {"overall": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt}


class VideoDataset:
    """Rows plus their videos or images (proc: the model's preprocessor config, for its patch size
    and normalization; see `preprocess`). ds[i] raises VideoError; iter_samples skips bad videos
    and images and records them. Rows with neither are text only. sp: (rank in the SP group, SP
    degree) to keep only that rank's share of each video's pixel rows (video_inputs;
    mr_sp.encode_visual encodes it); images stay whole on every rank.

    Sound: a model hears when proc has an audio feature extractor (model.processor_config gives
    Qwen2.5-Omni's). Then a video row with audio gets input_features and feature_attention_mask
    (audio_features) of its [0, total_frames / video_fps) s: the clip the sampled frames are spread
    over, which their grid spans (Qwen's own loader takes the track from video_start to video_end,
    default the whole: the same but for a track running past the last frame), whole on every SP
    rank; a row with audio alone, kind "audio" and the whole file. Audio that is missing, corrupt
    or absent (NoAudio) makes a bad sample, never a silent one. A model that does not hear gets a
    video row's frames alone (it warns once) and skips a row of audio alone. mute: the features of
    silence as long as the sound (decoded all the same, so the same samples are skipped): the
    audio-blind control."""

    def __init__(self, rows, nframes=32, fps=None, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                 skip_bad=True, reader=None, proc=None, sp=None, mute=False):
        self.rows, self.nframes, self.fps, self.reader, self.proc = rows, nframes, fps, reader, proc
        self.sp = sp if sp and sp[1] > 1 else None
        self.max_pixels, self.min_pixels, self.skip_bad = max_pixels, min_pixels, skip_bad
        self.hears, self.mute = "feature_extractor_type" in (proc or {}), mute
        if not self.hears and any(r.get("audio") for r in rows):
            warnings.warn("rows ask for audio, and this model does not hear: their videos are "
                          "shown without their sound", stacklevel=2)
        self.bad = []  # (id, reason), one entry per bad sample
        self._bad_ids = set()

    def __len__(self):
        return len(self.rows)

    @property
    def n_bad(self):
        return len(self.bad)

    def __getitem__(self, i):
        row = self.rows[i]
        size = dict(max_pixels=self.max_pixels, min_pixels=self.min_pixels, proc=self.proc)
        if row.get("video"):
            x = video_inputs(row["video"], self.nframes, self.fps, reader=self.reader, sp=self.sp,
                             **size)
            fps = x["info"]["video_fps"]  # unknown (0): the whole track
            end = x["info"]["total_frames"] / fps if fps else None
        elif row.get("image"):
            return {**row, **image_inputs(row["image"], **size)}
        elif row.get("audio"):
            if not self.hears:
                raise VideoError(row["audio"], "audio alone, and this model does not hear")
            x, end = {"kind": "audio"}, None
        else:
            return {**row, "kind": None}  # text only
        if row.get("audio") and self.hears:
            x.update(self.sound(row["audio"], end))
        return {**row, **x}

    def sound(self, path, end=None):
        """input_features, feature_attention_mask of [0, end) s of path's audio (mute: silence)."""
        wave, _ = read_audio(path, end=end)
        return dict(zip(("input_features", "feature_attention_mask"),
                        audio_features(np.zeros_like(wave) if self.mute else wave)))

    def iter_samples(self, indices=None):
        """Yield samples in the given order, skipping (never replacing) those whose video fails."""
        for i in range(len(self)) if indices is None else indices:
            rid = self.rows[i]["id"]
            if rid in self._bad_ids:
                continue  # already warned about it: later epochs skip it quietly
            try:
                sample = self[i]
            except VideoError as e:
                if not self.skip_bad:
                    raise
                self.bad.append((rid, str(e)))
                self._bad_ids.add(rid)
                warnings.warn(f"skipping sample {rid}: {e}", stacklevel=2)
                continue
            yield sample


# -----------------------------------------------------------------------------
# synthetic long-video reasoning task

COLORS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
          "yellow": (230, 210, 40), "purple": (150, 60, 200), "cyan": (40, 200, 210)}
OPTION_COLORS = ["red", "green", "blue", "yellow"]  # fixed: the letter follows from the color seen
CATEGORIES = ["order", "counting", "majority", "absent"]


def synth_slots(n_frames):
    """Start frames of the 16 slots (one per frame below 16) and the end; events use odd slots."""
    k = min(16, n_frames)
    return np.round(np.arange(k + 1) * n_frames / k).astype(int)


def synth_scenario(rng, category, n_pos):
    """One video's flash events (position, color) in time order, question, options, answer index."""
    pos = lambda n: sorted(rng.choice(n_pos, n, replace=False).tolist())  # noqa: E731
    if category == "order":
        cols, which = [OPTION_COLORS[j] for j in rng.permutation(4)], ["first", "last"][rng.integers(2)]
        return dict(events=list(zip(pos(4), cols)), which=which, options=OPTION_COLORS,
                    answer=OPTION_COLORS.index(cols[0 if which == "first" else -1]),
                    question="The screen flashes red, green, blue and yellow, once each. "
                             f"Which color flashes {which}?")
    if category == "counting":
        target, k = list(COLORS)[rng.integers(len(COLORS))], int(rng.integers(1, 5))
        d = int(rng.integers(1, min(3, n_pos - k) + 1)) if n_pos > k else 0
        others = [c for c in COLORS if c != target]
        cols = [target] * k + [others[j] for j in rng.integers(len(others), size=d)]
        return dict(events=sorted(zip(pos(k + d), rng.permutation(cols).tolist())), target=target,
                    options=["1", "2", "3", "4"], answer=k - 1,
                    question=f"How many times does the whole screen flash {target}?")
    if category == "majority":
        top, k = int(rng.integers(4)), int(rng.integers(2, 4))  # top flashes k times, others < k
        counts = [k if j == top else int(rng.integers(0, k)) for j in range(4)]
        while sum(counts) > n_pos:  # short videos have few slots: drop flashes of the others
            counts[max((j for j in range(4) if j != top), key=counts.__getitem__)] -= 1
        cols = [c for c, m in zip(OPTION_COLORS, counts) for _ in range(m)]
        return dict(events=sorted(zip(pos(len(cols)), rng.permutation(cols).tolist())), options=OPTION_COLORS,
                    answer=top, question="The screen flashes several colors. Which color flashes most often?")
    if category != "absent":
        raise ValueError(f"unknown synthetic-task category {category!r}: one of {CATEGORIES}")
    gone = int(rng.integers(4))
    cols = [c for j, c in enumerate(OPTION_COLORS) if j != gone]
    twice = rng.choice(3, min(int(rng.integers(0, 3)), n_pos - 3), replace=False)  # some flash 2x
    cols += [cols[j] for j in twice]
    return dict(events=sorted(zip(pos(len(cols)), rng.permutation(cols).tolist())), options=OPTION_COLORS,
                answer=gone, question="Three of red, green, blue and yellow flash on the screen. "
                                      "Which color never flashes?")


def synth_trace(sc, category, claim):
    """Reasoning ending in option `claim`: the evidence for the asked item, then the option it
    implies. When claim is wrong, the evidence is what a careless annotator saw."""
    said, letter = sc["options"][claim], LETTERS[claim]
    if category == "order":
        return f"The {sc['which']} flash is {said}, so the answer is {letter}."
    if category == "counting":
        return (f"The screen flashes {sc['target']} {said} time{'s' * (said != '1')}, "
                f"so the answer is {letter}.")
    if category == "majority":
        return f"{said.capitalize()} flashes more often than any other color, so the answer is {letter}."
    a, b, c = [c for c in OPTION_COLORS if c != said]
    return f"I see {a}, {b} and {c} flash but never {said}, so the answer is {letter}."


def synth_frames(sc, n_frames, size, rng):
    """uint8 (F, size, size, 3): textured gray background, slow brightness drift, then flashes."""
    starts = synth_slots(n_frames)
    coarse = rng.normal(0, 10, (size // 4 + 1, size // 4 + 1))
    tex = np.kron(coarse, np.ones((4, 4)))[:size, :size, None]  # 4x4 blocks survive yuv420/resizing
    t = np.arange(n_frames)
    drift = 6 * np.sin(2 * np.pi * t / n_frames * rng.uniform(1, 3) + rng.uniform(0, 2 * np.pi))
    video = np.empty((n_frames, size, size, 3), np.float32)
    video[:] = rng.uniform(95, 145) + tex
    video += drift[:, None, None, None]
    for p, color in sc["events"]:
        video[starts[2 * p + 1]:starts[2 * p + 2]] = np.array(COLORS[color]) + 0.5 * tex
    return video.clip(0, 255).round().astype(np.uint8)


def write_mp4(path, frames, fps, audio=None):
    """H.264 (mpeg4 if this PyAV has no H.264 encoder), yuv420p; frame sides must be even. audio: a
    16 kHz mono float wave, muxed as AAC (ffmpeg's own encoder, in every PyAV build)."""
    import av
    h264 = "libx264" in av.codecs_available
    with av.open(str(path), "w") as c:
        s = c.add_stream("h264" if h264 else "mpeg4", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        # near-lossless either way: event colors must stay clear after yuv420 and decoding
        s.options = {"crf": "12", "preset": "veryfast"} if h264 else {"b": "4M"}
        if audio is not None:  # every stream is added before the first packet writes the header
            a = c.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
        if audio is not None:
            for i in range(0, len(audio), 1024):  # AAC's frame size
                f = av.AudioFrame.from_ndarray(audio[None, i:i + 1024], "fltp", "mono")
                f.sample_rate, f.pts = AUDIO_RATE, i
                c.mux(a.encode(f))
            c.mux(a.encode())


# Two more task families, unlike "flash" above: answers as words, numbers and yes/no as well as
# letters, a moving square as well as flashes, and a category that needs frames far apart. "motion"
# is checked beside "flash" when defaults change; "aside" is kept for a final check, not tuned on.
# "sound" has a soundtrack: three categories only it answers (the screen shows nothing), and
# "flashes", which only the frames answer (the sound is a faint hiss): with the audio silenced the
# first three fall to chance and "flashes" should not move. "beeps" and "flashes" are one count at
# the same times, heard or seen.
FAMILIES = {"flash": CATEGORIES, "motion": ["direction", "count", "when", "return"],
            "aside": ["longest", "corner", "jumps", "after"],
            "sound": ["beeps", "pitch", "heard_when", "flashes"]}
SIDES = {"left": (0.5, 0), "right": (0.5, 1), "top": (0, 0.5), "bottom": (1, 0.5)}  # (row, col)
CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
DIRECTIONS = {"right": "left", "left": "right", "down": "top", "up": "bottom"}  # way: its first side
QUARTERS = [f"in the {q} quarter" for q in ("first", "second", "third", "last")]


COLS, NAMES = list(COLORS), list(CORNERS)


def qa(question, choices, answer, trace, lettered=False, flash=(), square=None, beeps=()):
    """A scenario (`motion_scenario`) from its parts."""
    return dict(question=question, choices=choices, answer=answer, trace=trace,
                options=choices if lettered else [], flash=list(flash), square=square,
                beeps=list(beeps))


def hz(rng):  # a beep's pitch: not what its question asks, so drawn anew for each
    return float(rng.uniform(500, 1000))


def steady(corner, n):  # (n, 2): the square in one corner throughout
    return np.tile(CORNERS[corner], (n, 1)).astype(float)


def direction_scenario(rng, n):  # "... moves right": from the left side to the right side
    ways = list(DIRECTIONS)
    ans = int(rng.integers(4))
    a = np.array(SIDES[DIRECTIONS[ways[ans]]])
    return qa("A white square slides across the screen. Which way does it move? Answer with "
              "one word: left, right, up or down.", ways, ans,
              lambda c: f"The square starts at the {DIRECTIONS[ways[c]]} and crosses the "
                        f"screen, so it moves {ways[c]}.",
              square=a + (1 - 2 * a) * np.linspace(0, 1, n)[:, None])


def count_scenario(rng, n):  # brief flashes, a number for an answer
    k = int(rng.integers(1, 5))
    slots = sorted(rng.choice(n // 8, k, replace=False))
    return qa("The screen flashes briefly now and then. How many flashes are there? Answer "
              "with a number.", ["1", "2", "3", "4"], k - 1,
              lambda c: f"I count {c + 1} brief flash{'es' * (c > 0)}, so the answer is "
                        f"{c + 1}.",
              flash=[(8 * s + 3, 3, COLS[rng.integers(len(COLS))]) for s in slots])


def when_scenario(rng, n):  # one brief flash: which quarter of the video
    q, color = int(rng.integers(4)), COLS[rng.integers(len(COLS))]
    return qa(f"The screen flashes {color} once, briefly. When?", QUARTERS, q,
              lambda c: f"The {color} flash comes {QUARTERS[c]} of the video, so the answer is "
                        f"{LETTERS[c]}.", lettered=True,
              flash=[(q * n // 4 + int(rng.integers(1, max(2, n // 4 - 4))), 3, color)])


def return_scenario(rng, n):  # the first and the last frames decide: far apart
    start, same = int(rng.integers(4)), bool(rng.integers(2))
    end = start if same else int(rng.choice([j for j in range(4) if j != start]))
    square, hops = steady(NAMES[start], n), [NAMES[j] for j in rng.integers(4, size=3)]
    for i, corner in enumerate(hops):  # wanders in between
        square[n // 4 + i * n // 6:] = CORNERS[corner]
    square[3 * n // 4:] = CORNERS[NAMES[end]]

    def seen(c):  # where a trace claiming c says the square ends (a wrong claim: misread)
        return (NAMES[end] if c == int(not same) else NAMES[start] if c == 0 else
                NAMES[(start + 1) % 4])
    return qa("A white square jumps between the corners. Does it end in the corner where it "
              "started? Answer yes or no.", ["yes", "no"], int(not same),
              lambda c: f"The square starts {NAMES[start]} and ends {seen(c)}, so the answer "
                        f"is {['yes', 'no'][c]}.", square=square)


def longest_scenario(rng, n):  # steady colors of different lengths
    four = [OPTION_COLORS[j] for j in rng.permutation(4)]
    lens, flash, t = rng.permutation([6, 10, 14]), [], 2
    for color, m in zip(four[:3], lens):
        flash.append((t, int(m * n // 48), color))
        t += int(m * n // 48) + n // 16
    return qa("Three colors fill the screen one after another. Which stays longest?",
              OPTION_COLORS, OPTION_COLORS.index(four[int(np.argmax(lens))]),
              lambda c: f"{OPTION_COLORS[c].capitalize()} stays on the screen longer than the "
                        f"others, so the answer is {LETTERS[c]}.", lettered=True, flash=flash)


def corner_scenario(rng, n):  # where the square spends most of the time, a two-word answer
    home = int(rng.integers(4))
    square = steady(NAMES[home], n)
    for s in rng.choice(range(1, 8), 2, replace=False):  # two brief visits elsewhere
        away = NAMES[(home + 1 + rng.integers(3)) % 4]
        square[s * n // 8:s * n // 8 + n // 16] = CORNERS[away]
    return qa("Where does the white square spend most of the video? Answer top left, top "
              "right, bottom left or bottom right.", NAMES, home,
              lambda c: f"The square stays in the {NAMES[c]} corner most of the time, so the "
                        f"answer is {NAMES[c]}.", square=square)


def jumps_scenario(rng, n):  # a number: how often the square changes corner
    k = int(rng.integers(0, 4))
    at = [int(rng.integers(4))]
    for _ in range(k):
        at.append(int((at[-1] + 1 + rng.integers(3)) % 4))
    square = steady(NAMES[at[0]], n)
    for i, c in enumerate(at[1:], 1):
        square[i * n // (k + 1):] = CORNERS[NAMES[c]]
    return qa("How many times does the white square jump to another corner? Answer with a "
              "number.", ["0", "1", "2", "3"], k,
              lambda c: f"The square jumps {c} time{'s' * (c != 1)}, so the answer is {c}.",
              square=square)


def events_scenario(rng, n, category):  # one count, heard or seen: k of 8 equal slots, each event
    # in the middle half of its slot, so 24 or more uniform frames see every flash (checked for
    # 32 to 3,000 frames; 18 miss some at 36 to 71 frames)
    k, m = int(rng.integers(1, 5)), n // 8
    at = [(m * s + m // 4, m // 2) for s in sorted(rng.choice(8, k, replace=False))]
    if category == "flashes":
        return qa("The screen flashes now and then. How many flashes are there? Answer with a "
                  "number.", ["1", "2", "3", "4"], k - 1,
                  lambda c: f"I count {c + 1} flash{'es' * (c > 0)}, so the answer is {c + 1}.",
                  flash=[(t, d, COLS[rng.integers(len(COLS))]) for t, d in at])
    return qa("Listen: a beep sounds now and then. How many beeps are there? Answer with a "
              "number.", ["1", "2", "3", "4"], k - 1,
              lambda c: f"I hear {c + 1} beep{'s' * (c > 0)}, so the answer is {c + 1}.",
              beeps=[(t, d, hz(rng)) for t, d in at])


def pitch_scenario(rng, n):  # a high tone (1.2-2.4 kHz) and a low one (200-400 Hz), one in each half
    first, m, said = int(rng.integers(2)), n // 8, ["high", "low"]  # first 0: the high tone
    high, low = float(rng.uniform(1200, 2400)), float(rng.uniform(200, 400))
    at = [int(rng.integers(1, n // 2 - m)), int(rng.integers(n // 2, n - m))]
    return qa("Two tones sound one after the other, one high and one low. Which comes first? "
              "Answer high or low.", said, first,
              lambda c: f"The first tone is {said[c]} and the second {said[1 - c]}, so the "
                        f"answer is {said[c]}.",
              beeps=[(at[0], m, [high, low][first]), (at[1], m, [low, high][first])])


def heard_when_scenario(rng, n):  # "when" heard, not seen
    q = int(rng.integers(4))
    return qa("A beep sounds once. When?", QUARTERS, q,
              lambda c: f"The beep comes {QUARTERS[c]} of the video, so the answer is "
                        f"{LETTERS[c]}.", lettered=True,
              beeps=[(q * n // 4 + int(rng.integers(1, max(2, n // 4 - 4))), 3, hz(rng))])


def after_scenario(rng, n):  # the color that flashes next after a cue (an extra color between)
    order = [OPTION_COLORS[j] for j in rng.permutation(4)]
    cue = order[int(rng.integers(3))]
    nxt = order[order.index(cue) + 1]
    order.insert(int(rng.integers(5)), COLS[4 + rng.integers(2)])  # purple or cyan, not an option
    return qa(f"Colors flash one at a time. Which of these flashes next after {cue}?",
              OPTION_COLORS, OPTION_COLORS.index(nxt),
              lambda c: f"After {cue} the next of these colors to flash is {OPTION_COLORS[c]}, so "
                        f"the answer is {LETTERS[c]}.", lettered=True,
              flash=[(2 + i * n // 5, 3, c) for i, c in enumerate(order)])


SCENARIOS = {"direction": direction_scenario, "count": count_scenario, "when": when_scenario,
             "return": return_scenario, "longest": longest_scenario, "corner": corner_scenario,
             "jumps": jumps_scenario, "pitch": pitch_scenario, "heard_when": heard_when_scenario,
             "beeps": lambda rng, n: events_scenario(rng, n, "beeps"),
             "flashes": lambda rng, n: events_scenario(rng, n, "flashes"), "after": after_scenario}


def motion_scenario(rng, category, n):
    """One video of n frames as drawing and sound instructions: flashes [(start, length, color)],
    the square's (row, col) per frame (0..1 of the free space) or None, beeps [(start, length, Hz)]
    (the sound family); its question, options (empty: the answer is the choice itself), choices,
    answer index and trace(claim) ending in choice `claim`."""
    if category not in SCENARIOS:
        raise ValueError(f"unknown task category {category!r}: one of {FAMILIES}")
    return SCENARIOS[category](rng, n)


def motion_frames(sc, n_frames, size, rng):
    """uint8 (F, size, size, 3): the flash family's background, its flashes, a white square (a
    quarter of the side) at its position in each frame."""
    coarse = rng.normal(0, 10, (size // 4 + 1, size // 4 + 1))
    tex = np.kron(coarse, np.ones((4, 4)))[:size, :size, None]
    video = np.empty((n_frames, size, size, 3), np.float32)
    video[:] = rng.uniform(95, 145) + tex
    for start, length, color in sc["flash"]:
        video[start:start + length] = np.array(COLORS[color]) + 0.5 * tex
    if sc["square"] is not None:
        side = size // 4
        for f, (r, c) in enumerate(sc["square"]):
            y, x = round(r * (size - side)), round(c * (size - side))
            video[f, y:y + side, x:x + side] = 245
    return video.clip(0, 255).round().astype(np.uint8)


def sound_wave(sc, n_frames, fps, rng):
    """float32 (n_frames / fps seconds at 16 kHz,): a faint hiss and the scenario's beeps (start,
    length in frames, Hz), sines at 0.5 with 5 ms fades (a hard edge clicks: a burst of every
    frequency)."""
    per = AUDIO_RATE / fps  # samples a frame
    wave = rng.normal(0, 0.005, round(n_frames * per))
    for start, length, hz in sc["beeps"]:
        a, b = round(start * per), round((start + length) * per)
        t = np.arange(b - a) / AUDIO_RATE
        fade = np.minimum(1, np.minimum(t, t[::-1]) / 0.005)
        wave[a:b] += 0.5 * fade * np.sin(2 * np.pi * hz * t)
    return wave.astype(np.float32)


def synth(out, n, n_frames, seed, size=56, fps=8, n_test=None, test_frac=0.2, noise=0.0,
          family="flash"):
    """Write out/videos/*.mp4, out/{train,test}.jsonl. Video i depends only on (seed, i)."""
    from tqdm import tqdm
    if n_frames < 8 or size < 16 or size % 2:
        raise ValueError("need --frames >= 8 and an even --size >= 16")
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}: one of {', '.join(FAMILIES)}")
    if family != "flash" and n_frames < 32:
        raise ValueError(f"the {family} family needs --frames >= 32 (brief events, moving square)")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    n_test = round(n * test_frac) if n_test is None else n_test
    starts = synth_slots(n_frames)
    n_pos = (len(starts) - 1) // 2  # odd slots 1, 3, ...
    splits = {"train": [], "test": []}
    for i in tqdm(range(n), desc="synth", unit="video", file=sys.stderr):
        rng = np.random.default_rng([seed, i])
        category = FAMILIES[family][i % 4]
        if family == "flash":
            sc = synth_scenario(rng, category, n_pos)
            frames = synth_frames(sc, n_frames, size, rng)
            sc.update(choices=sc["options"], trace=lambda c: synth_trace(sc, category, c))
        else:
            sc = motion_scenario(rng, category, n_frames)
            frames = motion_frames(sc, n_frames, size, rng)
        sound = sound_wave(sc, n_frames, fps, rng) if family == "sound" else None
        video = f"videos/{i:06d}.mp4"
        write_mp4(out / video, frames, fps, sound)
        split = "test" if i >= n - n_test else "train"
        claim, noisy = sc["answer"], np.random.default_rng([seed, i, 1])
        if split == "train" and noisy.random() < noise:  # own stream: noise leaves videos alone
            claim = int(noisy.choice([j for j in range(len(sc["choices"])) if j != sc["answer"]]))
        said = lambda j: LETTERS[j] if sc["options"] else sc["choices"][j]  # noqa: E731
        row = dict(id=f"{'synth' if family == 'flash' else family}{seed}-{i:06d}", video=video,
                   question=sc["question"], options=sc["options"], answer=said(sc["answer"]),
                   category=category, reasoning=sc["trace"](claim),
                   trace_correct=claim == sc["answer"], frames=n_frames, fps=fps)
        if claim != sc["answer"]:
            row["trace_answer"] = said(claim)
        if sound is not None:
            row["audio"] = "video"  # its own track
        splits[split].append(json.dumps(row))
    for split, lines in splits.items():
        (out / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return {k: len(v) for k, v in splits.items()}


# -----------------------------------------------------------------------------
# generate: long videos -> clips -> captions -> reasoning QA rows (LongVideo-Reason's recipe: each
# clip captioned by a VLM, a writer given the video's timed captions writes questions in four
# categories with reasoning; every item is checked before it becomes a row)

QA_CATEGORIES = ["temporal", "goal and purpose", "spatial", "plot and narrative"]
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")

# The prompts, in one place to read and edit. WRITER_PROMPT is filled by str.format: {captions},
# {n}; its literal braces are doubled.
CAPTION_PROMPT = ("Describe what happens in this video clip in two to four sentences: the people, "
                  "objects and places, what they do, and how things change from its start to its "
                  "end.")
WRITER_PROMPT = """Below are captions of consecutive clips of one long video, each with its time \
span in seconds.

{captions}

Write {n} multiple-choice questions about the whole video that need reasoning over several clips, \
spread over these categories: temporal (the order, timing or duration of events), goal and purpose \
(why someone does something, what they aim for), spatial (where things are and how they move), \
plot and narrative (how the story develops, cause and effect). Each question has four options, \
exactly one of them correct, and its answer follows from what the video shows. Write the reasoning \
as someone watching the video (never mention captions), step by step, and end it with \
"so the answer is" and the letter.

Reply with JSON only: a list of {n} objects of the form
{{"category": "temporal", "question": "...", "options": ["...", "...", "...", "..."], \
"reasoning": "... so the answer is B.", "answer": "B"}}
where category is one of temporal, goal and purpose, spatial, plot and narrative, and answer is \
the letter of the correct option."""


class ModelError(Exception):
    """A captioner or writer call that failed after its retries; kind: http, timeout, unreachable
    or junk (a reply that is not a chat completion)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def cut_clips(path, seconds=10.0, per_clip=8, max_pixels=MAX_PIXELS, factor=FACTOR):
    """A video cut into consecutive clips of `seconds` (the last one shorter), yielded one at a time
    (host memory holds one clip): dict(start, end (seconds), frames uint8 (per_clip, h, w, 3)
    uniform over the clip, resized as preprocess would, times (seconds of each frame))."""
    ix = video_stream(path)
    if not ix["fps"] > 0:
        raise VideoError(path, "unknown frame rate: cannot cut it into clips by time")
    step = max(1, round(seconds * ix["fps"]))  # frames a clip
    fit = fitter(path, MIN_PIXELS, max_pixels, factor)
    for a in range(0, ix["total"], step):
        b = min(a + step, ix["total"])
        idx = np.linspace(a, b - 1, per_clip).round().astype(int)
        frames, _ = read_video_pyav(path, ix, idx, fit=fit)  # seeks to the keyframe before a
        yield dict(start=a / ix["fps"], end=b / ix["fps"], frames=frames,
                   times=(idx / ix["fps"]).tolist())


def local_model(model, tok, max_new=1024, temperature=0.0, seed=0):
    """ask(text, clip=None, key=()) -> the reply of a model run by our engine (mr_sp.rollout, as
    eval and RL sample), one sample; key seeds it (seed_of), so a rerun writes the same text."""
    import model as M
    import mr_sp
    proc = M.processor_config(model.config)

    def ask(text, clip=None, key=()):
        sample = {"kind": None}
        if clip is not None:
            f = clip["frames"]
            pixel_values, grid = preprocess(f, proc=proc, size=f.shape[1:3])
            sample = dict(kind="video", pixel_values=pixel_values, grid_thw=grid,
                          second_per_grid=TEMPORAL * (clip["end"] - clip["start"]) / len(f),
                          frame_times=clip["times"])
        p = mr_sp.prepare(model, tok, sample, text)
        toks, _, lens = mr_sp.rollout(model, tok, [p], 1, [mr_sp.seed_of(seed, *key)],
                                      max_new=max_new, temperature=temperature)
        return tok.decode(toks[0, :lens[0]].tolist(), skip_special_tokens=True)
    return ask


def api_model(base, name, max_new=1024, temperature=0.0, timeout=120.0, retries=3, backoff=2.0):
    """ask(text, clip=None, key=()) -> the reply of an OpenAI-compatible chat-completions endpoint
    (vLLM's and SGLang's servers speak it; OPENAI_API_KEY is sent if set). A clip's frames go as
    JPEG images. Every failure is retried after backoff * 2**try seconds; after the last one,
    ModelError."""
    import base64
    import http.client
    import io
    import urllib.error
    import urllib.request
    from PIL import Image
    url = base.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"

    def jpeg(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        return {"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}}

    def ask(text, clip=None, key=()):
        content = text if clip is None else \
            [jpeg(a) for a in clip["frames"]] + [{"type": "text", "text": text}]
        body = json.dumps(dict(model=name, messages=[{"role": "user", "content": content}],
                               max_tokens=max_new, temperature=temperature)).encode()
        for attempt in range(retries + 1):
            try:
                req = urllib.request.Request(url, body, headers)
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    reply = json.loads(r.read())["choices"][0]["message"]["content"]
                if isinstance(reply, str):
                    return reply
                kind, why = "junk", f"content is {type(reply).__name__}, not text"
            except urllib.error.HTTPError as e:
                kind, why = "http", f"HTTP {e.code} {e.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                slow = isinstance(getattr(e, "reason", e), TimeoutError)
                kind, why = ("timeout", f"no reply in {timeout} s") if slow else \
                    ("unreachable", str(e))
            except (ValueError, LookupError, TypeError, http.client.HTTPException) as e:
                # not HTTP, not JSON, or not a chat completion
                kind, why = "junk", f"not a chat completion ({_short(e)})"
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
        raise ModelError(kind, f"{url}: {why} ({retries + 1} tries)")
    return ask


def parse_items(reply):
    """The list of items in a writer's reply (a JSON list, maybe inside a code fence or an object's
    one list field), or None."""
    a, b = reply.find("["), reply.rfind("]")
    try:
        items = json.loads(reply[a:b + 1]) if 0 <= a < b else None
    except json.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None


def check_item(item, seen=()):
    """(reason, None) for an item to reject, else (None, the item as a row's fields). Reasons, in
    the order checked: schema (category one of QA_CATEGORIES, question, options: 2 to 10 distinct
    strings, reasoning, answer), answer (not one of the options, as a letter or an option's text),
    reasoning (does not end in that answer: its letter, or the option's text), duplicate (a
    question in `seen`, normalized)."""
    if not isinstance(item, dict):
        return "schema", None
    category, question = str(item.get("category", "")).strip().lower(), item.get("question")
    options, reasoning, answer = item.get("options"), item.get("reasoning"), item.get("answer")
    if (category not in QA_CATEGORIES or not all(isinstance(x, str) and x.strip() for x in
                                                  (question, reasoning, answer))
            or not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
            or not all(isinstance(o, str) and o.strip() for o in options)
            or len({normalize(o) for o in options}) < len(options)):
        return "schema", None
    if all(re.match(rf"{LETTERS[i]}[.)]\s", o) for i, o in enumerate(options)):
        options = [o[2:].strip() for o in options]  # "A. red": question_text adds the letters
    letter = answer.strip().strip(".()").upper()
    if letter not in LETTERS[:len(options)]:
        said = [i for i, o in enumerate(options) if normalize(o) == normalize(answer)]
        if not said:
            return "answer", None
        letter = LETTERS[said[0]]
    last = re.search(r"\b([A-J])\W*$", reasoning.strip())
    if not (last and last.group(1) == letter or
            normalize(reasoning).endswith(normalize(options[LETTERS.index(letter)]))):
        return "reasoning", None
    if normalize(question) in seen:
        return "duplicate", None
    return None, dict(question=question.strip(), options=[o.strip() for o in options],
                      answer=letter, reasoning=reasoning.strip(), category=category)


def generate_video(path, key, caption, write, args, factor, log):
    """One video: its record (clips, captions, asked, accepted, rejected and failures by kind, the
    timed captions; done False after a failed call: retried on rerun) and its rows."""
    rec = dict(video=key, clips=0, captions=0, asked=0, accepted=0, rejected={}, failures={},
               timed_captions=[], done=True)
    stage = "caption_"
    try:
        for k, clip in enumerate(cut_clips(path, args.clip_seconds, args.clip_frames,
                                           args.max_pixels, factor)):
            rec["clips"] += 1
            text = caption(CAPTION_PROMPT, clip, key=(key, k)).strip()
            if text:
                rec["captions"] += 1
                rec["timed_captions"].append([round(clip["start"], 2), round(clip["end"], 2), text])
        timed = "\n".join(f"[{a:.1f}-{b:.1f} s] {t}" for a, b, t in rec["timed_captions"])
        stage = "writer_"
        reply = write(WRITER_PROMPT.format(captions=timed, n=args.questions), key=(key, "writer"))
    except (VideoError, ModelError) as e:
        kind = "video" if isinstance(e, VideoError) else stage + e.kind
        rec["failures"][kind] = 1
        log(f"{key}: {kind}: {e}")
        # an unreadable video is done (it would fail again); after a failed call nothing of the
        # video is written, and a rerun asks again
        return dict(rec, done=isinstance(e, VideoError)), []
    rec["asked"], items, rows, seen = args.questions, parse_items(reply), [], set()
    if items is None:
        rec["rejected"]["unparseable"] = args.questions
        log(f"{key}: writer reply not a JSON list: {reply[:200]!r}")
        items = []
    elif len(items) < args.questions:
        rec["rejected"]["missing"] = args.questions - len(items)
    for j, item in enumerate(items[:args.questions]):
        why, row = check_item(item, seen)
        if why:
            rec["rejected"][why] = rec["rejected"].get(why, 0) + 1
            log(f"{key}: item {j} rejected ({why}): {json.dumps(item)[:200]}")
            continue
        seen.add(normalize(row["question"]))
        rows.append(dict(id=f"{key}#{len(rows)}", video=key, **row))
    rec["accepted"] = len(rows)
    return rec, rows


def _whole_lines(path):
    """The JSON objects of a jsonl file a kill may have cut short: a torn last line is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            out.append(json.loads(line)) if line.endswith("\n") else None
        except json.JSONDecodeError:
            pass
    return out


def _append(path, objs):
    """Append objs as jsonl lines in one write, synced to disk before the next append."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(o) + "\n" for o in objs))
        f.flush()
        os.fsync(f.fileno())


def resume_state(out):
    """The records of videos done by earlier runs, after undoing what a kill left behind: rows of a
    video without its record (killed between the two appends) and torn last lines."""
    records, rows = _whole_lines(out / "generate.jsonl"), _whole_lines(out / "train.jsonl")
    done = {r["video"] for r in records}
    keep = [r for r in rows if r["video"] in done]
    for name, objs in (("generate.jsonl", records), ("train.jsonl", keep)):
        path = out / name
        if path.exists() and len(path.read_text().splitlines()) != len(objs):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(o) + "\n" for o in objs))
            os.replace(tmp, path)  # atomic: the old file or the new, never half of one
    return records


def generate(args):
    """data.py generate: every video under args.videos not yet done -> args.out/train.jsonl rows,
    one generate.jsonl record per video, failures and rejections named in generate.log. Returns the
    summary over all videos done (this run and earlier ones) and this run's failed ones."""
    import model as M
    from tqdm import tqdm
    t0, out, models = time.time(), Path(args.out), {}
    if not Path(args.videos).is_dir():
        raise SystemExit(f"{args.videos}: not a folder of videos")
    out.mkdir(parents=True, exist_ok=True)
    videos = sorted(p for p in Path(args.videos).rglob("*") if p.suffix.lower() in VIDEO_EXTS)
    videos = videos[:args.limit] if args.limit else videos
    records = resume_state(out)
    done = {r["video"] for r in records}
    todo = [p for p in videos if os.path.relpath(p, out) not in done]

    def role(name, base, max_new):  # the endpoint at base, else a local model loaded once for both
        if base:
            return api_model(base, name, max_new, args.temperature, args.timeout, args.retries,
                             args.backoff)
        if name not in models:
            models[name] = M.load(name, device="cuda" if torch.cuda.is_available() else "cpu")
        return local_model(*models[name], max_new, args.temperature, args.seed)

    base = args.captioner_api_base or args.api_base
    caption = role(args.captioner, base, args.caption_tokens)
    write = role(args.writer, args.writer_api_base or args.api_base, args.writer_tokens)
    # frame sides: multiples of a local captioner's merged patch (Qwen3-VL's 32), else 28
    factor = FACTOR if base else \
        MERGE * M.processor_config(models[args.captioner][0].config)["patch_size"]
    failed = []
    with open(out / "generate.log", "a") as logf:
        def log(line):
            logf.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
            logf.flush()

        log(f"start: {len(videos)} videos, {len(done)} done before, {len(todo)} to do")
        bar = tqdm(todo, desc="generate", unit="video", file=sys.stderr)
        for path in bar:
            key = os.path.relpath(path, out)  # how the rows name the video
            rec, rows = generate_video(path, key, caption, write, args, factor, log)
            if not rec.pop("done"):
                failed.append(rec)
                continue
            _append(out / "train.jsonl", rows)  # the rows, then the record that says they are whole
            _append(out / "generate.jsonl", [rec])
            records.append(rec)
            bar.set_postfix(accepted=sum(r["accepted"] for r in records))
    total = dict(out=str(out), videos=len(videos), done=len(records), done_before=len(done),
                 failed=len(failed))
    for k in ("clips", "captions", "asked", "accepted"):
        total[k] = sum(r[k] for r in records)
    for k in ("rejected", "failures"):
        total[k] = dict(sorted(sum((collections.Counter(r[k]) for r in records + failed),
                                   collections.Counter()).items()))
    return dict(total, seconds=round(time.time() - t0, 2))


# -----------------------------------------------------------------------------
# command line

def probe_audio(path):
    """probe's audio part: a dict for the JSON (None: no audio stream) and a line to print."""
    try:
        wave, a = read_audio(path)
    except NoAudio:
        return None, "no audio"
    except VideoError as e:
        return {"error": str(e)}, f"audio: {e}"
    n = -(-len(wave) // HOP)  # mel frames, as audio_features makes them
    a.update(seconds=round(len(wave) / AUDIO_RATE, 3), mel_frames=n, audio_tokens=audio_tokens(n))
    return a, (f"audio stream #{a['stream']} of {a['audio_streams']} ({a['codec']}, "
               f"{a['sample_rate']} Hz, {a['channels']} ch): {len(wave) / AUDIO_RATE:.2f} s, "
               f"{n} mel frames, {a['audio_tokens']} audio tokens (Qwen2.5-Omni)")


def probe(args):
    audio, line = probe_audio(args.video)
    try:
        x = video_inputs(args.video, nframes=args.frames if args.fps is None else None,
                         fps=args.fps, max_pixels=args.max_pixels, min_pixels=args.min_pixels,
                         reader=args.reader)
    except VideoError as e:
        print(f"probe: {e}", file=sys.stderr)
        print(line)  # an audio file has no video stream, yet its audio is worth knowing
        print(json.dumps({"video": args.video, "error": str(e), "audio": audio}))
        return 1
    info, (gt, gh, gw) = x["info"], x["grid_thw"][0].tolist()
    keep = ("reader", "stream", "video_streams", "codec", "pix_fmt", "total_frames",
            "container_frames", "pixel_aspect")
    res = dict(video=args.video, **{k: info[k] for k in keep},
               video_fps=round(info["video_fps"], 3), frames_sampled=len(info["indices"]),
               source_size=[info["height"], info["width"]], frame_size=[gh * PATCH, gw * PATCH],
               grid_thw=[gt, gh, gw], video_tokens=gt * gh * gw // (MERGE * MERGE),
               second_per_grid=round(x["second_per_grid"], 4), seconds=round(info["seconds"], 3))
    fps, n, shown = info["video_fps"], info["total_frames"], ""
    print(f"{args.video}: video stream #{info['stream']} of {info['video_streams']} "
          f"({info['codec']}, {info['pix_fmt']}), {n} frames at {fps:.2f} fps "
          f"({n / max(fps, 1e-9):.1f} s), read with {info['reader']}")
    print(f"sampled {len(info['indices'])} frames (indices {info['indices'][:3]} ... "
          f"{info['indices'][-1]}), {info['sampled_fps']:.3f} fps, "
          f"decoded in {info['seconds']:.2f} s")
    if info["pixel_aspect"] != 1:
        shown = f" (pixels {info['pixel_aspect']:g}:1, stretched to show)"
    print(f"frames {info['height']}x{info['width']}{shown} -> {gh * PATCH}x{gw * PATCH}, grid "
          f"{res['grid_thw']}, pixel_values {tuple(x['pixel_values'].shape)}, "
          f"{res['video_tokens']} video tokens")
    print(line)
    print(json.dumps(dict(res, audio=audio)))
    return 0


def parser():
    p = argparse.ArgumentParser(description="longrl: probe a video, write the synthetic task, or "
                                "generate QA rows from long videos")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("probe", help="decode + preprocess: sizes, tokens, time; audio; JSON last")
    q.add_argument("video", help="path to a video file")
    q.add_argument("--frames", type=int, default=32, help="uniform frames, made even; default 32")
    q.add_argument("--fps", type=float, default=None, help="frames per second; replaces --frames")
    q.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="max pixels/frame; default 128*28*28")
    q.add_argument("--min-pixels", type=int, default=MIN_PIXELS, help="min pixels/frame; default 4*28*28")
    q.add_argument("--reader", choices=["pyav", "decord"], help="default: pyav (decord is refused "
                   "where its frames would differ: several streams, B-frames, >8 bits, odd pixels)")
    s = sub.add_parser("synth", help="write the synthetic long-video QA (mp4 + train/test jsonl)")
    s.add_argument("--out", required=True, help="output folder (videos/, train.jsonl, test.jsonl)")
    s.add_argument("--n", type=int, default=1000, help="videos, one question each; default 1000")
    s.add_argument("--frames", type=int, default=256, help="frames per video, >= 8; default 256")
    s.add_argument("--seed", type=int, default=0, help="seed (same args, same files); default 0")
    s.add_argument("--size", type=int, default=56, help="frame side in pixels, even; default 56")
    s.add_argument("--fps", type=int, default=8, help="frame rate written into the mp4; default 8")
    s.add_argument("--test-frac", type=float, default=0.2, help="test.jsonl fraction; default 0.2")
    s.add_argument("--n-test", type=int, default=None, help="test videos (overrides --test-frac)")
    s.add_argument("--family", default="flash", choices=list(FAMILIES),
                   help="flash (the default task), motion (words, numbers, yes/no; a moving square), "
                   "aside (kept for a final check of defaults), sound (a soundtrack: 3 categories "
                   "only it answers, 1 only the frames); default flash")
    s.add_argument("--noise", type=float, default=DEFAULT_NOISE, help="fraction of train traces "
                   f"reasoning to a wrong trace_answer (true answer kept); default {DEFAULT_NOISE}")
    g = sub.add_parser("generate", help="long videos -> clips, captions, reasoning QA rows "
                       "(LongVideo-Reason's recipe); resumable; JSON summary last")
    g.add_argument("videos", help=f"folder of videos, searched recursively ({' '.join(VIDEO_EXTS)})")
    g.add_argument("--out", required=True, help="output folder: train.jsonl (rows, videos relative "
                   "to it), generate.jsonl (a record per video done: counts, timed captions), "
                   "generate.log (failures and rejected items)")
    g.add_argument("--clip-seconds", type=float, default=10.0, help="clip length, s; default 10")
    g.add_argument("--clip-frames", type=int, default=8,
                   help="frames the captioner sees of a clip, uniform; default 8")
    g.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="per caption frame; default 128*28*28")
    g.add_argument("--questions", type=int, default=4, help="items asked a video; default 4")
    g.add_argument("--captioner", default="tiny", help="a local HF folder (any supported family) or "
                   "a tiny model's name; with an endpoint, the model name it serves; default tiny "
                   "(offline; nonsense text)")
    g.add_argument("--writer", default="tiny", help="as --captioner, for the writer; default tiny")
    g.add_argument("--api-base", default=None, help="OpenAI-compatible endpoint of both roles, e.g. "
                   "http://localhost:8000/v1 (vLLM, SGLang); default none: local models")
    g.add_argument("--captioner-api-base", default=None, help="the captioner's (over --api-base)")
    g.add_argument("--writer-api-base", default=None, help="the writer's (over --api-base)")
    g.add_argument("--caption-tokens", type=int, default=256, help="max a caption; default 256")
    g.add_argument("--writer-tokens", type=int, default=4096, help="max a reply; default 4096")
    g.add_argument("--temperature", type=float, default=0.0, help="both roles; 0 = greedy (default)")
    g.add_argument("--timeout", type=float, default=300.0,
                   help="endpoint: seconds a request may take; default 300")
    g.add_argument("--retries", type=int, default=3, help="endpoint: tries after the first; default 3")
    g.add_argument("--backoff", type=float, default=2.0,
                   help="endpoint: seconds before the first retry, doubling each; default 2")
    g.add_argument("--limit", type=int, default=0, help="the first N videos (sorted); 0 = all")
    g.add_argument("--seed", type=int, default=0, help="local models' sampling seed; default 0")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.cmd == "probe":
        return probe(args)
    if args.cmd == "generate":
        print(json.dumps(generate(args)))
        return 0
    t0 = time.time()
    counts = synth(args.out, args.n, args.frames, args.seed, args.size, args.fps, args.n_test,
                   args.test_frac, args.noise, args.family)
    print(json.dumps(dict(out=args.out, **counts, frames=args.frames, seconds=round(time.time() - t0, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
