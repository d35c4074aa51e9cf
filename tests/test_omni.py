"""Qwen2.5-Omni's thinker through the RL path: a prompt's sound encoded once (mr_sp.prepare) and
spliced into the rollout engine's prefill and the trainer's passes, as its video is; against the
thinker's own forward from log-mels (transformers), and with 2 SP ranks against one process.

    python -m pytest tests/test_omni.py -q

The SP workers are this file under torchrun; rank 0 writes what they measured as JSON:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_omni.py OUT.json"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the torchrun command runs this file from tests/
import grpo  # noqa: E402
import model as M  # noqa: E402
import mr_sp  # noqa: E402

# (grid, seconds of sound) of videos with their sound: one group a chunk; a group leaping two chunks
# (4 s a group), sound longer than the video. 3.1 s is 2 audio windows (200 + 110 mel frames), 7.3 s 4.
SOUND = [((4, 8, 8), 3.1, 2.0), ((2, 4, 6), 7.3, 4.0)]


def sound_samples(model):
    """Videos with their sound, and a clip of sound alone (1.3 s: one window), of random values."""
    out = [dict(s, **M.random_audio(sec, seed=10 + i)) for i, (s, (_, sec, _)) in enumerate(zip(
        M.random_samples(model, [g for g, _, _ in SOUND], second_per_grid=[x for _, _, x in SOUND]), SOUND))]
    return out + [dict(kind="audio", **M.random_audio(1.3, seed=20))]


@pytest.fixture(scope="module")
def omni():
    return M.load("tiny-qwen2.5-omni")


@pytest.fixture(scope="module")
def rollout_rows(omni):
    """Each sample prepared once (its embeddings cached), G = 4 samples a prompt from our engine."""
    model, tok = omni
    prompts = [mr_sp.prepare(model, tok, s, f"Question {i}: what do you hear?")
               for i, s in enumerate(sound_samples(model))]
    G = 4
    toks, lps, lens = mr_sp.rollout(model, tok, prompts, G, [mr_sp.seed_of(0, i) for i in range(len(prompts))],
                                    max_new=24, temperature=1.0)
    rows = [dict(prompts[j // G], response=toks[j, :lens[j]].tolist()) for j in range(len(prompts) * G)]
    return prompts, rows, lps, lens, G


def test_prepare_encodes_the_sound_once(omni, rollout_rows):
    """A video with its sound and a clip alone: audio embeddings cached beside the visual ones (none
    for sound alone), as many as the prompt's <|AUDIO|> tokens; the rollout's G rows share them."""
    model, _ = omni
    prompts, rows, _, _, G = rollout_rows
    audio = [int((torch.tensor(p["prompt"]) == model.config.audio_token_id).sum()) for p in prompts]
    assert [len(p["audio"]) for p in prompts] == audio == [77, 182, 32]
    assert prompts[2]["visual"] is None and prompts[0]["visual"] is not None
    assert all(r["audio"] is prompts[j // G]["audio"] for j, r in enumerate(rows))


@pytest.mark.parametrize("packed", [True, False])
def test_trainer_logprobs_equal_rollout_engine_with_sound(omni, rollout_rows, packed):
    """The prefill pass scores the engine's samples of videos with their sound, and of sound alone,
    as the engine did: a prompt's rows packed (its prompt once), or all rows side by side (left
    padding). And the sound is heard: the other prompt's sound in its place moves them by > 0.01."""
    model, tok = omni
    prompts, rows, lps, lens, G = rollout_rows
    with torch.no_grad():
        got = [mr_sp.prefill_logprobs(model, tok, rows[b * G:(b + 1) * G], packed=packed)
               for b in range(len(prompts))] if packed else [mr_sp.prefill_logprobs(model, tok, rows, packed=False)]
        lp = torch.cat([torch.nn.functional.pad(x[0], (0, lps.shape[1] - x[0].shape[1])) for x in got])
        mask = torch.cat([torch.nn.functional.pad(x[2], (0, lps.shape[1] - x[2].shape[1])) for x in got])
        assert mask.sum(1).tolist() == lens.tolist() and mask.sum() > len(rows)
        assert (lp - lps)[mask.bool()].abs().max() <= 1e-5
        # the 7.3 s clip's embeddings where the 3.1 s clip's were (its first 77): another sound
        swapped = [dict(r, audio=prompts[1]["audio"][:77]) for r in rows[:G]]
        other = mr_sp.prefill_logprobs(model, tok, swapped, packed=packed)[0]
    assert (other - lp[:G, :other.shape[1]])[mask[:G, :other.shape[1]].bool()].abs().max() > 1e-2


def test_cached_sound_logprobs_equal_the_thinkers_own_forward(omni, rollout_rows):
    """The naive reference: transformers' whole thinker forward from pixels and log-mels, at its own
    positions (get_rope_index, use_audio_in_video), re-encoding the video and sound for every row;
    our pass splices the embeddings prepare cached. Log-probs of each rollout's tokens (vision tokens
    banned in both), within 1e-5."""
    model, tok = omni
    prompts, rows, _, _, G = rollout_rows
    samples, banned = sound_samples(model), M.banned_ids(tok)
    with torch.no_grad():
        for b, s in enumerate(samples):
            mine = rows[b * G:(b + 1) * G]
            lp, _, mask = mr_sp.prefill_logprobs(model, tok, mine)
            for j, r in enumerate(mine):
                ids = torch.tensor([r["prompt"] + r["response"]])
                logits = M.reference_logits(model, ids, None, s)[0, len(r["prompt"]) - 1:-1]
                ref = logits.index_fill(-1, banned, float("-inf")).log_softmax(-1)
                ref = ref.gather(-1, torch.tensor(r["response"])[:, None])[:, 0]
                assert (lp[j, :len(ref)] - ref).abs().max() <= 1e-5, (b, j)
