"""The vLLM rollout engine (mr_sp.vllm_*) against ours, on the CPU build of vLLM: same greedy tokens,
vLLM's log-probs of sampled tokens equal the trainer's (fp32), vision special tokens never sampled,
weight sync without reloading or stale caches, eval.py and a short GRPO run with --engine vllm.
Skipped where vllm does not import (the main environment).

    $(bash .ci/vllm_env | tail -1) -m pytest tests/test_vllm.py -q

Videos have several temporal groups and unequal seconds per group, one of them 31/14 s, where
float32 arithmetic puts the last group one temporal position off (model.positions): a position
mismatch between vLLM and the trainer shows in the log-probs, and the tests check that it would."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed here: run in the environment `bash .ci/vllm_env` builds")

import model as M  # noqa: E402
import mr_sp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (kind, grid in patches, seconds per temporal group): several temporal groups, unequal seconds per
# group (one at 31/14 s), an image, and a text-only prompt
SAMPLES = (("video", (8, 4, 4), 31 / 14), ("video", (6, 8, 8), 2.0), ("video", (4, 4, 6), 0.5),
           ("image", (1, 8, 8), 1.0), (None, (), 0.0))


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def setup(request, tmp_path_factory):
    """A tiny model of each family (head_dim 32, which vLLM's CPU attention supports), its saved
    folder, an engine on it, and prompts as mr_sp.prepare gives them (cached visual embeddings)."""
    model, tok = M.load(request.param)
    assert model.config.text_config.hidden_size // model.config.text_config.num_attention_heads == 32
    path = tmp_path_factory.mktemp("vllm") / "model"
    M.save(model, tok, str(path))
    llm = mr_sp.vllm_engine(model, tok, str(path))
    prompts = []
    for i, (kind, grid, spg) in enumerate(SAMPLES):
        x = M.random_samples(model, [grid], kind, seed=i)[0]
        if kind == "video":
            x.update(second_per_grid=spg, frame_times=[k * spg / 2 for k in range(2 * grid[0])])
        prompts.append(mr_sp.prepare(model, tok, x, f"Question {i}: which color flashes first?"))
    yield dict(name=request.param, model=model, tok=tok, llm=llm, prompts=prompts)
    del llm  # one engine at a time


def batch(s, spg=None):
    """The prompts; spg: other seconds per temporal group to tell vLLM."""
    return s["prompts"] if spg is None else [dict(p, second_per_grid=x) for p, x in zip(s["prompts"], spg)]


def ours(s, G=1, **gen):
    return mr_sp.rollout(s["model"], s["tok"], batch(s), G, **gen)


def theirs(s, G=1, spg=None, **gen):
    return mr_sp.rollout(s["model"], s["tok"], batch(s, spg), G, llm=s["llm"], **gen)


def trainer_logprobs(s, toks, lens, G, temperature=1.0):
    """mr_sp.logprobs of each returned response (the old-policy pass of grpo.py), masked (N, T)."""
    rows = [dict(s["prompts"][i // G], response=toks[i, :lens[i]].tolist()) for i in range(len(toks))]
    with torch.no_grad():
        lp, _, mask = mr_sp.logprobs(s["model"], s["tok"], rows, temperature=temperature)
    return lp, mask


def max_diff(a, b, mask):
    return ((a - b).abs() * mask).max().item()


def test_greedy_tokens_equal_our_engine(setup):
    t_ours, lp_ours, n_ours = ours(setup, G=2, max_new=24, temperature=0)
    t_vllm, lp_vllm, n_vllm = theirs(setup, G=2, max_new=24, temperature=0)
    assert torch.equal(n_ours, n_vllm) and torch.equal(t_ours, t_vllm)
    assert len(set(map(tuple, t_ours.tolist()))) == len(SAMPLES)  # prompts answer differently: not vacuous
    mask = (torch.arange(t_ours.shape[1]) < n_ours[:, None]).float()
    d = max_diff(lp_ours, lp_vllm, mask)
    print(f"greedy: {int(n_ours.sum())} tokens equal; log-prob max abs diff vs our engine {d:.2e}")
    assert d <= 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_trainer(setup, temperature):
    """vLLM's log-probs of the tokens it sampled (G = 4 per prompt) equal the trainer's log-prob pass."""
    G = 4
    toks, lp_vllm, lens = theirs(setup, G=G, max_new=32, temperature=temperature, seeds=[1, 2, 3, 4, 5])
    assert not torch.isin(toks, M.banned_ids(setup["tok"])).any()
    assert len(set(map(tuple, toks.tolist()))) > len(SAMPLES)  # samples of a prompt differ
    lp, mask = trainer_logprobs(setup, toks, lens, G, temperature)
    d = max_diff(lp, lp_vllm, mask)
    print(f"temperature {temperature}: {int(mask.sum())} sampled tokens, vLLM vs trainer log-prob max abs diff {d:.2e}")
    assert d <= 1e-4
    again = theirs(setup, G=G, max_new=32, temperature=temperature, seeds=[1, 2, 3, 4, 5])[0]
    assert torch.equal(toks, again)  # per-prompt seeds reproduce


def test_position_mismatch_would_be_caught(setup):
    """The same comparison fails when vLLM's positions are not the trainer's: vLLM told 1 s per
    temporal group (what it assumes when second_per_grid_ts is missing), and the trainer using float32
    positions for the 31/14 s video (one temporal position off on one group of 4 tokens).
    Qwen2.5-VL only: the other families have no seconds in their positions."""
    if setup["name"] != "tiny":
        pytest.skip("Qwen2-VL and Qwen3-VL positions do not depend on seconds per temporal group")
    seeds = [1, 2, 3, 4, 5]
    toks, lp_vllm, lens = theirs(setup, G=2, spg=(1.0,) * len(SAMPLES), max_new=16, temperature=1.0, seeds=seeds)
    lp, mask = trainer_logprobs(setup, toks, lens, 2)
    wrong_spg = max_diff(lp, lp_vllm, mask)
    toks, lp_vllm, lens = theirs(setup, G=2, max_new=16, temperature=1.0, seeds=seeds)
    p = setup["prompts"][0]
    p0, video = p["pos"].clone(), torch.tensor(p["prompt"]) == setup["model"].config.video_token_id
    p0[0, video] -= (p0[0, video] - p0[0, video].min() == 31).long()  # the float32 rule's 30 instead of 31
    lp, mask = trainer_logprobs(dict(setup, prompts=[dict(p, pos=p0)] + setup["prompts"][1:]), toks, lens, 2)
    off_by_one = max_diff(lp[:2], lp_vllm[:2], mask[:2])
    print(f"log-prob max abs diff with vLLM at 1 s per group: {wrong_spg:.2e}; float32 positions: {off_by_one:.2e}")
    assert wrong_spg > 1e-2 and off_by_one > 1e-4


def test_vision_special_tokens_never_sampled(setup):
    """Make vision special tokens the likeliest answers (their tied embedding rows 3x the row of a
    prompt's first greedy token): unmasked greedy emits them, vLLM (allowed_token_ids) does not and
    still equals our engine, and sampling at temperature 1 never draws them either."""
    s, tok = dict(setup, model=M.load(setup["name"])[0]), setup["tok"]
    vision = M.banned_ids(tok)
    first = ours(s, max_new=1, temperature=0)[0][0, 0]
    with torch.no_grad():
        emb = s["model"].get_input_embeddings().weight
        for t in ("<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"):
            emb[tok.convert_tokens_to_ids(t)] = 3 * emb[first]
        ids, pos, mask, _ = M.layout([p["prompt"] for p in s["prompts"]], [p["pos"] for p in s["prompts"]],
                                     pad_id=tok.pad_token_id)
        embeds = mr_sp.splice_columns(s["model"], ids, s["prompts"], 0, ids.shape[1])
        unmasked = M.generate(s["model"], embeds, pos, mask, max_new=24,
                              temperature=0, eos_ids=mr_sp.eos_ids(tok), pad_id=tok.pad_token_id)[0]
    assert torch.isin(unmasked, vision).any()  # without the ban, they would be emitted
    mr_sp.vllm_sync(s["llm"], s["model"])
    greedy = theirs(s, max_new=24, temperature=0)[0]
    sampled = theirs(s, G=8, max_new=24, temperature=1.0, seeds=[1, 2, 3, 4, 5])[0]
    mr_sp.vllm_sync(s["llm"], setup["model"])  # back to the module's weights
    assert torch.equal(greedy, ours(s, max_new=24, temperature=0)[0])
    assert not torch.isin(greedy, vision).any() and not torch.isin(sampled, vision).any()


def test_weight_sync_changes_generation_without_stale_cache(setup):
    """Perturb the policy, sync: vLLM's greedy tokens change and equal our engine's with the new
    weights, for the very prompts it has cached (prefix caching is on), and its log-probs equal the
    trainer's again."""
    s = dict(setup, model=M.load(setup["name"])[0])  # a copy: the module's model stays as the engine started
    assert s["llm"].llm_engine.vllm_config.cache_config.enable_prefix_caching
    before = theirs(s, max_new=24, temperature=0)[0]
    assert torch.equal(before, ours(s, max_new=24, temperature=0)[0])
    with torch.no_grad():
        for p in s["model"].model.language_model.layers[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    expect, _, n = ours(s, max_new=24, temperature=0)
    assert not torch.equal(expect, before)  # the change is visible in our engine
    # the check sees a stale cache: new weights without the prefix-cache reset reuse the prompts' KV
    # blocks computed with the old ones, and answer neither as before nor as expected
    weights = [(k, v) for k, v in s["model"].state_dict().items() if not k.startswith("model.visual.")]
    s["llm"].collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
    s["llm"].llm_engine.reset_encoder_cache()
    assert not torch.equal(theirs(s, max_new=24, temperature=0)[0], expect)
    mr_sp.vllm_sync(s["llm"], s["model"])
    after, lp_vllm, n_vllm = theirs(s, max_new=24, temperature=0)
    assert torch.equal(after, expect) and torch.equal(n, n_vllm)
    lp, mask = trainer_logprobs(s, after, n_vllm, 1)
    d = max_diff(lp, lp_vllm, mask)
    print(f"after sync: tokens equal our engine's with the new weights; log-prob max abs diff {d:.2e}")
    assert d <= 1e-4
    mr_sp.vllm_sync(s["llm"], setup["model"])  # back to the module's weights
    assert torch.equal(theirs(s, max_new=24, temperature=0)[0], before)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    import data as D
    d = tmp_path_factory.mktemp("task")
    D.synth(d, n=40, n_frames=16, seed=0, n_test=8)  # 8 of 16 frames at 8 fps: 0.5 s per temporal group
    return str(d)


def run(*args, nproc=1):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           **({"OMP_NUM_THREADS": "1"} if nproc > 1 else {})}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc > 1 else [])
    p = subprocess.run(launcher + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.parametrize("family", ["tiny", "tiny-qwen3-vl"])
def test_eval_engine_vllm_equals_own(task, tmp_path, family):
    """eval.py --engine vllm gives the own engine's greedy answers, through the real video path
    (Qwen3-VL: timestamps from the sampled frames' times, written by us, expanded by vLLM)."""
    run("model.py", "save", "--family", family, "--out", str(tmp_path / "model"))
    cmd = ["eval.py", "--model", str(tmp_path / "model"), "--data", task, "--frames", "8", "--limit", "6",
           "--max-new", "24"]
    run(*cmd, "--out", str(tmp_path / "own"))
    run(*cmd, "--out", str(tmp_path / "vllm"), "--engine", "vllm")
    own, vllm = [(tmp_path / e / "results.jsonl").read_text() for e in ("own", "vllm")]
    assert own == vllm and len(own.splitlines()) == 6


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["--fsdp"])])
def test_grpo_engine_vllm_tracks_own_engine(task, tmp_path, nproc, extra):
    """A short GRPO run with --engine vllm completes, its rewards climb as the own engine's do (same
    model, data, reward and seeds; the sampled tokens differ: vLLM has its own random streams), and at
    every step vLLM's log-probs of its samples equal the trainer's old-policy pass (the weights were
    synced). The reward, the share of "e" in the text, is one a random tiny policy learns in a few steps.
    Also under torchrun with --fsdp: an engine per rank (vLLM's SPMD mode), synced from the shards."""
    cmd = ["grpo.py", "--init", "tiny", "--data", task, "--frames", "8", "--prompts", "4", "--G", "4",
           "--max-new", "12", "--micro-batch", "16", "--part", "all", "--lr", "3e-3", "--kl-coef", "0",
           "--reward", "toy_rewards:letter_e", "--steps", "12", "--save-every", "0",
           "--no-dynamic-sampling"]  # the policy can collapse on this easy reward by step 11 (entropy 0.2,
    # every group flat): dynamic sampling would then read on and stop the run
    rewards, gaps = {}, {}
    for engine in ("own", "vllm"):
        run(*cmd, *extra, "--engine", engine, "--out", str(tmp_path / engine), nproc=nproc)
        m = [json.loads(line) for line in open(tmp_path / engine / "metrics.jsonl")]
        rewards[engine], gaps[engine] = [x["reward"] for x in m], max(x["rollout_logprob_gap"] for x in m)
    print(json.dumps({"rewards": {k: [round(r, 3) for r in v] for k, v in rewards.items()}, "max_logprob_gap": gaps}))
    for engine, r in rewards.items():
        assert len(r) == 12 and sum(r[-4:]) / 4 > 1.5 * sum(r[:4]) / 4
        assert gaps[engine] <= 1e-4  # every step's rollouts came from the current policy: the sync worked


def test_qwen35_greedy_tokens_equal_ours_in_bf16(tmp_path):
    """Qwen3.5 (Gated DeltaNet layers), which vLLM's CPU build runs in bf16 at its releases' head dim
    128 only, fed our cached embeddings: greedy tokens as our engine's in bf16 on every SAMPLES prompt
    (several temporal groups, an image, text) up to the first step where the fp32 model (the same
    weights) has a near tie, and vLLM's log-probs within TOL of fp32's before it. Both engines round
    to bf16 their own way (on an AVX512-BF16 CPU ours is up to 0.14 from fp32 where vLLM is 0.05; on
    AMX, 0.1), so a tie is a top-two gap under 2 * TOL: each side's error may take half of it."""
    TOL = 0.1
    model, tok = M.load("tiny-qwen3.5", hidden=256, heads=2, kv_heads=1, dtype=torch.bfloat16)
    m32 = copy.deepcopy(model).float()
    M.save(model, tok, str(tmp_path / "model"))
    s = dict(model=model, tok=tok, llm=mr_sp.vllm_engine(model, tok, str(tmp_path / "model"), "bfloat16"))
    s["prompts"] = []
    for i, (kind, grid, spg) in enumerate(SAMPLES):
        x = M.random_samples(model, [grid], kind, seed=i)[0]
        if kind == "video":
            x.update(second_per_grid=spg, frame_times=[k * spg / 2 for k in range(2 * grid[0])])
        s["prompts"].append(mr_sp.prepare(model, tok, x, f"Question {i}: which color flashes first?"))
    (t_ours, _, n_ours), (t_vllm, lp_vllm, n_vllm) = ours(s, max_new=12, temperature=0), theirs(
        s, max_new=12, temperature=0)
    compared = 0
    for i, p in enumerate(s["prompts"]):
        o, v = t_ours[i, :n_ours[i]].tolist(), t_vllm[i, :n_vllm[i]].tolist()
        ids, pos, _, P = M.layout([p["prompt"]], [p["pos"]], [o], tok.pad_token_id)
        with torch.no_grad():  # fp32 log-probs at every step of our greedy response
            h = M.forward(m32, mr_sp.splice_columns(m32, ids, [p], 0, ids.shape[1]), pos)
            lp = torch.log_softmax(m32.lm_head(h[0, P - 1:P - 1 + len(o)]), -1)
        top, lp32 = lp.topk(2).values, lp.gather(1, torch.tensor(o)[:, None])[:, 0]
        same = next((j for j, (a, b) in enumerate(zip(o, v)) if a != b), min(len(o), len(v)))
        assert same == len(o) == len(v) or top[same, 0] - top[same, 1] < 2 * TOL, (i, o, v, top[same])
        assert ((lp32[:same] - lp_vllm[i, :same]).abs() <= TOL).all(), (i, lp32, lp_vllm[i])
        compared += same
    print(f"Qwen3.5 greedy in bf16: {compared} of our {int(n_ours.sum())} tokens equal before a near tie or the end")
    assert compared >= 4 * len(SAMPLES), compared  # not vacuous: most prompts agree for several tokens
