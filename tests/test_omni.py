"""Qwen2.5-Omni's thinker through the RL path: a prompt's sound encoded once (mr_sp.prepare) and
spliced into the rollout engine's prefill and the trainer's passes, as its video is; against the
thinker's own forward from log-mels (transformers), and with 2 SP ranks against one process.

    python -m pytest tests/test_omni.py -q

The SP workers are this file under torchrun; rank 0 writes what they measured as JSON:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_omni.py OUT.json"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the torchrun command runs this file from tests/
import data as D  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
import mr_sp  # noqa: E402

# (grid, seconds of sound, seconds a temporal group) of videos with their sound: a group a chunk; a
# group leaping two chunks, sound longer than the video. 3.1 s: 2 audio windows (200 + 110 mel
# frames); 7.3 s: 4.
SOUND = [((4, 8, 8), 3.1, 2.0), ((2, 4, 6), 7.3, 4.0)]


def sound_samples(model):
    """Videos with their sound, and a clip of sound alone (1.3 s: one window), of random values."""
    videos = M.random_samples(model, [g for g, _, _ in SOUND], second_per_grid=[x for _, _, x in SOUND])
    out = [dict(s, **M.random_audio(x[1], seed=10 + i)) for i, (s, x) in enumerate(zip(videos, SOUND))]
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
    G, seeds = 4, [mr_sp.seed_of(0, i) for i in range(len(prompts))]
    toks, lps, lens = mr_sp.rollout(model, tok, prompts, G, seeds, max_new=24, temperature=1.0)
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
    """The log-prob pass (mr_sp.logprobs) scores the engine's samples of videos with their
    sound, and of sound alone, as the engine did: a prompt's rows packed (its prompt once), or all rows side by side (left
    padding). And the sound is heard: the other prompt's sound in its place moves them by > 0.01."""
    model, tok = omni
    prompts, rows, lps, lens, G = rollout_rows
    pad = lambda x: torch.nn.functional.pad(x, (0, lps.shape[1] - x.shape[1]))  # noqa: E731
    with torch.no_grad():
        got = ([mr_sp.logprobs(model, tok, rows[b * G:(b + 1) * G]) for b in range(len(prompts))]
               if packed else [mr_sp.logprobs(model, tok, rows, packed=False)])
        lp, mask = (torch.cat([pad(x[k]) for x in got]) for k in (0, 2))
        assert mask.sum(1).tolist() == lens.tolist() and mask.sum() > len(rows)
        assert (lp - lps)[mask.bool()].abs().max() <= 1e-5
        # the 7.3 s clip's embeddings where the 3.1 s clip's were (its first 77): another sound
        swapped = [dict(r, audio=prompts[1]["audio"][:77]) for r in rows[:G]]
        other = mr_sp.logprobs(model, tok, swapped, packed=packed)[0]
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
            lp, _, mask = mr_sp.logprobs(model, tok, mine)
            for j, r in enumerate(mine):
                ids = torch.tensor([r["prompt"] + r["response"]])
                logits = M.reference_logits(model, ids, None, s)[0, len(r["prompt"]) - 1:-1]
                ref = logits.index_fill(-1, banned, float("-inf")).log_softmax(-1)
                ref = ref.gather(-1, torch.tensor(r["response"])[:, None])[:, 0]
                assert (lp[j, :len(ref)] - ref).abs().max() <= 1e-5, (b, j)


def gathered(rows, group):
    """The rows with their whole visual and audio embeddings, as one process holds them."""
    return [dict(r, visual=mr_sp.gather_visual(r["visual"], r["shares"], group), shares=None,
                 audio=mr_sp.gather_visual(r["audio"], r["audio_shares"], group), audio_shares=None)
            for r in rows]


def worker(out):
    """sp 2 against one process on the tiny thinker: each rank's share of a clip's audio windows,
    gathered, against the whole clip's encode; log-probs, entropies and summed gradients; an SP
    rollout against one process's, and both against the trainer's scores."""
    from test_mr_sp import logprobs_and_grads, max_diff
    par = mr_sp.init_parallel(2)
    group, res = par.sp_group, {}
    model, tok = M.load("tiny-qwen2.5-omni")
    grpo.rl_params(model)
    samples = sound_samples(model)
    res["encode"] = []
    for s in samples:
        whole, mine = mr_sp.encode_audio(model, s), mr_sp.encode_audio(model, s, group)
        shares = mr_sp.audio_shares_of(model.config, s["input_features"].shape[-1], 2)
        two = mr_sp.gather_visual(mine, shares, group)
        res["encode"].append(dict(diff=max_diff(whole, two), equal=torch.equal(whole, two),
                                  shape=list(two.shape), held=[len(mine), shares[par.rank]]))
    # the same rows prepared by one process (the whole clip encoded) and by the group (its shares)
    rows, one_prompt = {}, {}
    for key, grp in (("one", None), ("two", group)):
        g = torch.Generator().manual_seed(1)
        prompts = [mr_sp.prepare(model, tok, s, f"Question {i}?", grp) for i, s in enumerate(samples)]
        prompts.append(mr_sp.prepare(model, tok, dict(kind=None), "Say something.", grp))
        rows[key] = [dict(p, response=torch.randint(20, 500, (n,), generator=g).tolist())
                     for p, n in zip(prompts, (5, 60, 9, 3))]
        one_prompt[key] = [dict(prompts[0], response=torch.randint(20, 500, (n,), generator=g).tolist())
                           for n in (5, 9, 1, 7)]
    res["cases"] = []
    for case, packed in ((rows, False), (one_prompt, True)):
        lp2, ent2, _, g2 = logprobs_and_grads(model, tok, case["two"], group, packed=packed)
        lp1, ent1, mask, g1 = logprobs_and_grads(model, tok, case["one"], None, packed=False)
        v = mask.bool()
        res["cases"].append(dict(logprob=max_diff(lp1[v], lp2[v]), entropy=max_diff(ent1[v], ent2[v]),
                                 grad=max(max_diff(g1[k], g2[k]) for k in g1), tokens=int(v.sum()),
                                 grad_scale=max(g1[k].abs().max().item() for k in g1)))
    # G = 4 a prompt, 2 a peer; the trainer (one process) scores the SP samples as it scores its own
    kw = dict(seeds=[5, 6, 7, 8], max_new=12, temperature=1.0, top_p=0.9)
    one = mr_sp.rollout(model, tok, rows["one"], 4, **kw)
    two = mr_sp.rollout(model, tok, rows["two"], 4, sp_group=group, **kw)
    with torch.no_grad():
        scored = [dict(p, response=one[0][j, :one[2][j]].tolist()) for j, p in
                  enumerate(p for p in rows["one"] for _ in range(4))]
        lp, _, m = mr_sp.logprobs(model, tok, scored, packed=False)
    m = m.bool()
    res["rollout"] = dict(tokens=torch.equal(one[0], two[0]) and torch.equal(one[2], two[2]),
                          engines=max_diff(one[1], two[1]), distinct=len({tuple(t.tolist()) for t in one[0]}),
                          trainer_one=max_diff(lp[m], one[1][:, :lp.shape[1]][m]),
                          trainer_two=max_diff(lp[m], two[1][:, :lp.shape[1]][m]))
    if par.rank == 0:
        Path(out).write_text(json.dumps(res))
    mr_sp.shutdown()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("omni") / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"workers failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_sp_shares_of_the_audio_windows_encode_as_the_whole_clip(measured):
    """3.1 s (windows 200 + 110 frames: 50 + 27 tokens), 7.3 s (4 windows: 2 a rank), 1.3 s (one
    window: rank 1 holds none); gathered, the whole clip's embeddings."""
    assert [e["shape"][0] for e in measured["encode"]] == [77, 182, 32]
    assert [e["held"] for e in measured["encode"]] == [[50, 50], [100, 100], [32, 32]]  # rank 0's
    # bitwise where a rank's windows are batched as in the whole clip's encode; the 3.1 s clip's
    # 110-frame window runs alone on rank 1, padded to 200 beside a full one in the whole: fp32's
    # rounding of other shapes (2.7e-6 seen)
    e = measured["encode"]
    assert e[1]["equal"] and e[2]["equal"] and e[0]["diff"] <= 1e-5, e


def test_sp_logprobs_and_gradients_with_sound_equal_one_process(measured):
    """Rows prepared over the group (each rank encoding its shares) against the same rows prepared
    by one process (whole clips): rows of videos with their sound, sound alone and text side by side
    (left padding), and one prompt's rows packed."""
    for c in measured["cases"]:
        assert c["tokens"] > 10 and c["grad_scale"] > 1e-3
        assert c["logprob"] <= 1e-5 and c["entropy"] <= 1e-5 and c["grad"] <= 1e-5, c


def test_sp_rollout_with_sound_equals_one_process(measured):
    """Each peer prefills its columns (its share of the sound fetched) and samples 2 of each prompt's
    4: the tokens one process samples; the log-probs within fp32 rounding of its, and of the
    trainer's scores of them (one process's engine is as far from those: 7e-6 seen)."""
    r = measured["rollout"]
    assert r["tokens"] and r["distinct"] > 8, r
    assert r["engines"] <= 1e-5 and r["trainer_two"] <= 1e-5 and r["trainer_one"] <= 1e-5, r


@pytest.fixture(scope="module")
def sound_task(tmp_path_factory):
    """The synthetic sound task (4 s clips with a soundtrack), every third row of sound alone (its
    video's track, no video), in train and test."""
    d = tmp_path_factory.mktemp("sound")
    D.synth(d, n=24, n_frames=32, seed=0, n_test=6, family="sound")
    for split in ("train", "test"):
        rows = [json.loads(r) for r in (d / f"{split}.jsonl").read_text().splitlines()]
        for r in rows[1::3]:
            r["audio"] = r.pop("video")
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_eval_controls_silence_the_sound_or_gray_the_frames(omni, sound_task, monkeypatch):
    """eval.py's prompts as its rollouts get them: --mute, silence as long as each clip (every video's
    4 s the same embeddings; the frames' untouched); --blind, mid-gray frames (every video the same
    embeddings; the sound untouched; sound alone taken as it is)."""
    import eval as E
    model, tok = omni
    rows, seen, rollout = D.load_rows(sound_task / "test.jsonl"), {}, mr_sp.rollout
    monkeypatch.setattr(mr_sp, "rollout", lambda m, t, prompts, *a, **kw: (
        seen[key].extend(prompts), rollout(m, t, prompts, *a, **kw))[1])
    par = mr_sp.Parallel(0, 1, 0, 1, 1, None, torch.device("cpu"))
    for key in ("plain", "mute", "blind"):
        seen[key] = []
        args = E.ap.parse_args(["--max-new", "4"] + ([f"--{key}"] if key != "plain" else []))
        out, bad = E.evaluate(model, tok, rows, 8, args, par)
        assert len(out) == len(rows) == 6 and not bad
    plain, mute, blind = seen["plain"], seen["mute"], seen["blind"]
    assert [p["visual"] is None for p in plain] == [i % 3 == 1 for i in range(6)]
    same = lambda ps, k: all(torch.equal(p[k], ps[0][k]) for p in ps if p[k] is not None)  # noqa: E731
    videos = lambda ps: [p for p in ps if p["visual"] is not None]  # noqa: E731  (4 s of sound each)
    assert same(videos(mute), "audio") and not same(videos(plain), "audio")
    assert same(blind, "visual") and not same(plain, "visual")
    for a, b, c in zip(plain, mute, blind):
        assert a["visual"] is None or torch.equal(a["visual"], b["visual"])
        assert torch.equal(a["audio"], c["audio"])


def test_scripts_train_and_evaluate_on_sound(sound_task, tmp_path):
    """sft.py --init tiny-qwen2.5-omni, grpo.py from its checkpoint (one process, and --sp 2 --fsdp on
    2: the same weights) and eval.py with its controls, on videos with their sound and sound alone."""
    from test_pipeline import run, sft_then_grpo_one_and_sp
    sft_then_grpo_one_and_sp("tiny-qwen2.5-omni", sound_task, tmp_path, "--val", "4")
    for control in ([], ["--mute"], ["--blind"]):
        out = run("eval.py", "--model", str(tmp_path / "one" / "model"), "--data", str(sound_task),
                  "--frames", "8", "--max-new", "8", "--out", str(tmp_path / "eval"), *control)
        s = json.loads(out.stdout.strip().splitlines()[-1])
        assert s["n_questions"] == 6 and s["bad_samples"] == 0 and s["mute"] == (control == ["--mute"]), s


def test_engine_vllm_refuses_the_thinker(omni):
    """vLLM 0.32 takes Qwen2.5-Omni's sound only as log-mels it encodes itself, not the cached
    embeddings the trainer splices: --engine vllm stops at start (before importing vLLM) and says so."""
    model, tok = omni
    with pytest.raises(SystemExit, match="no cached audio embeddings.*use --engine own"):
        mr_sp.vllm_engine(model, tok, "unused")


if __name__ == "__main__":
    worker(sys.argv[1])
