"""The run's plan (mr_sp.plan_run): `python mr_sp.py plan` prints what the scripts plan for the same
flags, picks a layout that runs, and a run over its GPU's memory stops before loading anything with
flags that fit. (That the scripts print the plan and write plan.json: tests/test_pipeline.py.)
Run: python -m pytest tests/test_plan.py -q"""
import json
import types
import weakref

import pytest
import torch

import grpo
import model as M
import mr_sp
import sft

GIB = 2**30


def cli(capsys, *argv):
    """`python mr_sp.py plan ...`'s plan: the JSON of its last line."""
    mr_sp.plan_main(["plan", *argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_cli_mirrors_grpo_flags():
    """Every flag of `mr_sp.py plan` that grpo.py has too has its default, but the two a long-video
    run sets (--dtype bfloat16, --max-new 1024), --frames (required) and --sp (chosen with --world)."""
    ours = {a.dest: a.default for a in mr_sp.plan_parser()._actions}
    theirs = {a.dest: a.default for a in grpo.ap._actions}
    shared = ours.keys() & theirs.keys() - {"help"}
    assert {"micro_batch", "activation_checkpointing", "prompts", "kl_coef", "engine"} <= shared
    long_video = dict(dtype="bfloat16", max_new=1024, frames=None, sp=None)
    assert {k: ours[k] for k in shared} == {**{k: theirs[k] for k in shared}, **long_video}


LONG = ["--frames", "3600", "--sp", "8", "--fsdp", "--dtype", "bfloat16", "--max-new", "1024"]


@pytest.mark.parametrize("flags,world,config,cli_flags", [
    ([], 1, "tiny", ["--frames", "32", "--dtype", "float32", "--max-new", "128"]),  # grpo.py's defaults
    (LONG, 8, "qwen2.5-vl-7b", LONG[:5]),  # the README's command
])
def test_the_cli_prints_what_grpo_plans(capsys, flags, world, config, cli_flags):
    """grpo.py's parsed arguments, planned as grpo.py plans them at start, are the plan `mr_sp.py
    plan` prints for the same settings (its JSON line), on the same 79 GiB; unset flags resolved:
    checkpointing off where the step fits without it, on where it must be."""
    args = grpo.ap.parse_args(["--init", "tiny", *flags])
    want = mr_sp.plan_run(args, mr_sp.plan_config(config), world, 79 * GIB)
    got = cli(capsys, "--config", config, *cli_flags)
    assert got == json.loads(json.dumps(want)) and got["fits"]
    assert got["activation_checkpointing"] is (config != "tiny") and got["world"] == world
    # a micro-batch of one prompt's 8 rows is one packed sequence of P + 8 x 1,024 tokens (the 7B:
    # 239,680, about one row's); --no-shared-prefix: 231,488-token rows, one a pass
    assert got["micro_batch"] == 16 and got["rows"] == 1
    if config != "tiny":
        assert cli(capsys, "--config", config, *cli_flags, "--no-shared-prefix")["micro_batch"] == 1


def test_world_8_picks_the_most_data_parallel_layout_that_runs(capsys):
    """Qwen2.5-VL-7B at 3,600 frames on 8 ranks of 76 GiB: the layout chosen fits with the allowance,
    every layout with more data parallelism (less sp) does not, and the most frames that fit there
    pass the paper's 3,600; at sp 8 (the layout --world 8 picks for 8,192 frames) they pass 8,192:
    no rank holds a whole video's embeddings or prompt cache (mr_sp.encode_visual, sp_prefill)."""
    p = cli(capsys, "--frames", "3600", "--fsdp", "--world", "8", "--gpu-gb", "76")
    assert p["sp"] in (1, 2, 4, 8) and p["dp"] * p["sp"] == 8 and p["fits"]
    assert p["gib"]["total"] <= 76 and p["gib"]["allowance"] > 1
    cfg, args = mr_sp.plan_config("qwen2.5-vl-7b"), mr_sp.plan_parser().parse_args(
        ["plan", "--frames", "3600", "--fsdp"])
    for sp in (k for k in (1, 2, 4) if k < p["sp"]):
        args.sp = sp
        assert not mr_sp.plan_run(args, cfg, 8, 76 * GIB)["fits"]
    assert p["max_frames"] >= 3600
    p = cli(capsys, "--frames", "8192", "--fsdp", "--world", "8", "--gpu-gb", "76")
    assert p["sp"] == 8 and p["fits"] and p["gib"]["total"] <= 76 and p["max_frames"] >= 8192
    with pytest.raises(SystemExit, match="--prompts 8 must be divisible by the data-parallel size"):
        cli(capsys, "--frames", "3600", "--world", "16", "--sp", "1")


def fitting_runs(msg, base, config, world):
    """The runs a stop message names, each checked to fit when planned again."""
    runs = msg.split("runs that fit: ")[1].split(" | ")
    for run in runs:  # "--sp 4", or "8 ranks: --fsdp --sp 4"
        w = int(run.split(" ranks:")[0]) if " ranks:" in run else world
        args = grpo.ap.parse_args(base + run.split(":")[-1].split())
        assert mr_sp.plan_run(args, config, w, 80 * 10**9)["fits"], run
    return runs


def test_a_run_over_its_gpu_stops_with_flags_that_fit(tmp_path, monkeypatch, capsys):
    """grpo.py on a (simulated) 80 GB GPU: a plan over the GPU's memory stops it before any weights
    load (Qwen2.5-VL-3B's config alone), printing the plan and naming runs that fit, each of which
    does when planned again; on 8 ranks the nearest flags for the 7B (--sp, fewer --frames). sft.py's
    mixed micro-batches (left padding: (L, L) masks) are told --micro-batch 1."""
    folder = tmp_path / "qwen3b"
    mr_sp.plan_config("qwen2.5-vl-3b").save_pretrained(folder)  # a config, no weights
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=80 * 10**9))
    base = ["--init", str(folder), "--frames", "512", "--dtype", "bfloat16", "--max-new", "1024",
            "--out", str(tmp_path / "run"), "--micro-batch", "8", "--no-activation-checkpointing"]
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo.ap.parse_args(base))
    msg = str(e.value.code)
    assert msg.startswith("the plan needs") and "over this GPU's 74.5" in msg, msg
    assert capsys.readouterr().out.startswith("plan | qwen2_5_vl")
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["fits"] is False
    assert fitting_runs(msg, base, mr_sp.plan_config(str(folder)), 1)  # more ranks: a 3B's state
    # 8 ranks (what torchrun would give): the 7B at 3,600 frames, sharded and checkpointed, at sp 2
    base = ["--init", "7b", "--frames", "3600", "--dtype", "bfloat16", "--max-new", "1024", "--fsdp",
            "--activation-checkpointing", "--out", str(tmp_path / "run8")]
    cfg = mr_sp.plan_config("qwen2.5-vl-7b")
    par = mr_sp.Parallel(0, 8, 0, 4, 2, None, torch.device("cuda"))  # rank 0 of dp 4 x sp 2
    with pytest.raises(SystemExit) as e:
        mr_sp.plan_start(grpo.ap.parse_args(base + ["--sp", "2"]), cfg, par)
    runs = fitting_runs(str(e.value.code), base + ["--sp", "2"], cfg, 8)
    assert "--sp 4" in runs and any(r.startswith("--frames") for r in runs), runs
    # sft.py: 1,024 frames of the 7B over 8 ranks, 4 samples a micro-batch, sp 1: their masks
    args = sft.ap.parse_args(["--init", "7b", "--frames", "1024", "--dtype", "bfloat16", "--fsdp",
                              "--micro-batch", "4", "--batch", "32"])
    p = mr_sp.plan_run(args, mr_sp.plan_config("qwen2.5-vl-7b"), 8, 80 * 10**9)
    assert not p["fits"] and "--micro-batch 1" in p["advice"], p["advice"]


def test_the_plan_counts_the_sound_and_the_audio_tower(capsys):
    """Qwen2.5-Omni's thinker (the tiny one, its config built with its own tokenizer): 40 s of sound a
    video are 1,000 tokens in every row, the audio tower's weights are held beside the vision
    tower's (frozen: not trained in RL), and at sp 2 a rank encodes and holds its share of the 20
    windows of 2 s (10); `mr_sp.py plan --audio-seconds` prints the same plan."""
    cfg = mr_sp.plan_config("tiny-qwen2.5-omni")
    assert cfg.audio_token_id == M.tiny_tokenizer(omni=True).convert_tokens_to_ids("<|AUDIO|>")
    model = M.load("tiny-qwen2.5-omni")[0]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    c = mr_sp.model_costs(cfg)
    assert (c["audio"], c["vision"]) == (n(model.audio_tower), n(model.visual)) and c["audio"] > 0
    trained = sum(p.numel() for p in grpo.rl_params(model))
    assert c["trainable"] == n(model) - c["audio"] - c["vision"] == trained
    kw = dict(max_pixels=56 * 56, dtype="float32", G=4, max_new=64)
    one, two, silent = (mr_sp.plan(cfg, 64, sp, audio_seconds=a, **kw)
                        for sp, a in ((1, 40), (2, 40), (1, 0)))
    assert one["audio_tokens"] == 1000 and one["tokens"] == silent["tokens"] + 1000 == two["tokens"]
    assert one["weights"] == 4 * n(model) and one["audio_embeds"] == 4 * 1000 * cfg.text_config.hidden_size
    assert two["audio_embeds"] == one["audio_embeds"] / 2 and silent["audio_embeds"] == 0
    for k in ("encode", "rollout", "no_grad_pass", "training_pass", "peak"):
        assert one[k] > silent[k] and two[k] < one[k], k
    got = cli(capsys, "--config", "tiny-qwen2.5-omni", "--frames", "64", "--audio-seconds", "40", "--sp", "2",
              "--dtype", "float32", "--max-pixels", str(56 * 56))
    assert got["audio_tokens"] == 1000 and got["gib"]["audio_embeds"] > 0


def test_gpu_check_runs_at_a_miniature_on_cpu():
    """`bench.py gpu` (the prepared GPU check: Qwen2.5-VL-7B's widths, a few layers, one rank's share
    of the 3,600-frame sp-8 job) is the same code at the 7B's miniature on CPU: two GRPO steps, each
    phase's peak next to its plan, the attention kernel every phase ran, the training pass's and the
    rollout's tokens/s."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "bench.py", "gpu", "--device", "cpu", "--config", "tiny:qwen2.5-vl-7b",
                        "--layers", "2", "--frames", "64", "--sp", "1", "--G", "2", "--max-new", "8", "--size", "56"],
                       cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    phases = ["encode", "rollout", "old", "ref", "update"]
    assert sorted(r["peak_gb"]) == sorted(r["planned_gb"]) == sorted(phases)
    assert all(r["peak_gb"][k] > 0 and r["planned_gb"][k] > 0 for k in phases)
    assert all(any("scaled_dot_product" in op for op in r["kernels"][k]) for k in phases), r["kernels"]
    assert any("backward" in op for op in r["kernels"]["update"]) and r["train_tok_s"] > 0 < r["rollout_tok_s"]
    assert r["tokens"] > 64 and r["step_s"] > 0


def test_sft_plans_its_validation_with_the_model_gathered():
    """sft.py validates in `unsharded`: under --fsdp every rank gathers the whole model (Qwen2.5-VL-7B
    in fp32: 31 GiB) beside its shards. Planned, a 7B SFT on 8 x 48 GiB that trains within its shards
    is over by validation and told --val 0 (which fits when planned again); in bf16 it gathers half;
    without FSDP there is nothing to gather."""
    cfg = mr_sp.plan_config("qwen2.5-vl-7b")
    whole = mr_sp.model_costs(cfg)["params"]
    base = ["--init", "7b", "--frames", "64", "--fsdp", "--batch", "64"]
    p = mr_sp.plan_run(sft.ap.parse_args(base), cfg, 8, 48 * 2**30)
    g = p["gib"]
    assert g["validation"] * 2**30 > 4 * whole and g["validation"] > g["training_pass"], g
    assert not p["fits"] and "--val 0" in p["advice"], (p["advice"], g)
    assert mr_sp.plan_run(sft.ap.parse_args(base + ["--val", "0"]), cfg, 8, 48 * 2**30)["fits"]
    g16 = mr_sp.plan_run(sft.ap.parse_args(base + ["--dtype", "bfloat16"]), cfg, 8)["gib"]
    assert 2 * whole < g16["validation"] * 2**30 < 4 * whole, g16
    g1 = mr_sp.plan_run(sft.ap.parse_args(base[:-3] + ["--batch", "8"]), cfg, 1)["gib"]
    assert 0 < g1["validation"] < g1["weights"], g1


def saved_a_token(name, bf16, L, **kw):
    """Bytes autograd saves in each decoder layer of a tiny model's training forward on our path
    (M.forward, fp32 weights, bf16 under autocast as the scripts run it), each storage once, the
    parameters aside, divided by the L tokens; and the model's text config."""
    model, _ = M.load(name, **kw)
    layers, params = model.model.language_model.layers, {p.untyped_storage().data_ptr() for p in model.parameters()}
    at, packed, seen, saved = [None], [], set(), [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: at.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: at.__setitem__(0, None))

    def pack(t):
        if at[0] is not None:
            packed.append((at[0], weakref.ref(t)))
        return t
    x = torch.randn(1, L, model.config.text_config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=bf16, cache_enabled=False):
        out = M.forward(model, x, torch.arange(L).expand(3, 1, L))
    # counted once the forward is done, while its graph holds what backward will use: a tensor saved
    # by a node the forward dropped is freed by then, and its address may have been reused (counted
    # at pack time, by address, such a reuse hid a later tensor: the sums varied from run to run)
    for i, ref in packed:
        t = ref()
        key = t is not None and t.untyped_storage().data_ptr()
        if t is not None and key not in params | seen:
            seen.add(key)
            saved[i] += t.untyped_storage().nbytes()
    del out
    return [s / L for s in saved], model.config.text_config


@pytest.mark.parametrize("name,kw", [("tiny", {}), ("tiny-qwen3.5", {}), ("tiny:qwen3.5-9b", {}),
                                     ("tiny-qwen3.5", dict(hidden=256, heads=2, kv_heads=1))],
                         ids=["qwen2.5", "qwen3.5", "qwen3.5-9b-heads", "qwen3.5-head-dim-128"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_planned_saved_bytes_are_what_autograd_saves(name, kw, bf16):
    """mr_sp.saved_bytes, the training pass's bytes a token a layer, against autograd's saved tensors
    counted by hooks (per token: 512 tokens' less 256 tokens', which leaves what a layer saves once):
    attention layers (Qwen2.5-VL's; Qwen3.5's gated) and Gated DeltaNet layers, whose PyTorch delta
    rule saves fp32 chunk intermediates and a state a chunk (large at the releases' head dim 128)
    in either dtype; within 5%."""
    (short, t), (long, _) = saved_a_token(name, bf16, 256, **kw), saved_a_token(name, bf16, 512, **kw)
    got = [2 * b - a for a, b in zip(short, long)]
    att, gdn = mr_sp.saved_bytes(t, 2 if bf16 else 4)
    want = [gdn if kind == "linear_attention" else att
            for kind in (getattr(t, "layer_types", None) or ["full_attention"] * len(got))]
    assert all(abs(w / g - 1) < 0.05 for w, g in zip(want, got)), (want, got)
