"""Tests for data.py's audio (Qwen2.5-Omni's thinker hears the video): read_audio, audio_features,
audio_tokens, the probe's audio line, rows with an audio field and the samples VideoDataset makes of
them.

    python -m pytest tests/test_audio.py -q

The reference is transformers' WhisperFeatureExtractor at Qwen2.5-Omni's settings, called as its
processor calls it. Clips with sound are muxed here with PyAV (known tones), and so are the clips
tests/media.py writes in place of real ones (MP3 at 16 kHz, AAC at 48 kHz), checked beside the two
real clips in tests/data.
"""
import json
import re
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as M  # noqa: E402
from data import NoAudio, VideoError  # noqa: E402
from media import TONES  # noqa: E402

# Qwen/Qwen2.5-Omni-7B's preprocessor_config.json (the feature extractor's part)
QWEN_OMNI = dict(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400,
                 padding_value=0.0, dither=0.0, return_attention_mask=True)
RATE = 16000


def processor_features(wave, **config):
    """What Qwen2_5OmniProcessor gives for one clip: its feature extractor called with the
    processor's own audio kwargs; features cut to the frames the mask keeps."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessorKwargs
    kw = Qwen2_5OmniProcessorKwargs._defaults["audio_kwargs"]  # sampling_rate, padding, mask
    out = WhisperFeatureExtractor(**{**QWEN_OMNI, **config})(wave, return_tensors="pt", **kw)
    n = int(out["attention_mask"].sum())
    assert out["attention_mask"][0, :n].all()  # right padding: the clip, then zeros
    return out["input_features"], out["attention_mask"], n


def tone(seconds, *hz, rate=RATE):
    t = np.arange(round(seconds * rate)) / rate
    return sum(0.3 * np.sin(2 * np.pi * f * t) for f in hz).astype(np.float32)


def peak_hz(wave):
    """The strongest frequency of a 16 kHz wave, to 1/len(wave) * 16000 Hz."""
    return np.abs(np.fft.rfft(wave * np.hanning(len(wave)))).argmax() * RATE / len(wave)


def amplitude(wave):
    """A sine's amplitude from its power (AAC leaves brief peaks above it), the ends left out."""
    return np.sqrt(2 * np.mean(wave[1600:-1600].astype(np.float64) ** 2))


def mux(path, left, right=None, rate=48000, codec="aac", video=True, faststart=False):
    """Write an mp4 (8 fps 32x32 gray H.264 video and the audio) or an audio-only file: channels
    left (and right) at `rate`, float in [-1, 1]."""
    chans = np.stack([left] if right is None else [left, right]).astype(np.float32)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        if video:
            v = c.add_stream("h264", rate=8)
            v.width = v.height = 32
            v.pix_fmt = "yuv420p"
        a = c.add_stream(codec, rate=rate, layout="mono" if right is None else "stereo")
        for i in range(0, chans.shape[1], 1024):  # PyAV converts to the encoder's sample format
            f = av.AudioFrame.from_ndarray(chans[:, i:i + 1024], format="fltp", layout=a.layout)
            f.sample_rate, f.pts = rate, i
            c.mux(a.encode(f))
        c.mux(a.encode())
        if video:
            gray = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
            for _ in range(round(chans.shape[1] / rate * 8)):
                c.mux(v.encode(gray))
            c.mux(v.encode())
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The muxed files: name -> path."""
    d, t = tmp_path_factory.mktemp("audio"), np.arange(96000) / 48000
    hi_at_1s = np.where(t < 1, 0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 880 * t))
    gray = np.zeros((16, 32, 32, 3), np.uint8)
    data.write_mp4(d / "silent_film.mp4", gray, fps=8)  # no audio stream
    return {"stereo.mp4": mux(d / "stereo.mp4", 0.6 * np.sin(2 * np.pi * 440 * t),
                              0.2 * np.sin(2 * np.pi * 440 * t)),  # a mean of 0.4
            "pitch.mp4": mux(d / "pitch.mp4", hi_at_1s),  # 440 Hz, then 880 Hz from t = 1 s
            "pitch_faststart.mp4": mux(d / "pitch_faststart.mp4", hi_at_1s, faststart=True),
            "song.wav": mux(d / "song.wav", *[tone(2, 440, rate=44100)] * 2, rate=44100,
                            codec="pcm_s16le", video=False),
            "silent_film.mp4": str(d / "silent_film.mp4")}


# -----------------------------------------------------------------------------
# features: equal to the processor

def test_mel_filters_equal_transformers():
    from transformers.audio_utils import mel_filter_bank
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                          mel_scale="slaney")  # as WhisperFeatureExtractor builds it
    assert np.abs(data.mel_filters().numpy() - ref).max() < 1e-12  # measured 3e-16


def chirp(seconds):  # 100 Hz to 7.9 kHz, through every mel band
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * (100 * t + 7800 / (2 * seconds) * t ** 2))).astype(np.float32)


def loud_end(n):  # quiet noise, loud in its last 40 samples: a frame past the end sets the max
    w = np.random.default_rng(0).normal(0, 1e-3, n).astype(np.float32)
    w[-40:] = 0.9
    return w


SIGNALS = {  # each is a length in samples too: several not a multiple of the hop (160)
    "tones 1 s": tone(1, 440, 1000), "tones 2.0001 s": tone(2.0001, 440, 1000),
    "chirp 3.3 s": chirp(3.3), "silence": np.zeros(12345, np.float32),
    "under a hop": tone(0.007, 1000), "loud end": loud_end(4800),
    "31 s, past Whisper's default 30": tone(31.01, 250, 3000),
}


@pytest.mark.parametrize("name", SIGNALS)
def test_features_equal_processor(name):
    wave = SIGNALS[name]
    ref, ref_mask, n = processor_features(wave)
    assert ref.shape == (1, 128, 30000)  # chunk_length 300 in force: padded to 300 s
    feats, mask = data.audio_features(wave)
    assert feats.shape == (1, 128, n) and feats.dtype == torch.float32 and n == -(-len(wave) // 160)
    assert torch.equal(mask, ref_mask[:, :n])
    assert (feats - ref[..., :n]).abs().max() <= 1e-5  # measured 0.0 for all of them


def test_features_longer_than_the_processor_keeps():
    """The processor cuts a clip at 300 s; audio_features keeps it all, by the same rule: what the
    processor gives with a longer chunk_length."""
    wave = np.concatenate([tone(150, 300), tone(151, 2000)])
    feats, _ = data.audio_features(wave)
    ref, _, n = processor_features(wave, chunk_length=310)
    assert n == 30100 and feats.shape[-1] == n
    assert (feats - ref[..., :n]).abs().max() <= 1e-5
    assert processor_features(wave)[2] == 30000  # Qwen's own config: the last second is lost


@pytest.fixture(scope="module")
def thinker():
    """A tiny random Qwen2.5-Omni thinker (the audio tower as the real one, 128 mels and n_window
    100; tiny widths)."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=32, output_dim=32, n_window=100),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=32, fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "default", "mrope_section": [2, 3, 3]}))
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration(config).eval()


def test_audio_tokens_are_the_thinkers(thinker):
    """audio_tokens counts what the encoder returns; our unpadded features with a mask of ones give
    the same audio embeddings as the processor's 300 s of padded features with its mask."""
    lengths = torch.arange(0, 1000)
    assert torch.equal(data.audio_tokens(lengths),
                       thinker.audio_tower._get_feat_extract_output_lengths(lengths)[1])
    for samples in (480, 16000, 16001, 12345, 40033):  # 3, 100, 101, 78 and 251 frames
        wave = np.random.default_rng(samples).normal(0, 0.1, samples).astype(np.float32)
        ref, ref_mask, n = processor_features(wave)
        with torch.no_grad():
            ours = thinker.get_audio_features(*data.audio_features(wave)).last_hidden_state
            theirs = thinker.get_audio_features(ref, ref_mask).last_hidden_state
        assert len(ours) == data.audio_tokens(n)
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert data.audio_tokens(100 * 60) == 25 * 60  # a minute of sound


# -----------------------------------------------------------------------------
# read_audio

def test_stereo_48k_becomes_16k_mono_mean(clips):
    wave, info = data.read_audio(clips["stereo.mp4"])
    assert info == dict(stream=1, audio_streams=1, codec="aac", sample_rate=48000, channels=2)
    assert wave.dtype == np.float32 and wave.ndim == 1
    # 2 s; AAC adds up to one 1024-sample frame at 48 kHz of encoder padding at the end
    assert 32000 <= len(wave) <= 32000 + 1024 // 3 + 1
    assert abs(peak_hz(wave[:32000]) - 440) <= 0.5
    # (0.6 + 0.2) / 2: a sum (0.8), swresample's own float downmix (0.57) or one channel fail
    assert abs(amplitude(wave) - 0.4) < 0.01


def test_audio_only_file_exact_length(clips):
    wave, info = data.read_audio(clips["song.wav"])
    assert info["sample_rate"] == 44100 and info["channels"] == 2 and info["codec"] == "pcm_s16le"
    assert len(wave) == 32000 and abs(peak_hz(wave) - 440) <= 0.5
    assert abs(amplitude(wave) - 0.3) < 0.001  # s16 read back as float in [-1, 1]


def test_cut_takes_the_right_samples(clips):
    path = clips["pitch.mp4"]
    whole, _ = data.read_audio(path)
    for start, end in ((0.5, 1.25), (1.0, None), (None, 0.3), (0.0001, 1.99)):
        part, _ = data.read_audio(path, start, end)
        lo, hi = round((start or 0) * RATE), None if end is None else round(end * RATE)
        assert np.array_equal(part, whole[lo:hi]), (start, end)
    first, _ = data.read_audio(path, 0, 1)
    second, _ = data.read_audio(path, 1, 2)
    assert len(first) == len(second) == RATE
    assert abs(peak_hz(first) - 440) <= 1 and abs(peak_hz(second) - 880) <= 1
    with pytest.raises(VideoError, match="no audio in"):
        data.read_audio(path, 5, 6)


def test_real_clip_features_equal_processor(clips):
    """The muxed clip with sound, decoded, as the thinker would get it."""
    wave, _ = data.read_audio(clips["pitch.mp4"], 0.25, 1.8)
    ref, _, n = processor_features(wave)
    assert (data.audio_features(wave)[0] - ref[..., :n]).abs().max() <= 1e-5


def test_no_audio_is_its_own_error(clips):
    path = clips["silent_film.mp4"]
    with pytest.raises(NoAudio, match=f"^{path}: no audio stream") as e:
        data.read_audio(path)
    assert isinstance(e.value, VideoError) and e.value.path == path  # a dataset's skip catches it


@pytest.mark.parametrize("how", ["cut end", "cut end (faststart)", "garbage", "missing"])
def test_broken_files_raise_video_error(clips, tmp_path, how):
    path = tmp_path / "broken.mp4"
    if how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif how != "missing":
        raw = Path(clips["pitch_faststart.mp4" if "faststart" in how else "pitch.mp4"]).read_bytes()
        path.write_bytes(raw[:len(raw) * 2 // 3])
    with pytest.raises(VideoError, match=f"^{path}: ") as e:
        data.read_audio(str(path))
    assert type(e.value) is VideoError


@pytest.mark.parametrize("name", ["camera.mp4", "short.mp4", "no_count.webm", "rotated_90.mov",
                                  "corrupted.mp4"])
def test_real_clips(media_files, name):
    """Each clip media_files gives: NoAudio where PyAV sees no audio stream, else the tone it
    carries and the processor's features."""
    path = media_files[name]
    with av.open(path) as c:
        has_audio = len(c.streams.audio) > 0
    assert has_audio == (name in TONES)
    if not has_audio:
        with pytest.raises(NoAudio):
            data.read_audio(path)
        return
    wave, info = data.read_audio(path)
    with av.open(path) as c:
        s = c.streams.audio[0]
        declared = float(s.duration * s.time_base)
    assert abs(len(wave) / RATE - declared) < 0.07, (len(wave), declared)
    assert abs(peak_hz(wave) - TONES[name]) <= 1 and abs(amplitude(wave) - 0.3) < 0.03  # MP3: 0.285
    ref, _, n = processor_features(wave)
    assert (data.audio_features(wave)[0] - ref[..., :n]).abs().max() <= 1e-5


# -----------------------------------------------------------------------------
# probe

def test_probe_reports_audio(clips, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert data.main(["probe", clips["stereo.mp4"], "--frames", "2"]) == 0
    out = capsys.readouterr().out
    a = json.loads(out.strip().splitlines()[-1])["audio"]
    assert a["codec"] == "aac" and a["sample_rate"] == 48000 and a["channels"] == 2
    assert a["audio_tokens"] == data.audio_tokens(a["mel_frames"]) and abs(a["seconds"] - 2) < 0.03
    assert abs(a["audio_tokens"] - 25 * a["seconds"]) <= 1 and "audio tokens" in out
    assert data.main(["probe", clips["silent_film.mp4"], "--frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "no audio" in out and json.loads(out.strip().splitlines()[-1])["audio"] is None


# -----------------------------------------------------------------------------
# rows with audio, and the samples a dataset makes of them

def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(id, **media):
    return dict(id=id, question="What is heard?", answer="A", options=["x", "y"], **media)


def junk_audio(src, out):
    """src's streams copied, every audio packet's bytes replaced by junk: the video decodes, the
    sound does not."""
    rng = np.random.default_rng(0)
    with av.open(src) as i, av.open(str(out), "w") as o:
        vi, ai = i.streams.video[0], i.streams.audio[0]
        vo, ao = o.add_stream_from_template(vi), o.add_stream_from_template(ai)
        for p in i.demux():
            if p.dts is None:  # the demuxer's flush packets
                continue
            if p.stream is ai:
                q = av.Packet(rng.bytes(p.size))
                q.pts, q.dts, q.time_base, q.stream = p.pts, p.dts, p.time_base, ao
                o.mux(q)
            else:
                p.stream = vo
                o.mux(p)
    return str(out)


OMNI_PROC = M.processor_config(M.tiny_config(M.tiny_tokenizer(omni=True), M.OMNI))
VL_PROC = M.processor_config(M.tiny_config(M.tiny_tokenizer(), "qwen2_5_vl"))


def test_rows_audio_field(tmp_path):
    f = write_rows(tmp_path / "qa.jsonl", [
        qa("own", video="v/a.mp4", audio="video"), qa("file", video="v/a.mp4", audio="s/a.wav"),
        qa("alone", audio="/abs/a.wav"), qa("none", video="v/a.mp4")])
    rows = data.load_rows(f, video_root="/videos")
    assert [r["audio"] for r in rows] == ["/videos/v/a.mp4", "/videos/s/a.wav", "/abs/a.wav", None]


@pytest.mark.parametrize("media,message", [
    (dict(video="a.mp4", audio=3), 'audio must be a file\'s path or "video"'),
    (dict(video="a.mp4", audio=["a.wav"]), 'audio must be a file\'s path or "video"'),
    (dict(video="a.mp4", audio=""), 'audio must be a file\'s path or "video"'),
    (dict(image="a.png", audio="a.wav"), "not with an image"),
    (dict(audio="video"), "the row has no video"),
])
def test_malformed_audio_field_names_the_row(tmp_path, media, message):
    f = write_rows(tmp_path / "bad.jsonl", [qa("q1", video="a.mp4"), qa("q2", video="b.mp4"),
                                            qa("q3", **media)])
    with pytest.raises(ValueError, match=re.escape(f"{f}:3: ") + ".*" + re.escape(message)):
        data.load_rows(f)


@pytest.fixture(scope="module")
def omni():
    return M.load("tiny-qwen2.5-omni")


def test_dataset_gives_the_thinker_the_rows_sound(clips, tmp_path, omni):
    """A row with a video and its own track: the frames, and the features of [0, frames / fps) of
    the track (long_track.mp4's runs 2.3 s past its 18 frames at 8 fps: 2.25 s); a row of audio
    alone: the whole file. The tiny Omni thinker's prompt has one <|AUDIO|> per audio_tokens of the
    mel frames, and transformers' own forward from these features equals ours."""
    model, tok = omni
    long = mux(tmp_path / "long_track.mp4", tone(2.3, 440, rate=48000), rate=48000)
    f = write_rows(tmp_path / "qa.jsonl", [qa("own", video=long, audio="video"),
                                           qa("alone", audio=clips["song.wav"]),
                                           qa("silent", video=clips["silent_film.mp4"])])
    ds = data.VideoDataset(data.load_rows(f), nframes=8, proc=M.processor_config(model.config))
    own, alone, silent = ds.iter_samples()
    assert ds.n_bad == 0 and [s["kind"] for s in ds.iter_samples()] == ["video", "audio", "video"]
    assert "input_features" not in silent  # the row does not ask for sound
    assert len(data.read_audio(long)[0]) >= 2.3 * RATE  # the track runs past the video
    for s, seconds in ((own, 2.25), (alone, 2.0)):
        wave, _ = data.read_audio(s["audio"], end=None if s is alone else seconds)
        feats, mask = data.audio_features(wave)
        assert torch.equal(s["input_features"], feats)
        assert torch.equal(s["feature_attention_mask"], mask)
        assert int(mask.sum()) == round(seconds * 100)
        ids, pos = M.prompt_of(tok, model.config, s, data.question_text(s))
        ids = torch.tensor([ids])
        n_audio = int((ids == model.config.audio_token_id).sum())
        assert n_audio == data.audio_tokens(int(mask.sum())) == round(seconds * 25)
        assert int((ids == model.config.video_token_id).sum()) == (
            int(s["grid_thw"].prod()) // 4 if s is own else 0)
        with torch.no_grad():
            aud = M.encode_mels(model, s["input_features"], s["feature_attention_mask"])
            vis = M.encode_pixels(model, s["pixel_values"], s["grid_thw"]) if s is own else None
            ours = model.lm_head(M.forward(model, M.splice(model, ids, vis, aud), pos[:, None]))
            theirs = M.reference_logits(model, ids, None, s)
        assert len(aud) == n_audio and (ours - theirs).abs().max() < 1e-5


def test_a_model_that_does_not_hear(clips, tmp_path):
    """Qwen2.5-VL's proc has no feature extractor: a video row asking for sound gets its frames
    alone (with one warning when the dataset is made), a row of audio alone is skipped, counted."""
    rows = data.load_rows(write_rows(tmp_path / "qa.jsonl", [
        qa("own", video=clips["pitch.mp4"], audio="video"), qa("alone", audio=clips["song.wav"])]))
    with pytest.warns(UserWarning, match="does not hear"):
        ds = data.VideoDataset(rows, nframes=8, proc=VL_PROC)
    with pytest.warns(UserWarning, match="skipping sample alone"):
        got = list(ds.iter_samples())
    assert [s["id"] for s in got] == ["own"] and "input_features" not in got[0]
    assert [i for i, _ in ds.bad] == ["alone"] and "does not hear" in ds.bad[0][1]


@pytest.mark.parametrize("mute", [False, True])
def test_rows_whose_sound_fails_are_skipped_and_counted(clips, tmp_path, mute):
    """A row asking for the track of a silent video (NoAudio), for a corrupt audio stream or a
    missing file: skipped and counted, never given its frames without its sound; muted, the same
    rows (the audio-blind control runs on the same questions)."""
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(1).bytes(20_000))
    pitch = clips["pitch.mp4"]
    rows = data.load_rows(write_rows(tmp_path / "qa.jsonl", [
        qa("good", video=pitch, audio="video"),
        qa("silent", video=clips["silent_film.mp4"], audio="video"),
        qa("corrupt stream", video=junk_audio(pitch, tmp_path / "junk_track.mp4"), audio="video"),
        qa("corrupt file", video=pitch, audio=str(junk)),
        qa("gone", video=pitch, audio=str(tmp_path / "gone.wav")),
        qa("no sound asked", video=clips["silent_film.mp4"])]))
    ds = data.VideoDataset(rows, nframes=8, proc=OMNI_PROC, mute=mute)
    with pytest.warns(UserWarning) as caught:
        got = list(ds.iter_samples())
    assert [s["id"] for s in got] == ["good", "no sound asked"]
    assert [i for i, _ in ds.bad] == ["silent", "corrupt stream", "corrupt file", "gone"]
    assert len(caught) == 4
    why = dict(ds.bad)
    assert why["silent"] == f"{clips['silent_film.mp4']}: no audio stream"
    assert "PyAV failed on its audio" in why["corrupt stream"] and why["corrupt stream"].startswith(
        str(tmp_path / "junk_track.mp4"))
    assert why["corrupt file"].startswith(f"{junk}: ") and "no such file" in why["gone"]
    assert data.read_video(rows[2]["video"], nframes=8)[0].shape[0] == 8  # its frames do decode


def test_mute_gives_the_features_of_silence(clips, tmp_path):
    """mute: features of an all-zero wave as long as the sound, the same mask; the same frames."""
    rows = data.load_rows(write_rows(tmp_path / "qa.jsonl", [
        qa("own", video=clips["pitch.mp4"], audio="video"), qa("alone", audio=clips["song.wav"])]))
    heard = list(data.VideoDataset(rows, nframes=8, proc=OMNI_PROC).iter_samples())
    muted = list(data.VideoDataset(rows, nframes=8, proc=OMNI_PROC, mute=True).iter_samples())
    for h, m in zip(heard, muted):
        n = int(h["feature_attention_mask"].sum())
        assert m["input_features"].shape == h["input_features"].shape == (1, 128, n)
        assert torch.equal(m["feature_attention_mask"], h["feature_attention_mask"])
        silence = data.audio_features(np.zeros(n * 160, np.float32))[0]
        assert torch.equal(m["input_features"], silence)
        assert h["input_features"].std() > 0.1  # the heard ones are not silence
    assert torch.equal(heard[0]["pixel_values"], muted[0]["pixel_values"])
