"""Video files for the tests of data.py: two real clips kept in tests/data (from decord's tests,
Apache-2.0, see tests/data/README.md) and three written here with PyAV, standing in for real clips
whose licence keeps them out of the repository and reproducing what the tests need of them.
conftest.py's media_files fixture writes them once a session.

    camera.mp4      a camera-like clip (a textured scene panned across, a disc crossing it, light
                    changing), 384x216 H.264 4:4:4 with B-frames, 280 frames at 20 fps, a 440 Hz
                    tone as MP3 at 16 kHz mono: the normal path
    short.mp4       320x240 H.264 yuv420p, 36 frames at 29.97 fps, a 660 Hz tone as AAC at 48 kHz
                    mono: asking for more frames than there are
    no_count.webm   160x120 VP8 WebM written as a live stream: no frame count and no duration,
                    which decord refuses ('Failed to measure duration'); PyAV decodes its 94 frames
"""
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

DATA = Path(__file__).resolve().parent / "data"
CAMERA = dict(frames=280, fps=20, height=216, width=384, tone_hz=440)
SHORT = dict(frames=36, fps=Fraction(30000, 1001), height=240, width=320, tone_hz=660)
NO_COUNT = dict(frames=94, fps=30, height=120, width=160)
TONES = {"camera.mp4": CAMERA["tone_hz"], "short.mp4": SHORT["tone_hz"]}


def scene(n, h, w, seed=0):
    """n frames of a camera panning over a textured wall while a yellow disc crosses it."""
    rng = np.random.default_rng(seed)
    wall = rng.integers(0, 256, (h // 8 + 40, w // 8 + 40, 3), dtype=np.uint8)
    wall = wall.repeat(8, 0).repeat(8, 1).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w]
    for t in range(n):
        dy, dx = 100 + round(20 * np.sin(t / 40)), t % 300
        f = wall[dy:dy + h, dx:dx + w] * 0.5 + 64 + 30 * np.sin(t / 30)
        cy, cx = h / 2 + h / 3 * np.sin(t / 25), w * ((t / n * 1.5) % 1)
        f[(y - cy) ** 2 + (x - cx) ** 2 < (h / 6) ** 2] = (230, 200, 40)
        yield np.clip(f, 0, 255).astype(np.uint8)


def write(path, spec, codec, pix_fmt, options, audio=None, container_options=None):
    """Write scene frames as spec says; audio: (codec, rate, samples a frame) for spec's tone."""
    with av.open(str(path), "w", options=container_options or {}) as c:
        v = c.add_stream(codec, rate=spec["fps"])
        v.width, v.height, v.pix_fmt, v.options = spec["width"], spec["height"], pix_fmt, options
        if audio:
            acodec, rate, size = audio
            a = c.add_stream(acodec, rate=rate, layout="mono")
            t = np.arange(round(spec["frames"] / spec["fps"] * rate)) / rate
            wave = (0.3 * np.sin(2 * np.pi * spec["tone_hz"] * t)).astype(np.float32)
            for i in range(0, len(wave), size):
                f = av.AudioFrame.from_ndarray(wave[None, i:i + size], format="fltp", layout="mono")
                f.sample_rate, f.pts = rate, i
                c.mux(a.encode(f))
            c.mux(a.encode())
        for f in scene(spec["frames"], spec["height"], spec["width"]):
            c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(v.encode())
    return str(path)


def camera(path):
    return write(path, CAMERA, "libx264", "yuv444p", audio=("libmp3lame", 16000, 1152),
                 options=dict(crf="23", preset="veryfast",
                              x264opts="bframes=3:keyint=70:min-keyint=70:scenecut=0"))


def short(path):
    return write(path, SHORT, "libx264", "yuv420p", dict(preset="veryfast"),
                 audio=("aac", 48000, 1024))


def no_count(path):
    return write(path, NO_COUNT, "libvpx", "yuv420p", {}, container_options=dict(live="1"))


def write_all(folder):
    """name -> path of every video file the tests read as a real clip."""
    folder = Path(folder)
    return {"camera.mp4": camera(folder / "camera.mp4"), "short.mp4": short(folder / "short.mp4"),
            "no_count.webm": no_count(folder / "no_count.webm"),
            "rotated_90.mov": str(DATA / "rotated_90.mov"),
            "corrupted.mp4": str(DATA / "corrupted.mp4")}
