"""The scripts end to end, as users run them: data parallel (replicated or sft.py --fsdp) and sequence
parallel (--sp) equal one process, resume equals an uninterrupted run, faults are reported and survived,
and a short pipeline shows signs of learning.

    python -m pytest tests/test_pipeline.py -q"""
import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data as D
import model as M
import mr_sp
import sft
from bench import kill_tree

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def run(*args, nproc=1, check=True, env=None):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run(launcher + list(args), cwd=ROOT, env={**ENV, **(env or {})},
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode:
        raise AssertionError(f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    D.synth(d, n=40, n_frames=16, seed=0, n_test=8)
    return str(d)


SFT = ["sft.py", "--frames", "8", "--batch", "4", "--micro-batch", "2", "--part", "all", "--warmup", "2",
       "--answer-epochs", "10"]  # a tiny model's two phases, without the default's second run
GRPO = ["grpo.py", "--init", "tiny", "--frames", "8", "--prompts", "4", "--G", "4", "--max-new", "12",
        "--micro-batch", "8", "--part", "all", "--lr", "1e-3", "--reward", "toy_rewards:length"]


@pytest.mark.parametrize("script", ["sft", "grpo"])
def test_two_processes_equal_one(task, tmp_path, script):
    """The same global batch on 2 gloo processes and on 1 gives the same parameters after a step.
    GRPO runs --adv reinforce++, whose advantages are normalized over the whole global batch (the
    other estimators' are per group: the --fsdp test covers the default on 2 processes)."""
    cmd = (SFT if script == "sft" else GRPO) + ["--data", task, "--steps", "1"]
    if script != "sft":  # a mini-batch takes a slice of every rank's rows: use one, the whole batch
        # lr 1e-4: a GRPO micro-batch is one prompt's rows, so one process sums 4 prompts' gradients
        # in another order than 2 ranks of 2, and AdamW's first step turns the float difference on an
        # element with |g| < eps into about lr * d / eps (1.2e-5 at lr 1e-3)
        cmd += ["--mini-batches", "1", "--adv", "reinforce++", "--lr", "1e-4"]
    # one process runs the ranks' blocks as its micro-batches (2 of 2 samples; GRPO: one prompt each)
    run(*cmd, "--out", str(tmp_path / "one"), "--micro-batch", "2" if script == "sft" else "8")
    out = run(*cmd, "--out", str(tmp_path / "two"), nproc=2)
    # the run's plan, made before any weights load: its line printed once (rank 0), plan.json, and
    # the flag it resolved (checkpointing: off, a tiny model's pass) in args.json
    plan = json.loads((tmp_path / "two" / "plan.json").read_text())
    lines = [line for line in out.stdout.splitlines() if line.startswith("plan | ")]
    assert lines == [mr_sp.plan_line(plan)]
    assert (plan["script"], plan["world"], plan["dp"], plan["fits"]) == (script, 2, 2, None)
    resolved = json.loads((tmp_path / "two" / "args.json").read_text())
    assert resolved["activation_checkpointing"] is False
    assert resolved["micro_batch"] == plan["micro_batch"] == (2 if script == "sft" else 8)
    one, two = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert max_diff(one, two) <= 1e-5
    # AdamW's first step (and clipping) hide a gradient's scale from the weights: compare norms too
    keys = ["loss", "grad_norm"] if script == "sft" else \
        ["reward", "kl", "clip_frac", "entropy", "grad_norm"]
    m1, m2 = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert {k: m2[k] for k in keys} == pytest.approx({k: m1[k] for k in keys}, rel=1e-5, abs=1e-8)
    if script == "sft":  # the validation rows split over the ranks: the same numbers
        v1, v2 = metrics(tmp_path / "one")[1], metrics(tmp_path / "two")[1]
        assert v1["val_rows"] == 8 and v2.pop("val_by_category") == v1.pop("val_by_category")
        assert v2 == pytest.approx(v1, rel=1e-5)
    if script != "sft":  # the step did change the policy, so equality is not vacuous
        run("model.py", "save", "--out", str(tmp_path / "init"))
        assert max_diff(one, weights(tmp_path / "init")) > 5e-5


@pytest.mark.parametrize("script", ["sft", "sft-freeze", "grpo"])
def test_sequence_parallel_equals_one_process(task, tmp_path, script):
    """--sp 2 on 2 processes (one data-parallel rank, its sequences split over 2) equals 1 process:
    the same parameters after a step, and the same counts and metrics (AdamW's first step hides the
    gradient's scale, so a token count summed over SP peers would show only there). SFT trains the
    tiny model's vision tower, which every SP peer encodes with gradients; with it frozen (and in
    GRPO) each peer reads and encodes only its share of every video's frames."""
    # lr 1e-5, not 1e-3: unlike data parallel, SP reorders float sums, and AdamW's first step turns a
    # gradient difference d on an element with |g| < eps = 1e-8 into about lr * d / eps (the GRPO step:
    # 1.9e-5 on parameters at lr 1e-3 with one set of samples, 2.0e-5 at lr 1e-4 with another); the
    # gradients themselves are compared through grad_norm below (rel 1e-5)
    cmd = (SFT if script != "grpo" else GRPO + ["--mini-batches", "1"]) + ["--data", task, "--steps", "1"]
    cmd += ["--lr", "1e-5"] + ["--vision", "freeze"] * (script == "sft-freeze")
    run(*cmd, "--out", str(tmp_path / "one"))
    run(*cmd, "--out", str(tmp_path / "sp"), "--sp", "2", nproc=2)
    assert max_diff(weights(tmp_path / "one" / "model"), weights(tmp_path / "sp" / "model")) <= 1e-5
    one, sp = metrics(tmp_path / "one")[0], metrics(tmp_path / "sp")[0]
    keys = ["tokens", "loss", "grad_norm"] if script != "grpo" else \
        ["groups", "reward", "response_len", "kl", "clip_frac", "entropy", "grad_norm"]
    assert {k: sp[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, rel=1e-5, abs=1e-8)  # kl ~7e-4
    if script != "grpo":  # validation: each video encoded over the SP group, the same numbers
        v1, v2 = metrics(tmp_path / "one")[1], metrics(tmp_path / "sp")[1]
        assert v1["val_rows"] == 8 and v2.pop("val_by_category") == v1.pop("val_by_category")
        assert v2 == pytest.approx(v1, rel=1e-5)
    assert one["grad_norm"] > 0.1


def test_sequence_parallel_not_dividing_world_fails_at_start(task, tmp_path):
    out = run(*SFT, "--data", task, "--steps", "1", "--sp", "3", "--out", str(tmp_path / "run"), nproc=2, check=False)
    assert out.returncode and "world size 2 is not divisible by --sp 3: world = dp x sp" in out.stderr
    assert 'sft.py", line' not in out.stderr and 'mr_sp.py", line' not in out.stderr  # no traceback of ours


@pytest.mark.parametrize("nproc", [2, 4])
def test_eval_sequence_parallel_equals_one_process(task, tmp_path, nproc):
    """Same answers and summary at sp 2, alone (2 processes) and beside data parallel (dp 2 x sp 2,
    as a multi-node job's eval runs); the SP peers' identical answers are gathered once."""
    run("model.py", "save", "--out", str(tmp_path / "model"))
    cmd = ["eval.py", "--model", str(tmp_path / "model"), "--data", task, "--frames", "8", "--limit", "4",
           "--max-new", "8"]
    outs = [run(*cmd, "--out", str(tmp_path / "one")),
            run(*cmd, "--out", str(tmp_path / "sp"), "--sp", "2", nproc=nproc)]
    one, sp = [json.loads(o.stdout.strip().splitlines()[-1]) for o in outs]
    for s in (one, sp):
        del s["seconds"]
    assert one == sp and one["n_questions"] == 4
    assert (tmp_path / "one" / "results.jsonl").read_text() == (tmp_path / "sp" / "results.jsonl").read_text()


@pytest.mark.parametrize("script", ["sft", "grpo"])
def test_resume_after_kill_equals_uninterrupted(task, tmp_path, script):
    cmd = (SFT if script == "sft" else GRPO) + ["--data", task, "--steps", "4", "--save-every", "1"]
    run(*cmd, "--out", str(tmp_path / "full"))
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable] + cmd + ["--out", str(killed)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / ("last" if script == "sft" else "model") / "state.pt"  # sft.py's model/: its best step
    while not state.exists() and p.poll() is None:
        time.sleep(0.02)
    p.kill()
    p.wait()
    step = torch.load(state, weights_only=False)["step"]
    assert 1 <= step < 4  # killed mid-run, after a checkpoint
    run(*cmd, "--out", str(killed), "--resume")
    # steps after the checkpoint logged once (sft.py validates each step here: a line more a step)
    assert [m["step"] for m in metrics(killed)] == [m["step"] for m in metrics(tmp_path / "full")]
    assert sorted({m["step"] for m in metrics(killed)}) == [1, 2, 3, 4]
    full, resumed = weights(tmp_path / "full" / "model"), weights(killed / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # bitwise: same data, seeds, optimizer state


def with_broken_video(task, data, k, n=None):
    """A copy of the task whose k-th row in both scripts' seed-0 data order of its first n rows
    (default all; sft.py trains on the first 24 of 32, validating on the rest) has an unreadable video."""
    shutil.copytree(task, data)
    (data / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    rows = (data / "train.jsonl").read_text().splitlines()
    bad = torch.randperm(n or len(rows), generator=torch.Generator().manual_seed(0))[k].item()  # sft.epoch_order(0, 0, n)
    rows[bad] = json.dumps(json.loads(rows[bad]) | {"video": "videos/broken.mp4"})
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")


def test_fsdp_equals_one_process_and_resumes(task, tmp_path):
    """sft.py --fsdp on 2 processes, data parallel and --sp 2, gives one process's parameters and metrics after
    two steps, with a bad video in rank 1's share of step 1 (that rank runs a weight-0 copy in its place: FSDP
    needs as many passes on every rank); and a --fsdp run stopped after a checkpoint and resumed ends bitwise
    equal to the uninterrupted one."""
    data = tmp_path / "data"
    with_broken_video(task, data, 3, n=24)
    # lr 1e-4 and a constant schedule: see the SP test on the lr; a run of --steps 1 is then the first step of 2
    cmd = SFT + ["--data", str(data), "--lr", "1e-4", "--schedule", "constant"]
    run(*cmd, "--steps", "2", "--out", str(tmp_path / "one"))
    one = metrics(tmp_path / "one")
    assert one[0]["bad_samples"] == 1 and one[0]["grad_norm"] > 0.1
    keys = ["tokens", "loss", "grad_norm", "val_loss", "val_acc", "val_entropy", "val_rows"]  # validated each step
    for name, extra in (("fsdp", []), ("sp", ["--sp", "2"])):
        run(*cmd, "--steps", "2", "--fsdp", *extra, "--out", str(tmp_path / name), nproc=2)
        assert max_diff(weights(tmp_path / "one" / "model"), weights(tmp_path / name / "model")) <= 1e-5
        assert [{k: m[k] for k in keys if k in m} for m in metrics(tmp_path / name)] == \
            [pytest.approx({k: m[k] for k in keys if k in m}, rel=1e-5) for m in one]
    assert [m["step"] for m in one] == [1, 1, 2, 2]
    run(*cmd, "--steps", "1", "--fsdp", "--out", str(tmp_path / "resumed"), nproc=2)
    run(*cmd, "--steps", "2", "--fsdp", "--resume", "--out", str(tmp_path / "resumed"), nproc=2)
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [1, 1, 2, 2]
    full, resumed = weights(tmp_path / "fsdp" / "model"), weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_grpo_fsdp_equals_one_process_and_resumes(task, tmp_path):
    """grpo.py --fsdp on 2 processes, data parallel and --sp 2, gives one process's parameters after two steps,
    with a bad video in rank 1's share of step 1 (fewer rollouts there: its missing micro-batches are run as
    weight-0 copies, as FSDP needs as many passes on every rank); the saved folder is the replicated run's; a
    --fsdp run SIGKILLed after a checkpoint and resumed ends bitwise equal to the uninterrupted one."""
    data = tmp_path / "data"
    with_broken_video(task, data, 2)  # grpo.py's order: rank 1 reads positions 2, 3 of 4
    # lr 1e-4: see the SP test; --micro-batch 4: rank 0 runs 2 micro-batches, rank 1 one (+ a copy)
    cmd = GRPO + ["--data", str(data), "--lr", "1e-4", "--mini-batches", "1", "--micro-batch", "4",
                  "--no-dynamic-sampling"]
    run(*cmd, "--steps", "2", "--out", str(tmp_path / "one"))
    assert metrics(tmp_path / "one")[0]["groups"] == 3
    run("model.py", "save", "--out", str(tmp_path / "init"))
    one = weights(tmp_path / "one" / "model")
    assert max_diff(one, weights(tmp_path / "init")) > 1e-5  # the steps moved the weights
    for name, extra in (("fsdp", []), ("sp", ["--sp", "2"])):
        run(*cmd, "--steps", "2", "--fsdp", *extra, "--out", str(tmp_path / name), nproc=2)
        assert max_diff(one, weights(tmp_path / name / "model")) <= 1e-5, name
    assert sorted(os.listdir(tmp_path / "one" / "model")) == sorted(os.listdir(tmp_path / "fsdp" / "model"))
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                         + cmd + ["--steps", "2", "--fsdp", "--save-every", "1", "--out", str(killed)], cwd=ROOT,
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "model" / "state.pt").exists() and p.poll() is None:
        time.sleep(0.02)
    kill_tree(p.pid)  # the launcher and both workers (killing its process group left them running)
    p.wait()
    assert torch.load(killed / "model" / "state.pt", weights_only=True)["step"] == 1
    run(*cmd, "--steps", "2", "--fsdp", "--resume", "--out", str(killed), nproc=2)
    full, resumed = weights(tmp_path / "fsdp" / "model"), weights(killed / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_rehearsal_on_four_processes(tmp_path):
    """`bench.py rehearse` at 4 processes, the paper's job in small: Qwen2.5-VL-7B's miniature (28 query
    and 4 KV heads, untied embeddings: the --fsdp --sp run that hung), --fsdp at sp 4 (dp 1) and at
    sp 2 x dp 2 (the layout whose SP log-prob gather crashed in backward), 64-frame videos decoded
    from mp4. Each layout's weights after one step equal one process's (lr 1e-4); a run SIGKILLed
    after its step-1 checkpoint (launcher and workers) resumes to the uninterrupted run's weights
    bitwise; each rank's peak memory per phase is at least 0.8x its plan and at most 0.25 GiB over
    it: on CPU 50-125 MB of library and allocator buffers the plan leaves out, as much as the plan
    itself at this size (a baseline taken before transformers' modeling module, 150 MB, fails it;
    the 8-process rehearsal at 3,600 frames is within 0.91-1.02x of its plan)."""
    out = run("bench.py", "rehearse", "--nproc", "4", "--frames", "64", "--layouts", "4,2",
              "--out", str(tmp_path))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(r["layouts"]) == ["sp2", "sp4"]
    for name, x in r["layouts"].items():
        assert x["killed_after_step"] == 1 and x["resumed_bitwise"], (name, x)
        # AdamW's first step is lr * g / (|g| + eps): an element whose gradient is within float error
        # of eps moves by a float-error-sized share of lr (one of 10.4M here: |g| 4.5e-9 at one process,
        # 1.2e-8 at sp 4, 2.3e-5 apart after the step); a wrong gradient moves thousands
        assert x["weights_over_1e-5"] <= 10 and x["max_weight_diff_vs_one"] <= 1e-4, (name, x)
        for phase, m in x["memory"].items():
            assert 0.8 <= m["ratio_min"] and max(m["measured"]) - m["planned"] <= 0.25, (name, phase, m)


def test_faults_are_reported_and_survived(task, tmp_path):
    """A raising reward function and a corrupt video: clear messages, counted, the run completes."""
    data = tmp_path / "data"
    shutil.copytree(task, data)
    (data / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    rows = (data / "train.jsonl").read_text().splitlines()
    bad = json.loads(rows[0]) | {"id": "broken-row", "video": "videos/broken.mp4"}
    (data / "train.jsonl").write_text("\n".join([json.dumps(bad)] + rows) + "\n")
    # boom's rewards are 0 where it does not raise: flat groups, which dynamic sampling would drop until it gives up
    out = run(*GRPO, "--data", str(data), "--steps", "3", "--prompts", "8", "--reward", "toy_rewards:boom",
              "--no-dynamic-sampling", "--out", str(tmp_path / "run"))
    assert "reward function failed on sample" in out.stderr and "reward server unreachable" in out.stderr
    assert "broken-row" in out.stderr and "broken.mp4" in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["reward_errors"] > 0 and summary["bad_samples"] == 1
    assert weights(tmp_path / "run" / "model")  # the checkpoint is whole and loads


@pytest.mark.parametrize("nproc", [1, 2])
def test_dynamic_sampling_drops_flat_groups_and_refills(task, tmp_path, nproc):
    """Flat groups dropped and refilled to --prompts groups every step, on 1 rank and on 2: the
    first two prompts (rank 0's block on 2 ranks) are flat, so rank 0 refills and rank 1 need not,
    and the next step starts after the furthest any rank read: no prompt rolled out twice."""
    rows = D.load_rows(os.path.join(task, "train.jsonl"))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()  # seed 0
    log, flat = tmp_path / "ids", [rows[order[0]]["id"], rows[order[1]]["id"]]
    out = run(*GRPO, "--data", task, "--steps", "2", "--reward", "toy_rewards:flat_listed_logged",
              "--dynamic-sampling", "--out", str(tmp_path / "run"), nproc=nproc,
              env={"REWARD_LOG": str(log), "FLAT_IDS": ",".join(flat)})
    m = metrics(tmp_path / "run")
    assert [x["groups"] for x in m] == [4, 4]  # refilled to --prompts groups every step
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert m[-1]["dropped_groups"] >= 2 and summary["dropped_groups"] >= 2
    files = list(tmp_path.glob("ids.*"))
    ids = collections.Counter(line for f in files for line in f.read_text().split())
    assert len(files) == nproc and set(ids.values()) == {4}  # G = 4 samples of each prompt, once
    assert set(flat) <= set(ids) and len(ids) >= 10  # 2 steps of 4 prompts, plus refills


def test_every_group_flat_warns_and_trains_on(task, tmp_path):
    """A policy whose G samples of a prompt are rewarded alike (a sharp SFT checkpoint, here a constant
    reward): dynamic sampling reads its 8 rounds, says so with the numbers, and the run goes on (it
    stopped at step 1): no group to learn from, so no update; flat_groups and rollout_entropy logged."""
    out = run(*GRPO, "--data", task, "--steps", "2", "--prompts", "2", "--reward", "toy_rewards:constant",
              "--out", str(tmp_path / "run"))
    assert out.stderr.count("dynamic sampling read 18 prompts and found 0 of 2 groups") == 2
    m = metrics(tmp_path / "run")
    assert [(x["groups"], x["flat_groups"]) for x in m] == [(0, 1.0), (0, 1.0)]
    assert all(x["rollout_entropy"] > 0.1 for x in m)  # a random tiny policy: far from sharp
    run("model.py", "save", "--out", str(tmp_path / "init"))
    assert max_diff(weights(tmp_path / "run" / "model"), weights(tmp_path / "init")) == 0


def test_sft_keeps_the_best_validated_step(task, tmp_path):
    """SFT on 4 rows for up to 40 epochs learns them by heart (training loss near 0) while the
    held-out loss turns up: the validation lines show it, the run stops after 3 validations without
    a lower loss, and model/ is the best step's weights (its validation loss recomputed from model/
    equals the logged one), not the last step's (last/)."""
    data, out = tmp_path / "data", tmp_path / "sft"
    shutil.copytree(task, data)
    rows = (data / "train.jsonl").read_text().splitlines()[:12]  # --part sft: 4 to train, the RL part's 8 to validate
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    run(*SFT, "--data", str(data), "--part", "sft", "--val", "8", "--answer-epochs", "10", "--epochs", "40",
        "--eval-every", "5", "--lr", "3e-3", "--out", str(out))
    m = metrics(out)
    train, val = [x for x in m if "loss" in x], [x for x in m if "val_loss" in x]
    # the first 10 epochs' bare answers (--answer-epochs) are validated as such, and their loss, of
    # other targets, neither picks model/ nor stops the run
    assert [x["val_target"] for x in val[:3]] == ["answer", "answer", "trace"]
    val = val[2:]
    best = min(val, key=lambda x: x["val_loss"])
    assert [x["step"] for x in val] == list(range(15, best["step"] + 16, 5)) and len(train) == best["step"] + 15
    assert train[-1]["loss"] < 0.05 and val[-1]["val_loss"] > 1.1 * best["val_loss"]
    assert json.loads((out / "model" / "val.json").read_text()) == best
    model, tok = M.load(str(out / "model"))
    rows = D.split_rows(D.load_rows(data / "train.jsonl"), "rl")
    ds = D.VideoDataset(rows, nframes=8, proc=M.processor_config(model.config))
    v = sft.validate(model.eval(), tok, ds, mr_sp.init_parallel(1), sorted({r["category"] for r in rows}),
                     tok.convert_tokens_to_ids("<|im_end|>"))
    assert v["nll"] / v["tokens"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert max_diff(weights(out / "model"), weights(out / "last")) > 1e-3


def test_sft_trains_bare_answers_then_traces(tmp_path):
    """--answer-epochs: the run's first steps (their share of the epochs) train on the bare answer
    (`<answer>X</answer><|im_end|>`, under the bare instruction), the rest on the reasoning trace and
    answer, except rows whose trace reasons to another answer (trace_answer), always their bare true
    answer; each step's target tokens, logged, equal those of its rows' targets (after the bare
    phase, --answer-mix's share of the rows' bare answers too), and the validations grade the same."""
    task, out = tmp_path / "task", tmp_path / "sft"
    D.synth(task, n=40, n_frames=16, seed=0, n_test=8, noise=0.3)
    run(*SFT, "--data", str(task), "--steps", "4", "--answer-epochs", "1", "--epochs", "1",
        "--eval-every", "1", "--answer-mix", "0.5", "--out", str(out))
    args = json.loads((out / "args.json").read_text())
    assert args["answer_steps"] == 2
    rows, val = sft.split_val(D.load_rows(task / "train.jsonl"), "all", args["val"])
    tok = M.tiny_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def n_tokens(rs, bare, noisy_bare=True):
        return sum(len(sft.target_tokens(tok, r, end, bare or noisy_bare and "trace_answer" in r))
                   for r in rs)

    m = metrics(out)
    train, v = [x for x in m if "loss" in x], [x for x in m if "val_loss" in x]
    swapped, traces = [], []  # what the other phase's targets, or the noisy rows' traces, would give
    for step, (x, bare) in enumerate(zip(train, [True, True, False, False])):
        batch = [rows[i] for i in sft.batch_indices(step, argparse.Namespace(**args), len(rows), 0, 1)]
        mixed = [] if bare else batch[1::2]  # half the rows, spread by position: the same on any ranks
        assert x["tokens"] == n_tokens(batch, bare) + n_tokens(mixed, True)
        swapped.append(n_tokens(batch, not bare) + n_tokens(mixed, True))
        traces.append(n_tokens(batch, bare, noisy_bare=False) + n_tokens(mixed, True))
    assert swapped != [x["tokens"] for x in train] != traces
    assert [x["val_target"] for x in v] == ["answer", "answer", "trace", "trace"]
    assert [x["val_tokens"] for x in v] == [n_tokens(val, True)] * 2 + [n_tokens(val, False)] * 2
    assert json.loads((out / "model" / "val.json").read_text())["val_target"] == "trace"
    model, _ = M.load(str(out / "model"))
    ds = D.VideoDataset(rows, nframes=8, proc=M.processor_config(model.config))
    items = [it for step in (2, 3) for it in sft.step_rows(argparse.Namespace(**args), step, ds, len(rows),
                                                            tok, model.config, mr_sp.init_parallel(1), end)]
    noisy = [it for it in items if "trace_answer" in it["sample"]]
    assert noisy and len(noisy) < len(items)
    for it in noisy:
        assert tok.decode(it["response"]) == f"<answer>{it['sample']['answer']}</answer><|im_end|>"
        assert "Give only" in tok.decode(it["prompt"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_sft_falls_back_to_bare_answers(task, tmp_path, nproc):
    """A tiny model at the default --answer-epochs: its traces' run leaves held-out accuracy near
    blind (4 steps), so the run moves it to traces/ and starts over with bare answers first: the
    same steps, metrics and weights as a run with --answer-epochs BARE_EPOCHS from the start (on 2
    processes with --fsdp too: a second model sharded in the same process group); a --resume
    after it keeps that run."""
    auto, ref = tmp_path / "auto", tmp_path / "ref"
    flags = [*SFT[:-2], "--data", task, "--steps", "4", "--eval-every", "2"] + ["--fsdp"] * (nproc > 1)
    out = run(*flags, "--out", str(auto), nproc=nproc).stdout
    run(*flags, "--answer-epochs", f"{sft.BARE_EPOCHS:g}", "--out", str(ref), nproc=nproc)
    first = metrics(auto / "traces")
    assert len([x for x in first if "loss" in x]) == 4
    assert {x["val_target"] for x in first if "val_loss" in x} == {"trace"}
    end = json.loads(out.strip().splitlines()[-1])
    assert f"starting over with {sft.BARE_EPOCHS:g} epochs of bare answers" in out
    assert end["answer_epochs"] == sft.BARE_EPOCHS
    assert max(x["val_acc"] for x in first if "val_acc" in x) < end["blind_acc"] + sft.BLIND_MARGIN

    def numbers(out):
        return [{k: v for k, v in x.items() if k != "seconds"} for x in metrics(out)]
    assert numbers(auto) == numbers(ref) and [x.get("val_target") for x in numbers(auto)][2] == "answer"
    assert max_diff(weights(auto / "model"), weights(ref / "model")) == 0
    assert max_diff(weights(auto / "model"), weights(auto / "traces" / "model")) > 1e-3
    again = run(*flags, "--resume", "--out", str(auto), nproc=nproc).stdout.strip().splitlines()[-1]
    again = json.loads(again)
    assert again["answer_epochs"] == sft.BARE_EPOCHS and again["steps"] == 4 and metrics(auto / "traces") == first


def test_blind_accuracy_answers_each_categorys_most_common():
    rows = [dict(category="a", answer=x) for x in "AAB"] + [dict(category="b", answer=x) for x in "122"]
    val = [dict(category="a", answer="A"), dict(category="a", answer="B"), dict(category="b", answer="2.0"),
           dict(category="c", answer="A")]  # "2.0" graded as the number 2; an unseen category: wrong
    assert sft.blind_accuracy(rows, val) == 0.5


def test_bf16_passes_see_every_update(task, tmp_path):
    """autocast keeps its bf16 copy of a weight until its region ends: with --dtype bfloat16 (one
    region around the run) every linear layer ran on its step-1 copy in every pass (only the weights
    autocast does not cast, embeddings and norms, moved), so the second update's KL to the reference
    was 0.33 where fp32's is 2.5; --rollout-dtype bfloat16 rollouts sampled from step 1's copies
    (log-probs drifting nats off the trainer's). The copies are made afresh each time now."""
    out = {d: str(tmp_path / d) for d in ("float32", "bfloat16", "roll")}
    for dtype in ("float32", "bfloat16"):  # lr 1e-3: the step's second update moves the policy far
        run(*GRPO, "--data", task, "--steps", "1", "--dtype", dtype, "--out", out[dtype])
    kl = {d: metrics(out[d])[0]["kl"] for d in ("float32", "bfloat16")}
    assert abs(kl["bfloat16"] / kl["float32"] - 1) < 0.25, kl  # bf16 tracks fp32 within one step
    run(*GRPO, "--data", task, "--steps", "3", "--rollout-dtype", "bfloat16", "--out", out["roll"])
    gaps = [m["rollout_logprob_gap"] for m in metrics(out["roll"])]
    assert 1e-3 < gaps[0] and max(gaps) < 0.5, gaps  # bf16 rollouts' float error, not a stale policy


def test_bf16_sft_tracks_fp32(task, tmp_path):
    """sft.py's one autocast region kept step 1's bf16 copy of every linear weight: 6 bf16 steps took
    the loss from 7.17 to 6.38 where fp32 reaches 1.46. Now bf16 follows fp32 step by step."""
    loss = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        run(*SFT, "--data", task, "--steps", "4", "--lr", "1e-3", "--dtype", dtype, "--out", out)
        loss[dtype] = [m["loss"] for m in metrics(out) if "loss" in m]
    assert all(abs(b / f - 1) < 0.05 for f, b in zip(loss["float32"], loss["bfloat16"])), loss


def test_short_pipeline_learns(task, tmp_path):
    """SFT loss falls; GRPO from that checkpoint raises the mean reward. A smoke signal, not a measurement
    (bench.py learning is): 12 steps of 32 samples are noisy. Since rollouts are seeded per sample, seed 0
    reads flat here (first 4 steps 0.564, last 4 0.559); seed 1 rises (0.474 -> 0.600)."""
    sft = tmp_path / "sft"
    run(*SFT, "--data", task, "--steps", "40", "--batch", "8", "--micro-batch", "8", "--out", str(sft))
    losses = [m["loss"] for m in metrics(sft) if "loss" in m]
    bare = json.loads((sft / "args.json").read_text())["answer_steps"]  # the default's first phase
    for phase in (losses[:bare], losses[bare:]):  # each target's loss falls (the two differ in kind)
        assert len(phase) >= 10 and sum(phase[-5:]) / 5 < 0.5 * sum(phase[:5]) / 5
    g = tmp_path / "grpo"
    run("grpo.py", "--init", str(sft / "model"), "--data", task, "--part", "all", "--frames", "8", "--steps", "12",
        "--prompts", "8", "--G", "4", "--max-new", "96", "--micro-batch", "16", "--lr", "1e-4", "--seed", "1",
        "--out", str(g))
    rewards = [m["reward"] for m in metrics(g)]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4


def mixed_task(task, data):
    """A copy of the task where every third row has an image instead of its video and every third a
    question without any visual input (text-only RL), in train and test."""
    from PIL import Image
    import numpy as np
    shutil.copytree(task, data)
    for split in ("train", "test"):
        rows = [json.loads(r) for r in (data / f"{split}.jsonl").read_text().splitlines()]
        for i, r in enumerate(rows):
            if i % 3 == 1:
                img = np.random.default_rng(i).integers(0, 256, (50, 70, 3), dtype=np.uint8)
                Image.fromarray(img).save(data / f"{split}{i}.png")
                r["image"] = f"{split}{i}.png"
                del r["video"]
            elif i % 3 == 2:
                del r["video"]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def sft_then_grpo_one_and_sp(init, data, tmp_path, *sft_args):
    """sft.py --init init for 2 steps, then a GRPO step from its checkpoint on one process (tmp_path/one)
    and on 2 with --sp 2 --fsdp (tmp_path/sp): every prompt's group kept, no bad sample, and the
    same weights."""
    run(*SFT, "--init", init, "--data", str(data), "--steps", "2", *sft_args, "--out", str(tmp_path / "sft"))
    cmd = GRPO[:1] + ["--init", str(tmp_path / "sft" / "model")] + GRPO[3:] + [
        "--data", str(data), "--steps", "1", "--mini-batches", "1", "--lr", "1e-5"]
    run(*cmd, "--out", str(tmp_path / "one"))
    assert metrics(tmp_path / "one")[0]["groups"] == 4 and metrics(tmp_path / "one")[0]["bad_samples"] == 0
    run(*cmd, "--out", str(tmp_path / "sp"), "--sp", "2", "--fsdp", nproc=2)
    assert max_diff(weights(tmp_path / "one" / "model"), weights(tmp_path / "sp" / "model")) <= 1e-5


@pytest.mark.parametrize("family", ["tiny-qwen3-vl", "tiny-qwen2-vl", "tiny-qwen3.5"])
def test_every_stage_takes_each_family_and_image_and_text_rows(task, tmp_path, family):
    """sft.py --init <family>, grpo.py from its checkpoint and eval.py on rows with a video, an image or
    no visual input; and GRPO with --sp 2 --fsdp equals one process on them (Qwen3-VL: DeepStack features
    split with the sequence; Qwen3.5: its Gated DeltaNet layers by their own all-to-all, packed rows too)."""
    data = tmp_path / "data"
    mixed_task(task, data)
    sft_then_grpo_one_and_sp(family, data, tmp_path)
    out = run("eval.py", "--model", str(tmp_path / "one" / "model"), "--data", str(data), "--frames", "8",
              "--max-new", "8", "--out", str(tmp_path / "eval"))
    assert json.loads(out.stdout.strip().splitlines()[-1])["n_questions"] == 8
    kinds = {r["id"]: r for r in map(json.loads, (data / "test.jsonl").read_text().splitlines())}
    assert sum("image" in r for r in kinds.values()) == 3 and sum("video" not in r for r in kinds.values()) == 5


def test_engine_vllm_without_vllm_says_how_to_get_it(task, tmp_path):
    """Where vllm is not installed (the main environment), --engine vllm fails at start with how to get it."""
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: tests/test_vllm.py runs it")
    run("model.py", "save", "--out", str(tmp_path / "model"))
    out = run("eval.py", "--model", str(tmp_path / "model"), "--data", task, "--limit", "1", "--engine", "vllm",
              check=False)
    assert out.returncode and "bash .ci/vllm_env" in out.stderr and "pip install vllm" in out.stderr
