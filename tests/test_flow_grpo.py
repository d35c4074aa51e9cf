"""Flow-GRPO's sampler against its naive references (image and video models), Ulysses at sp 2
against one process, and the script's resume and faults.

    python -m pytest tests/test_flow_grpo.py -q

The sp test's workers are this file under torchrun; rank 0 saves what they computed:
    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/test_flow_grpo.py OUT.pt"""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the torchrun command runs this file from tests/
pytest.importorskip("diffusers", reason="flow_grpo.py needs diffusers (requirements.txt)")
import flow_grpo as F  # noqa: E402
import mr_sp  # noqa: E402

INITS = ("tiny-sd3", "tiny-wan")


@pytest.fixture(scope="module")
def pipes():
    return {name: F.load(name) for name in INITS}


def args_of(*extra):
    return F.ap.parse_args(["--denoise", "4", "--G", "3", *extra])


@pytest.mark.parametrize("init", INITS)
def test_ode_limit_equals_diffusers_euler_step(pipes, init):
    """Noise level 0: every SDE step is FlowMatchEulerDiscreteScheduler.step, the whole trajectory
    too (the tiny transformer's velocities; a video's latents (C, t, h, w) as an image's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = pipes[init]
    sch = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = 6
    sch.set_timesteps(steps)
    emb = F.embed(pipe, ["a red square on the left"], args_of())
    traj, _, sig = F.sample(pipe, emb, [7], steps, 0.0, 1.0, F.latent_shape(pipe, args_of()))
    x = traj[:, 0]
    worst = 0.0
    for k, t in enumerate(sch.timesteps):
        v = F.velocity(pipe.transformer, x, sig[k].expand(1), emb, 1.0).detach()
        ref = sch.step(v, t, x).prev_sample
        ours = F.sde_step(v, x, sig[k].expand(1), sig[k + 1].expand(1), 0.0, float(sig[1]),
                          noise=torch.randn_like(x))[0]
        worst = max(worst, float((ours - ref).abs().max()),
                    float((traj[:, k + 1] - ref).abs().max()))
        x = ref
    print(f"max abs diff, SDE at noise 0 vs diffusers' Euler step: {worst:.1e}")
    assert worst <= 1e-6


def test_logprob_equals_normal_density():
    """The step's log-prob is the mean over elements of log N(x'; mean, std^2), as
    torch.distributions evaluates it, at sigma 1 (the s_1 stand-in) and below."""
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    s, s_next = torch.tensor([1.0, 0.8, 0.3]), torch.tensor([0.9, 0.5, 0.0])
    x_next, lp, mean, std = F.sde_step(v, x, s, s_next, 0.7, 0.9, noise=torch.randn_like(x))
    direct = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x_next)
    direct = direct.mean((1, 2, 3))
    assert float((lp - direct).abs().max()) <= 1e-5
    # the variance Flow-GRPO states: std_t^2 (-dt), std_t = a sqrt(s / (1 - s)), 1 - s_1 at s = 1
    std_t = 0.7 * torch.tensor([math.sqrt(1 / 0.1), math.sqrt(0.8 / 0.2), math.sqrt(0.3 / 0.7)])
    assert torch.allclose(std, std_t * (s - s_next).sqrt(), atol=1e-6)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_trainer_logprobs_equal_the_samplers(pipes, init, cfg):
    """The trainer's recomputed log-probs of a prompt's stored transitions (a random subset of steps
    a sample, as --train-steps draws) equal the sampler's within 1e-5 in fp32, with and without
    classifier-free guidance, for images and videos."""
    pipe, args = pipes[init], args_of("--cfg", str(cfg), "--train-steps", "2")
    emb = F.embed(pipe, ["a blue blob on the right"], args)
    traj, lps, sig = F.sample(pipe, F.repeat(emb, args.G), [1, 2, 3], args.denoise,
                              args.noise_level, cfg, F.latent_shape(pipe, args))
    rows = [dict(traj=traj[j], steps=steps) for j, steps in enumerate([[0, 3], [1, 2], [0, 1]])]
    lp, _, _ = F.step_logprobs(pipe.transformer, rows, emb, args, sig)
    old = torch.stack([lps[j, x["steps"]] for j, x in enumerate(rows)])
    assert float((lp - old).abs().max()) <= 1e-5


@pytest.mark.parametrize("init", INITS)
def test_tiny_folder_round_trip(pipes, init, tmp_path):
    """A saved tiny pipeline loads by path (the route a real SD3.5 or Wan 2.1 folder takes) with
    the same embeddings, velocities and decoded pixels."""
    pipe = pipes[init]
    pipe.save_pretrained(tmp_path / "p")
    back = F.load(str(tmp_path / "p"))
    assert type(back) is type(pipe)
    args = args_of()
    a, b = F.embed(pipe, ["a green glow"], args), F.embed(back, ["a green glow"], args)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, *F.latent_shape(pipe, args))
    assert torch.equal(F.decode(pipe, x), F.decode(back, x))
    with torch.no_grad():
        va = F.velocity(pipe.transformer, x, torch.tensor([0.5]), a, 1.0)
        vb = F.velocity(back.transformer, x, torch.tensor([0.5]), b, 1.0)
    assert torch.equal(va, vb)


def test_colour_side_reward():
    im = torch.zeros(3, 4, 4)
    im[0, :, :2] = 1.0  # red on the left
    assert F.colour_side(im, {"prompt": "a red square on the left"}) == 1.0
    video = torch.stack([im, im.flip(-1)], 1)  # (3, F, H, W): red moves to the right
    assert F.colour_side(video, {"prompt": "a red square on the left"}) == 0.0
    assert F.colour_side(im, {"prompt": "Red, right"}) == -1.0
    assert F.colour_side(im, {"prompt": "a blue patch on the left"}) == 0.0
    with pytest.raises(ValueError, match="names no colour"):
        F.colour_side(im, {"prompt": "a cat"})


def test_prompt_file_bad_rows(tmp_path):
    """A bad row stops the run at start, naming its line; .txt is a prompt a line."""
    txt = tmp_path / "p.txt"
    txt.write_text("a red cat on the left\n\n  a blue dog on the right \n")
    assert [r["prompt"] for r in F.load_prompts(str(txt))] == ["a red cat on the left",
                                                                "a blue dog on the right"]
    bad = {'{"prompt": "ok"}\n{"prompt": \n': "p.jsonl:2: malformed JSON",
           '{"prompt": "ok"}\n\n["a list"]\n': "p.jsonl:3: expected an object",
           '{"prompt": ""}\n': "p.jsonl:1: expected an object with a non-empty prompt",
           '{"text": "no prompt"}\n': "p.jsonl:1: expected an object",
           '{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n': "p.jsonl:2: duplicate id",
           "\n": "no prompts"}
    for text, msg in bad.items():
        (tmp_path / "p.jsonl").write_text(text)
        with pytest.raises(ValueError, match=msg):
            F.load_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red x on the left", "id": "a"}\n')
    rows = F.load_prompts(str(tmp_path / "p.jsonl"))
    assert rows == [{"prompt": "a red x on the left", "id": "a"}]


def small_run(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    held = tmp_path / "held.txt"
    held.write_text("a red stripe on the left\na blue cloud on the right\n")
    return F.ap.parse_args(["--G", "2", "--prompts", "2", "--denoise", "3", "--eval-denoise", "2",
                            "--eval-data", str(held), "--out", str(tmp_path / "run"), *extra])


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_resume_is_bitwise(tmp_path, capsys):
    """4 steps at once, or 2 then --resume to 4 (KL to the initial transformer on, two updates a
    step): the same weights, metrics and held-out numbers."""
    common = ["--kl-coef", "0.1", "--mini-batches", "2", "--micro-batch", "1", "--save-every", "2"]
    F.main(small_run(tmp_path / "a", "--steps", "4", *common))
    whole = last_json(capsys)
    F.main(small_run(tmp_path / "b", "--steps", "2", *common))
    F.main(small_run(tmp_path / "b", "--steps", "4", "--resume", *common))
    resumed = last_json(capsys)
    assert resumed["eval_before"] == whole["eval_before"]
    assert resumed["eval_after"] == whole["eval_after"]
    a, b = (F.load(str(tmp_path / d / "run" / "model")).transformer.state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ([json.loads(line) for line in open(tmp_path / d / "run" / "metrics.jsonl")]
              for d in "ab")
    drop = ("time_rollout", "time_update")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == \
           [{k: v for k, v in r.items() if k not in drop} for r in mb]
    assert ma[-1]["kl"] > 0 and max(r["logprob_gap"] for r in ma) <= 1e-5
    assert os.path.exists(tmp_path / "a" / "run" / "grid.png")


def test_failing_reward_is_counted(tmp_path, capsys, monkeypatch):
    """A reward that raises or returns NaN costs its prompt's group, counted; the run goes on."""
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    F.main(small_run(tmp_path, "--steps", "3", "--save-every", "0",
                     "--reward", "toy_rewards:colour_side_or_fail"))
    out = last_json(capsys)
    assert out["reward_errors"] > 0 and out["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 3 and rows[-1]["reward_errors"] == out["reward_errors"]


@pytest.mark.parametrize("layout", [[], ["--init", "tiny-wan", "--resolution", "16", "--sp", "2"]],
                         ids=["sd3-dp2", "wan-sp2"])
def test_two_processes_equal_one(tmp_path, layout):
    """torchrun with 2 ranks (a prompt each; or at --sp 2 both prompts, half of each video's tokens
    each) trains as one process on both prompts: the same rewards and, up to the order of float
    sums, the same weights and held-out reward. One mini-batch (two epochs): with more, update m
    takes slice m of each rank's rows, other rows than one process's slice m (as in grpo.py)."""
    from safetensors.torch import load_file
    from test_pipeline import run
    held = tmp_path / "held.txt"
    held.write_text("a red stripe on the left\na blue cloud on the right\na red dot on the left\n")
    args = ["flow_grpo.py", "--G", "2", "--prompts", "2", "--denoise", "3", "--eval-denoise", "2",
            "--eval-data", str(held), "--steps", "2", "--epochs", "2", "--kl-coef", "0.1"]
    outs = [run(*args, *(layout if n == 2 else layout[:-2]), "--out", str(tmp_path / str(n)),
                nproc=n).stdout.splitlines()[-1] for n in (1, 2)]
    outs = [json.loads(o) for o in outs]
    w = [load_file(tmp_path / str(n) / "model" / "transformer"
                   / "diffusion_pytorch_model.safetensors") for n in (1, 2)]
    # at sp 2 each gradient is a sum of two ranks' shares, not one sum (1.5e-7 apart in the sp
    # test below); Adam's step, normalized per element, magnifies that where a gradient is near 0
    tol = 1e-5 if "--sp" in layout else 1e-6
    assert max(float((w[0][k] - w[1][k]).abs().max()) for k in w[0]) <= tol
    m = [[json.loads(line) for line in open(tmp_path / str(n) / "metrics.jsonl")] for n in (1, 2)]
    assert [r["reward"] for r in m[0]] == pytest.approx([r["reward"] for r in m[1]], abs=1e-7)
    assert outs[0]["eval_after"] == pytest.approx(outs[1]["eval_after"], abs=1e-6)


def test_fsdp_equals_one_process_and_resumes(tmp_path):
    """--fsdp on 2 ranks trains as one process (2 steps, KL on: weights within 1e-5; 9.7e-8
    measured, where 2 ranks without --fsdp are bitwise), and 2 steps then --resume to 3 under --fsdp (the optimizer state gathered to rank 0,
    loaded back as shards) equals 3 straight, bitwise."""
    from safetensors.torch import load_file
    from test_pipeline import run
    args = ["flow_grpo.py", "--G", "2", "--prompts", "2", "--denoise", "3", "--eval-denoise", "2",
            "--epochs", "2", "--kl-coef", "0.1"]

    def weights(name):
        return load_file(tmp_path / name / "model" / "transformer"
                         / "diffusion_pytorch_model.safetensors")
    run(*args, "--steps", "2", "--out", str(tmp_path / "one"))
    run(*args, "--steps", "2", "--fsdp", "--out", str(tmp_path / "resumed"), nproc=2)
    w = [weights("one"), weights("resumed")]
    assert max(float((w[0][k] - w[1][k]).abs().max()) for k in w[0]) <= 1e-5
    run(*args, "--steps", "3", "--fsdp", "--resume", "--out", str(tmp_path / "resumed"), nproc=2)
    run(*args, "--steps", "3", "--fsdp", "--out", str(tmp_path / "straight"), nproc=2)
    w = [weights("resumed"), weights("straight")]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


# tiny-wan under Ulysses: a rollout with guidance and the trainer's pass over two steps of each
SP_ARGS = ["--init", "tiny-wan", "--denoise", "3", "--G", "2", "--train-steps", "2", "--cfg", "2.5"]


def sp_pass(group=None):
    """What the sp test compares: tiny-wan's rollout (trajectories, log-probs), then the trainer's
    log-probs, Gaussian means and the gradients of a loss on them (summed over ranks, as
    flow_grpo.py's update does), with the tokens split over group or in one process."""
    args = F.ap.parse_args(SP_ARGS)
    pipe = F.load("tiny-wan")
    tr = pipe.transformer
    if group is not None:
        F.use_ulysses(tr, group)
    seen = []  # tokens a block runs on: the whole video's, or this rank's share
    tr.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(out.shape[1]))
    emb = F.embed(pipe, ["a red ball on the left"], args)
    traj, lps, sig = F.sample(pipe, F.repeat(emb, 2), [5, 6], args.denoise, args.noise_level,
                              args.cfg, F.latent_shape(pipe, args))  # 3 x 8 x 8 = 192 tokens
    rows = [dict(traj=traj[j], steps=steps) for j, steps in enumerate([[0, 2], [1, 2]])]
    tr.requires_grad_(True)
    lp, mean, _ = F.step_logprobs(tr, rows, emb, args, sig)
    (lp * torch.tensor([[1.0, -2.0], [0.5, 3.0]])).sum().backward()
    mr_sp.sync_grads(list(tr.parameters()))
    return dict(traj=traj, lps=lps, lp=lp.detach(), mean=mean.detach(), tokens=seen[0],
                **{"grad." + n: p.grad for n, p in tr.named_parameters()})


def worker(out):
    from diffusers import WanTransformer3DModel
    par = mr_sp.init_parallel(2)
    res = sp_pass(par.sp_group)
    errors = []
    three = WanTransformer3DModel(num_attention_heads=3, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=8, num_layers=1)
    for bad in ("heads", "tokens"):
        model = three if bad == "heads" else F.load("tiny-wan").transformer
        try:
            F.use_ulysses(model, par.sp_group)
            with torch.no_grad():  # 3 x 3 x 3 = 27 tokens
                model(hidden_states=torch.zeros(1, 4, 3, 6, 6), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.zeros(1, 8, 32), return_dict=False)
        except SystemExit as e:
            errors.append(str(e))
    if par.rank == 0:
        torch.save(dict(res, errors=errors), out)
    mr_sp.shutdown()


def test_ulysses_sp2_equals_one_process(tmp_path):
    """tiny-wan (4 heads) at sp 2 on 2 processes (gloo, fp32): the rollout, the trainer's
    log-probs and means and the summed gradients equal one process's within 1e-5; head and token
    counts that sp does not divide stop with a message naming them."""
    from test_pipeline import run
    run("tests/test_flow_grpo.py", str(tmp_path / "sp.pt"), nproc=2)
    got, want = torch.load(tmp_path / "sp.pt"), sp_pass()
    assert (got.pop("tokens"), want.pop("tokens")) == (96, 192)
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want}
    grads = [k for k in want if k.startswith("grad.")]
    print({k: f"{v:.1e}" for k, v in diff.items() if k not in grads},
          f"gradients {max(diff[k] for k in grads):.1e} "
          f"(largest gradient {max(float(want[k].abs().max()) for k in grads):.1f})")
    assert max(diff.values()) <= 1e-5
    assert "3 attention heads do not divide" in got["errors"][0]
    assert "27 tokens" in got["errors"][1] and len(got["errors"]) == 2


if __name__ == "__main__":
    worker(sys.argv[1])
