"""Benchmarks: long runs that measure, never part of the tests.

    python bench.py learning --jobs 3  # SFT -> GRPO, synth task, 3 seeds at once (~1 h, 2 cores)
    python bench.py learning --seeds 0 --sft-steps 100 --grpo-steps 10  # a quick look
    python bench.py learning --data data/motion --jobs 3  # another task (data.py synth --family motion)
    python bench.py learning --seeds 0 --sft runs/sft/model --variants algorithms  # grpo.py's
    python bench.py mrsp  # MR-SP: embedding cache, sp=2 memory, engine, planner (~15 min)
    python bench.py hour  # one GRPO step on a 3,600-frame video, tiny model, sp=2 under torchrun
    python bench.py engine  # rollout: memory G=8 vs 1, chunked prefill, sp=2 vs sp=1 time (~5 min)
    python bench.py gpu  # the prepared GPU check: Qwen2.5-VL-3B-shaped random model, peak vs planner
    python bench.py planner  # mr_sp.plan vs measured step peaks: tiny/small, sp 1/2, each option (~8 min)
    python bench.py step --frames 256 --variants cache,reencode --repeats 3  # mrsp/hour's GRPO step
    python bench.py step --config tiny-qwen2.5-omni --frames 128 --variants cache,reencode --repeats 3
    torchrun --nproc_per_node 2 bench.py prefill --frames 4096 --sp 2  # training pass + backward
    $(bash .ci/vllm_env | tail -1) bench.py rollout  # vLLM (CPU build) vs our engine, tokens/s

learning: per seed, SFT on the SFT third of train; greedy eval on the held-out split, with a blind
control (same model, every video blanked); the SFT model's pass@8 on 200 held-out rows (headroom for
RL); GRPO from that checkpoint on the other two thirds; greedy eval again. --sft: one SFT checkpoint
for every seed instead of training one. --variants "name=grpo.py arguments;...": one GRPO run from
the SFT checkpoint per variant, the same budget each ("algorithms": ALGORITHMS, grpo.py's). Last
line: JSON with chance, blind_acc, sft_acc, grpo_acc (the first variant's), held-out means over
seeds, by_category (chance: a uniform guess, 1 / options or 1 / the category's answers; blind, sft,
grpo: mean and standard deviation over seeds), per_seed, seeds, and per variant: acc, the training
reward over the first and last 10 steps. --data: any task folder with train.jsonl and test.jsonl.
mrsp (model mr_sp.SMALL: Qwen2.5-VL-7B's vision/LM FLOPs ratio; 56x56 frames, 2 video tokens a
frame; G=8): cache_speedup per frame count (step's reencode over cache time; paired median of
alternating steps), sp2_peak_mem_ratio (sp=2 over sp=1 peak per rank of a training pass, forward
and backward), max_frames_sp1/sp2 (largest video whose training pass fits --cap-gb per rank),
planner vs those passes, engine_vs_naive (model.generate, our engine's prefill-once shared-KV
decode, over generate_naive tokens/s; equal greedy tokens?).
hour: step time, phases, peak memory per rank (resident set, Python runtime included), 3,600-frame
video, tiny model, sp=2; last line JSON: frames, step_s, peak_mem_gb_per_rank. Workers: fresh
one-thread processes (shared machine, noisy timings: every comparison is side by side in one run).
rollout: one model, prompts and cached video embeddings through mr_sp.rollout, our engine vs vLLM, G
samples per prompt, alternating, one warm-up call each. Tokens/s: generated tokens (EOS included)
over the call's wall time, and over this process's CPU time (less sensitive to other jobs on a
shared machine); ratios: medians of per-pair ratios. Needs vllm (own CPU env: bash .ci/vllm_env).
Last line JSON: vllm_tok_s, engine_tok_s (medians over calls, wall time), ratio, cpu_ratio."""
import argparse
import collections
import concurrent.futures
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib

import numpy as np
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401  (before baseline memory)

import data as D
import grpo
import model as M
import mr_sp

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
sub = ap.add_subparsers(dest="cmd", required=True)
lp = sub.add_parser("learning", help="does GRPO improve on SFT? (held-out accuracy, mean of seeds)")
lp.add_argument("--seeds", default="0,1,2", help="comma list of training seeds; default 0,1,2")
lp.add_argument("--data", default="data/synth", help="task folder (written if absent); default data/synth")
lp.add_argument("--out", default="runs/bench_learning", help="runs go to OUT/seed<k>/{sft,grpo}")
lp.add_argument("--sft-steps", type=int, default=None, help="SFT steps; default: sft.py's (from its --epochs)")
lp.add_argument("--grpo-steps", type=int, default=200, help="GRPO steps; default 200")
lp.add_argument("--grpo-args", default="", help="extra grpo.py arguments, quoted")
lp.add_argument("--sft-args", default="", help="extra sft.py arguments, quoted")
lp.add_argument("--limit", type=int, default=0, help="held-out rows to evaluate (0 = all)")
lp.add_argument("--jobs", type=int, default=1, help="seeds at once (logs: OUT/seed<k>/log.txt); default 1")
lp.add_argument("--sft", default=None, help="an SFT checkpoint for every seed; default: train one")
lp.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                help="the SFT model's blind and pass@8 evals; default on")
lp.add_argument("--eval-args", default="", help="extra eval.py arguments, quoted (e.g. '--batch 64')")
lp.add_argument("--variants", default="grpo=",
                help="'name=grpo.py arguments;...', a GRPO run each after --grpo-args, or "
                "'algorithms' (ALGORITHMS); default 'grpo='")
mp = sub.add_parser("mrsp", help="embedding cache, sp=2 memory, largest video, engine, planner")
mp.add_argument("--frames", default="64,256,1024", help="cache speedup frame counts; default 64,256,1024")
mp.add_argument("--repeats", type=int, default=3, help="steps per variant, alternating (median); default 3")
mp.add_argument("--max-new", type=int, default=32, help="response tokens per rollout; default 32")
mp.add_argument("--long", type=int, default=4096, help="frames, sp=1 vs sp=2 memory; default 4096")
mp.add_argument("--cap-gb", type=float, default=1.0, help="training-pass peak cap per rank, GiB; default 1.0")
hp = sub.add_parser("hour", help="one GRPO step, 3,600-frame video, tiny model, sp=2 (torchrun)")
hp.add_argument("--frames", type=int, default=3600, help="frames (an hour at 1 fps); default 3600")
hp.add_argument("--G", type=int, default=8, help="rollouts; default 8")
hp.add_argument("--max-new", type=int, default=32, help="response tokens; default 32")
hp.add_argument("--size", type=int, default=56, help="frame side, px; default 56 (2 video tokens a frame)")
for name, what in (("step", "one GRPO step on one synthetic video: phase times, peak memory"),
                   ("prefill", "training pass + backward of one row (random video embeds), peak memory"),
                   ("generate", "one rollout call, G samples of one prompt (random video embeds), memory")):
    p = sub.add_parser(name, help=what)
    p.add_argument("--config", default="small", choices=["small", *M.TINY],
                   help="model (mr_sp.SMALL, or a model.TINY name; step: tiny-qwen2.5-omni hears the video's "
                   "sound too, random log-mels as long as it); default small")
    p.add_argument("--frames", type=int, default=256, help="frames of the video; default 256")
    p.add_argument("--size", type=int, default=56, help="frame side, px; default 56 (2 video tokens a frame)")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel degree (torchrun when > 1)")
    p.add_argument("--G", type=int, default=8, help="rollouts (step), rows (prefill: 1); default 8")
    p.add_argument("--max-new", type=int, default=32, help="response tokens; default 32")
    p.add_argument("--variants", default="cache", help="step: comma list of cache, reencode (no embedding "
                   "cache), rowwise (--no-shared-prefix); default cache")
    p.add_argument("--repeats", type=int, default=1, help="steps/variant, alternating; default 1")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; default 0")
    p.add_argument("--fsdp", action="store_true", help="grpo.py --fsdp (sharded over the ranks)")
    p.add_argument("--prefill-chunk", type=int, default=grpo.ap.get_default("prefill_chunk"),
                   help="grpo.py's: rollout prefill tokens per forward (0: all)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   default=True, help="grpo.py's flag; default on (grpo.py: on where its plan needs it)")
sub.choices["prefill"].set_defaults(G=1, max_new=64)
ep = sub.add_parser("engine", help="rollout on one long prompt: memory vs G, chunked prefill, sp=2 time")
ep.add_argument("--frames", type=int, default=8192, help="memory runs' video (2 tokens/frame); default 8192")
ep.add_argument("--sp-frames", type=int, default=4096, help="sp=1 vs sp=2 timing runs' video; default 4096")
ep.add_argument("--max-new", type=int, default=32, help="response tokens; default 32")
ep.add_argument("--repeats", type=int, default=3, help="timing runs per sp, alternating; default 3")
ep.add_argument("--config", default="small", help="generate's --config; default small")
gp = sub.add_parser("gpu", help="the prepared GPU check: the 7B's widths, a few layers, a rank's share")
gp.add_argument("--config", default="qwen2.5-vl-7b", help="mr_sp.plan_config name; default qwen2.5-vl-7b")
gp.add_argument("--layers", type=int, default=4, help="decoder layers at the real widths; default 4")
gp.add_argument("--frames", type=int, default=3600, help="the real job's video; default 3600")
gp.add_argument("--sp", type=int, default=8, help="the real job's sp: this GPU runs 1/sp of the video; "
                "default 8")
gp.add_argument("--G", type=int, default=8, help="rollouts per prompt; default 8")
gp.add_argument("--max-new", type=int, default=1024, help="response tokens; default 1024")
gp.add_argument("--size", type=int, default=0, help="square frames of this side (0: 448x224); default 0")
gp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                help="grpo.py's --dtype (bfloat16: autocast over fp32 weights); default bfloat16")
gp.add_argument("--device", default="cuda", help="cuda, or cpu: a smoke run at a miniature; default cuda")
rh = sub.add_parser("rehearse", help="the paper's job at a miniature: N processes, --fsdp, sp, kill, resume")
rh.add_argument("--nproc", type=int, default=8, help="processes (the real job's GPUs); default 8")
rh.add_argument("--init", default="tiny:qwen2.5-vl-7b", help="a miniature (model.TINY); default 7B's")
rh.add_argument("--layouts", default="8,plan", help="comma list of --sp values, 'plan': what `mr_sp.py "
                "plan --world NPROC` picks for the real model at --real-frames; default 8,plan")
rh.add_argument("--real", default="qwen2.5-vl-7b", help="the real model 'plan' lays out; default 7B")
rh.add_argument("--real-frames", type=int, default=3600, help="frames 'plan' lays out for; default 3600")
rh.add_argument("--frames", type=int, default=3600, help="frames of each video; default 3600")
rh.add_argument("--size", type=int, default=56, help="frame side, px; default 56 (2 video tokens a frame)")
rh.add_argument("--G", type=int, default=8, help="rollouts per prompt; default 8")
rh.add_argument("--max-new", type=int, default=16, help="response tokens; default 16")
rh.add_argument("--prompts", type=int, default=0, help="prompts a step (0: the largest dp); default 0")
rh.add_argument("--out", default="runs/rehearse", help="runs and the task go here; default runs/rehearse")
pp = sub.add_parser("planner", help="mr_sp.plan vs measured GRPO step peaks, each grpo.py option")
pp.add_argument("--frames", type=int, default=512, help="frames of the video; default 512")
pp.add_argument("--configs", default="tiny,small", help="step's --config, comma list; default tiny,small")
pp.add_argument("--max-new", type=int, default=32, help="response tokens; default 32")
rp = sub.add_parser("rollout", help="rollout tokens/s: vLLM vs our engine, same model and batch")
rp.add_argument("--model", default="tiny", help="HF folder or 'tiny' (built in code); default tiny")
rp.add_argument("--prompts", type=int, default=8, help="prompts per call; default 8")
rp.add_argument("--G", type=int, default=8, help="samples per prompt; default 8")
rp.add_argument("--max-new", type=int, default=64, help="max tokens per sample; default 64")
rp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; default 1.0")
rp.add_argument("--grid", default="16,8,8", help="video grid t,h,w in patches (t = frames/2); "
                "default 16,8,8 (32 frames of 112x112, 256 video tokens)")
rp.add_argument("--repeats", type=int, default=15, help="timed calls per engine, alternating; default 15")
rp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                help="the weights' dtype, ours and vLLM's (bfloat16: bf16 weights, no autocast); "
                "default float32")


CKPT = True  # what step and prefill run unless told (RESULTS.md's measurements: checkpointed)
MINI = grpo.ap.get_default("mini_batches")  # what step runs: a micro-batch holds a slice's rows


def ckpt_flag(on):
    return "--activation-checkpointing" if on else "--no-activation-checkpointing"


def sh(*cmd, log=sys.stdout, env=None):
    """Run a stage, streaming its output to log; its last line (JSON) is returned parsed."""
    print("$ " + " ".join(cmd), file=log, flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if log is sys.stdout else log,
                          text=True, env=env) as p:
        for line in p.stdout:
            print(line, end="", file=log, flush=True)
            lines.append(line)
    if p.returncode:
        raise SystemExit(f"{cmd[1]} failed with exit code {p.returncode}"
                         + ("" if log is sys.stdout else f" (see {log.name})"))
    return json.loads(lines[-1])


def learning_seed(seed, args):
    """SFT, evals, GRPO, eval for one seed. With --jobs > 1 seeds run side by side, each stage's
    output in OUT/seed<k>/log.txt, cores shared out (threads beyond the cores slow every job)."""
    d = os.path.join(args.out, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    side = args.jobs > 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))} if side else None
    with open(os.path.join(d, "log.txt"), "w") if side else contextlib.nullcontext(sys.stdout) as log:
        return learning_stages(seed, args, d, lambda *cmd: sh(sys.executable, *cmd, log=log, env=env))


# grpo.py's algorithms, each as its paper runs it where the defaults differ (GSPO's clip range is
# for its sequence ratio: arXiv 2507.18071 sec. 5.1; CISPO bounds its weights above only: arXiv
# 2506.13585)
ALGORITHMS = ("grpo=;drgrpo=--adv drgrpo --agg drgrpo;rloo=--adv rloo;"
              "reinforce++=--adv reinforce++;"
              "gspo=--loss gspo --agg seq --clip-low 3e-4 --clip-high 4e-4;"
              "cispo=--loss cispo --clip-low 1")


def learning_stages(seed, args, d, run):
    ev = ["eval.py", "--data", args.data, *args.eval_args.split()] + \
        (["--limit", str(args.limit)] if args.limit else [])
    sft_model = args.sft or f"{d}/sft/model"
    if not args.sft:
        run("sft.py", "--data", args.data, "--seed", str(seed), "--out", f"{d}/sft",
            *(["--steps", str(args.sft_steps)] if args.sft_steps else []), *args.sft_args.split())
    sft = run(*ev, "--model", sft_model, "--out", f"{d}/eval_sft")
    ctl = dict(blind_acc=None, blind_by_category=None, sft_sampled_acc=None, sft_pass8=None)
    if args.controls:
        blind = run(*ev, "--model", sft_model, "--blind", "--out", f"{d}/eval_blind")
        pass8 = run("eval.py", "--data", args.data, "--limit", "200", "--model", sft_model, "--n", "8",
                    "--temperature", "1.0", "--out", f"{d}/eval_pass8", *args.eval_args.split())
        ctl = dict(blind_acc=blind["accuracy"], blind_by_category=blind["by_category"],
                   sft_sampled_acc=pass8["accuracy"], sft_pass8=pass8["pass@8"])  # headroom for RL
    variants = {}
    for spec in (ALGORITHMS if args.variants == "algorithms" else args.variants).split(";"):
        name, _, extra = spec.partition("=")
        out = f"{d}/grpo" if name == "grpo" else f"{d}/grpo_{name}"
        run("grpo.py", "--init", sft_model, "--data", args.data, "--seed", str(seed),
            "--steps", str(args.grpo_steps), "--out", out, *args.grpo_args.split(), *extra.split())
        ev_grpo = run(*ev, "--model", f"{out}/model", "--out", f"{out}/eval")
        rewards = [json.loads(line)["reward"] for line in open(f"{out}/metrics.jsonl")]
        variants[name] = dict(acc=ev_grpo["accuracy"], by_category=ev_grpo["by_category"],
                              reward_first=statistics.mean(rewards[:10]),
                              reward_last=statistics.mean(rewards[-10:]))
    first = next(iter(variants.values()))
    res = dict(sft_acc=sft["accuracy"], grpo_acc=first["acc"], **ctl, n_test=sft["n_questions"],
               sft_by_category=sft["by_category"], grpo_by_category=first["by_category"],
               variants=variants)
    print(json.dumps({"seed": seed, **res}), flush=True)
    return res


def chance(rows):
    """{category: accuracy of a uniform guess}: 1 / options, or without options 1 / the answers the
    category's rows have (a number, a direction, yes or no)."""
    answers, out = collections.defaultdict(set), collections.defaultdict(list)
    for r in rows:
        answers[r["category"]].add(D.normalize(r["answer"]))
    for r in rows:
        out[r["category"]].append(1 / len(r["options"] or answers[r["category"]]))
    return {c: statistics.mean(v) for c, v in sorted(out.items())}


def learning(args):
    t0, seeds = time.time(), [int(s) for s in args.seeds.split(",")]
    D.prepare_task(args.data)  # once: seeds running side by side would each start writing it
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        res = dict(zip(seeds, pool.map(lambda s: learning_seed(s, args), seeds)))
    mean = lambda k: None if args.controls is False and k in ("blind_acc", "sft_pass8") else \
        statistics.mean(r[k] for r in res.values())  # noqa: E731
    num = lambda x, w: "-".rjust(w) if x is None else f"{x:{w}.3f}"  # noqa: E731
    print(f"{'seed':>4} | {'blind':>6} | {'sft':>6} | {'grpo':>6} | {'sft pass@8':>10}")
    for s, r in res.items():
        print(f"{s:>4} | {num(r['blind_acc'], 6)} | {r['sft_acc']:6.3f} | {r['grpo_acc']:6.3f} | "
              f"{num(r['sft_pass8'], 10)}")
    names = list(res[seeds[0]]["variants"])
    var = {v: {k: statistics.mean(r["variants"][v][k] for r in res.values())
               for k in ("acc", "reward_first", "reward_last")} for v in names}
    print(f"{'variant':>12} | {'held-out':>8} | {'reward first 10':>15} | {'last 10':>7}")
    for v, x in var.items():
        print(f"{v:>12} | {x['acc']:8.3f} | {x['reward_first']:15.3f} | {x['reward_last']:7.3f}")
    by_cat = {}  # category: chance, then means and standard deviations over seeds
    for c, ch in chance(D.load_rows(os.path.join(args.data, "test.jsonl"))).items():
        by_cat[c] = dict(chance=ch)
        for k in ("blind", "sft", "grpo"):
            xs = [(r[f"{k}_by_category"] or {}).get(c) for r in res.values()]
            if None not in xs:
                by_cat[c][k], by_cat[c][k + "_std"] = statistics.mean(xs), statistics.pstdev(xs)
    print(f"{'category':>12} | {'chance':>6} | {'blind':>6} | {'sft':>13} | {'grpo':>13}")
    for c, x in by_cat.items():
        pm = lambda k: f"{x[k]:.3f} +- {x[k + '_std']:.3f}" if k in x else "-".rjust(13)  # noqa: E731
        print(f"{c:>12} | {x['chance']:6.3f} | {x.get('blind', float('nan')):6.3f} | {pm('sft')} | {pm('grpo')}")
    print(json.dumps(dict(chance=by_cat and statistics.mean(x["chance"] for x in by_cat.values()),
                          by_category=by_cat, blind_acc=mean("blind_acc"), sft_acc=mean("sft_acc"),
                          grpo_acc=mean("grpo_acc"), grpo_minus_sft=mean("grpo_acc") - mean("sft_acc"),
                          sft_pass8=mean("sft_pass8"), n_test=mean("n_test"), seeds=seeds,
                          variants=var, per_seed=res, minutes=round((time.time() - t0) / 60, 1))))


# -----------------------------------------------------------------------------
# MR-SP measured. Memory is the process's resident set (VmRSS) and its high-water mark (VmHWM) from
# /proc/self/status; writing 5 to /proc/self/clear_refs resets the mark, so each phase gets its own
# peak. Workers run with MALLOC_MMAP_THRESHOLD_ = 1 MiB: glibc returns each freed large tensor to
# the system at once, so resident memory follows live tensors (like torch.cuda.max_memory_allocated
# on a GPU) instead of keeping freed memory in its heap, hiding one phase's memory from the next.

def rss():
    """(resident, peak resident since the last reset) of this process, bytes."""
    f = dict(line.split(":") for line in open("/proc/self/status"))
    return int(f["VmRSS"].split()[0]) * 1024, int(f["VmHWM"].split()[0]) * 1024


@contextlib.contextmanager
def measured(rec, name, base):
    """Time a phase and its peak resident memory above `base` (GiB) into rec[name]: a phase entered
    more than once adds up its times and keeps its largest peak."""
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak
        f.write("5")
    t0 = time.perf_counter()
    yield
    r = rec.setdefault(name, dict(s=0.0, gb=0.0))
    r["s"], r["gb"] = r["s"] + time.perf_counter() - t0, max(r["gb"], (rss()[1] - base) / 2**30)


def video_sample(frames, size, seed=0, proc=None):
    """Synthetic video as data.VideoDataset gives it: `frames` frames at 1 fps, about size x size px
    (sides rounded to the patches of proc, model.processor_config; default Qwen2.5-VL's)."""
    rng = np.random.default_rng(seed)
    sc = D.synth_scenario(rng, "absent", (len(D.synth_slots(frames)) - 1) // 2)
    pixels, grid = D.preprocess(D.synth_frames(sc, frames, size, rng), max_pixels=size * size,
                                min_pixels=size * size, proc=proc)
    return dict(id=f"bench-{frames}", kind="video", pixel_values=pixels, grid_thw=grid, second_per_grid=2.0,
                frame_times=list(map(float, range(frames))), question=sc["question"], options=sc["options"])


def worker_setup(args, ref=True):
    """Process groups, baseline memory (imports done), grpo.py's arguments for this workload (every
    algorithm setting its default), and the policy (and reference) as grpo.py builds them."""
    par = mr_sp.init_parallel(args.sp)
    M.tiny_tokenizer()
    init = "tiny" if args.config == "small" else args.config
    mr_sp.runtime_baseline(mr_sp.plan_config(init))  # its modeling module imported first, as grpo.py does
    base = rss()[0]  # the Python runtime: everything the planner counts comes above it
    gargs = grpo.ap.parse_args(
        ["--init", init, "--prompts", str(par.dp), "--G", str(args.G), "--max-new", str(args.max_new),
         "--micro-batch", str(args.G), "--sp", str(args.sp), "--seed", str(args.seed),
         "--prefill-chunk", str(args.prefill_chunk)]
        + ["--fsdp"] * args.fsdp + [ckpt_flag(args.activation_checkpointing)]
        + ([] if ref else ["--kl-coef", "0"]))
    policy = grpo.build_policy(gargs, par, init, **(mr_sp.SMALL if args.config == "small" else {}))
    return par, base, gargs, policy


def gather_max(x):
    """The largest of x over ranks (a no-op in one process)."""
    return mr_sp.all_reduce(torch.tensor([float(x)], dtype=torch.float64), "max").item()


def step(args):
    """grpo.step on one prompt, every algorithm setting grpo.py's default: G rollouts, old-policy
    and reference passes, the updates (--epochs passes over one micro-batch of the G rows); rewards:
    a stand-in text hash (not what is measured). An untimed warm-up step (16 frames), then --repeats
    rounds of --variants, alternating. Variant reencode is the baseline without the embedding cache
    (Video-R1, TRL): the vision tower reruns inside those phases for every rollout but the first and
    every row of every pass. Variant rowwise: the passes row by row (--no-shared-prefix), not one
    prompt's rows packed. One line per step, then JSON: median times, the first measured step's
    peak memory per rank above the Python runtime (and per phase), the variants' paired time ratio.
    A model that hears (tiny-qwen2.5-omni): the video's sound too, --frames seconds (1 fps), which
    reencode reruns the audio tower on as it reruns the vision tower."""
    # the videos before the baseline: grpo.py drops a sample's pixels once encoded (no reuse)
    proc = M.processor_config(mr_sp.plan_config(args.config))
    warm, s = video_sample(16, args.size, proc=proc), video_sample(args.frames, args.size, proc=proc)
    if "feature_extractor_type" in proc:  # a second of sound a frame
        warm, s = dict(warm, **M.random_audio(16)), dict(s, **M.random_audio(args.frames, seed=1))
    par, base, gargs, policy = worker_setup(args)
    model, tok, stats = policy.model, policy.tok, collections.Counter()
    reencodes = dict(rollout=args.G - 1, old=args.G, ref=args.G, update=args.G * gargs.epochs)

    def run(i, s, variant):
        rec = {}

        @contextlib.contextmanager
        def phase(name):
            with measured(rec, name, base):
                for _ in range(reencodes.get(name, 0) if variant == "reencode" else 0):
                    mr_sp.embeddings(model, s, par.sp_group)  # the towers: vision, and audio if it hears
                yield

        gargs.shared_prefix = variant != "rowwise"
        out = grpo.step(gargs, i, policy, lambda at: [s] * len(at), 0, par,
                        lambda text, row: zlib.crc32(text.encode()) % 1000 / 1000, stats, phase)[0]
        rec["step"] = dict(s=sum(r["s"] for r in rec.values()), gb=max(r["gb"] for r in rec.values()))
        return rec, out["response_len"] * args.G

    run(0, warm, "cache")  # warm-up, untimed
    res = {v: [] for v in args.variants.split(",")}
    for i in range(args.repeats):
        for v in list(res)[::1 if i % 2 == 0 else -1]:  # alternating, so a slow spell hits both
            rec, n_tok = run(i, s, v)
            res[v].append(dict(rec, tokens=n_tok))
            if par.rank == 0:
                print(f"{v} {i} | " + " | ".join(f"{k} {r['s']:.2f}s {r['gb']:.3f}GB"
                                                  for k, r in rec.items()), flush=True)
    out = dict(config=args.config, frames=args.frames, size=args.size, sp=args.sp, G=args.G,
               max_new=args.max_new, video_tokens=int(s["grid_thw"].prod()) // 4, repeats=args.repeats,
               audio_tokens=int(D.audio_tokens(s["feature_attention_mask"].sum()))
               if "input_features" in s else 0,
               prompt_tokens=len(M.prompt_of(tok, model.config, s, D.question_text(s))[0]))
    peak = max(r["step"]["gb"] for rs in res.values() for r in rs)  # phases reset the high-water mark
    out.update(variant_medians(res),  # and the peak absolute, Python runtime included
               peak_rss_gb_per_rank=gather_max(base / 2**30 + peak), runtime_gb=base / 2**30)
    if par.rank == 0:
        print(json.dumps(out), flush=True)
    mr_sp.shutdown()


def variant_medians(res):
    """`step`'s records by variant: the medians over repeats of the step's and each phase's time,
    the first measured step's peak memory (the largest rank's; rank 0's by phase) and tokens; with
    two variants, their paired time ratio."""
    out = {}
    for v, rs in res.items():
        phases = [k for k in rs[0] if k not in ("step", "tokens")]
        out[v] = dict(step_s=statistics.median(r["step"]["s"] for r in rs),
                      phases_s={k: round(statistics.median(r[k]["s"] for r in rs), 3) for k in phases},
                      first_step_gb_per_rank=gather_max(rs[0]["step"]["gb"]),
                      phases_gb_rank0={k: round(rs[0][k]["gb"], 4) for k in phases + ["step"]},
                      tokens=rs[0]["tokens"])
    if len(res) == 2:  # paired: the median over repeats of one variant's time over the other's
        (v0, r0), (v1, r1) = res.items()
        out[f"{v1}_over_{v0}"] = statistics.median(y["step"]["s"] / x["step"]["s"] for x, y in zip(r0, r1))
    return out


def long_prompt(args, model, tok):
    """A --frames video prompt (random embeddings as if encoded; 56x56 frames, 2 tokens a frame),
    as mr_sp.prepare returns it, and the generator that made it."""
    side = args.size // 28
    s = dict(kind="video", grid_thw=torch.tensor([[args.frames // 2, 2 * side, 2 * side]]),
             second_per_grid=2.0, frame_times=list(map(float, range(args.frames))))
    ids, pos = M.prompt_of(tok, model.config, s, "What happens in this video?")
    g = torch.Generator().manual_seed(args.seed)
    visual = torch.randn(args.frames // 2 * side ** 2, model.config.text_config.hidden_size, generator=g)
    return dict(s, prompt=ids, pos=pos, visual=visual), g


def generate(args):
    """One rollout call as grpo.py's collect makes it (mr_sp.rollout under `unsharded`): --G samples
    of --max-new tokens of one --frames prompt; --sp peers split the samples. Peak memory per rank
    above that before it (weights, prompt resident) and time; last line JSON."""
    par, base, gargs, policy = worker_setup(args, ref=False)
    prompt, _ = long_prompt(args, policy.model, policy.tok)
    rec = {}
    with measured(rec, "rollout", rss()[0]):
        toks, _, lens = mr_sp.unsharded(policy.run, mr_sp.rollout, policy.model, policy.tok, [prompt], args.G,
                                        [args.seed], max_new=args.max_new, sp_group=par.sp_group,
                                        chunk=gargs.prefill_chunk)
    out = dict(config=args.config, frames=args.frames, sp=args.sp, G=args.G,
               chunk=gargs.prefill_chunk, tokens=len(prompt["prompt"]), generated=int(lens.sum()),
               rollout_s=gather_max(rec["rollout"]["s"]),
               rollout_gb_per_rank=gather_max(rec["rollout"]["gb"]))
    if par.rank == 0:
        print(json.dumps(out), flush=True)
    mr_sp.shutdown()


def prefill(args):
    """One training pass (mr_sp.logprobs, forward and backward) of --G rows (default 1), a
    --frames video and --max-new token response: the pass's peak memory above that before it
    (weights, inputs resident), and at --sp > 1 the values a rank's forward all-to-alls carry a
    token of its own and layer, by layer kind."""
    par, base, gargs, policy = worker_setup(args, ref=False)
    model, tok = policy.model.train(), policy.tok
    prompt, g = long_prompt(args, model, tok)
    rows = [dict(prompt, response=torch.randint(20, 500, (args.max_new,), generator=g).tolist())
            for _ in range(args.G)]
    rec, sent, calls, send = {}, collections.Counter(), collections.Counter(), mr_sp._all_to_all

    def counted(x, group):  # a rank's all-to-all values a token of its own (x: (sp, B, ..., l, c))
        caller = sys._getframe(1).f_code.co_name  # ulysses_attention or ulysses_gdn: in, then out
        sent[caller] += x.numel() / x.shape[1] / x.shape[-2]
        calls[caller] += 1
        return send(x, group)
    mr_sp._all_to_all = counted
    with measured(rec, "pass", rss()[0]):
        lp, ent, mask = policy.run(mr_sp.logprobs, model, tok, rows, 1.0, par.sp_group)
        ((lp * mask).sum() / mask.sum()).backward()
    mr_sp._all_to_all = send
    out = dict(config=args.config, frames=args.frames, sp=args.sp, rows=args.G,
               tokens=len(prompt["prompt"]) + args.max_new, video_tokens=len(prompt["visual"]),
               pass_s=gather_max(rec["pass"]["s"]), pass_gb_per_rank=gather_max(rec["pass"]["gb"]),
               a2a_values_per_token_and_layer={k: v / (calls[k] / 2) for k, v in sent.items()},
               peak_rss_gb_per_rank=gather_max(rss()[1]) / 2**30)
    if par.rank == 0:
        print(json.dumps(out), flush=True)
    mr_sp.shutdown()


def launch(cmd, sp=1, quiet=False, timing=False, nproc=None):
    """Run `bench.py cmd` fresh, 1 thread a process (nproc, default sp, under torchrun when more
    than one); last line parsed.
    Memory runs set mmap threshold (above); timing runs don't: page faults slow rollouts 1.5x."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           **({} if timing else {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})}
    nproc = nproc or sp
    pre = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                               "--standalone", "--nproc_per_node", str(nproc)]
    full = pre + [os.path.abspath(__file__)] + [str(c) for c in cmd] + ["--sp", str(sp)]
    print("$ " + " ".join(full[1:]), flush=True)
    p = subprocess.run(full, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(full[1:])} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    if not quiet:
        print(p.stdout, end="", flush=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def engine_vs_naive(frames=256, G=8, max_new=16, repeats=3):
    """Rollout tokens/s, model.generate (the prompt prefilled once, its KV cache held once and
    shared by the G samples through model.shared_prefix_attention) vs generate_naive (G rows, all
    recomputed per token): greedy, no EOS (max_new tokens a row), medians."""
    torch.set_num_threads(1)
    model, tok = M.load("tiny", **mr_sp.SMALL)
    s = video_sample(frames, 56)
    prompt, pos = M.prompt_of(tok, model.config, s, D.question_text(s))
    ids, pos, mask, _ = M.layout([prompt], [pos], pad_id=tok.pad_token_id)
    with torch.no_grad():
        embeds = M.splice(model, ids, mr_sp.encode_visual(model, s))
    res = {}
    for i in range(repeats):
        for name, gen in (("engine", M.generate), ("naive", M.generate_naive)):
            t0 = time.perf_counter()
            toks = gen(model, embeds, pos, mask, n=G, max_new=max_new, temperature=0,
                       banned=M.banned_ids(tok))[0]
            res.setdefault(name, []).append(toks.numel() / (time.perf_counter() - t0))
            res.setdefault(name + "_tokens", toks)
    return dict(engine_tok_s=statistics.median(res["engine"]), naive_tok_s=statistics.median(res["naive"]),
                ratio=statistics.median(e / n for e, n in zip(res["engine"], res["naive"])),
                same_tokens=bool(torch.equal(res["engine_tokens"], res["naive_tokens"])),
                prompt_tokens=len(prompt), G=G, max_new=max_new)


def largest_fitting(sp, cap, known, step=256):
    """Largest multiple of step frames with training-pass peak per rank <= cap GiB: a line through
    the measured points predicts it; measuring it and one step up confirms (or moves) it."""
    pts = dict(known)
    if len(pts) < 2:
        f = max(step, min(pts) // 4 // step * step)
        pts[f] = launch(["prefill", "--frames", f], sp, quiet=True)["pass_gb_per_rank"]
    (f0, g0), (f1, g1) = sorted(pts.items())[:2]
    f = max(step, int((f0 + (cap - g0) * (f1 - f0) / (g1 - g0)) // step * step))
    for _ in range(6):
        for x in (f, f + step):
            if x not in pts:
                pts[x] = launch(["prefill", "--frames", x], sp, quiet=True)["pass_gb_per_rank"]
        if pts[f] <= cap < pts[f + step]:
            return f, {k: round(v, 3) for k, v in sorted(pts.items())}
        f = f + step if pts[f + step] <= cap else f - step
    raise SystemExit(f"sp={sp}: no frame count found under {cap} GiB: {pts}")


def mrsp(args):
    """All measured in this run (one thread per worker: two made timings several times noisier)."""
    t0, out = time.time(), {}
    # 1. embedding cache: step time without (vision rerun per rollout, per row per pass) / with it
    out["cache_speedup"], out["cache_step_s"] = {}, {}
    for f in [int(x) for x in args.frames.split(",")]:
        r = launch(["step", "--frames", f, "--variants", "cache,reencode",
                    "--repeats", args.repeats, "--max-new", args.max_new], timing=True)
        out["cache_speedup"][f] = round(r["reencode_over_cache"], 3)
        out["cache_step_s"][f] = dict(
            cache=round(r["cache"]["step_s"], 2), reencode=round(r["reencode"]["step_s"], 2),
            cache_phases=r["cache"]["phases_s"], reencode_phases=r["reencode"]["phases_s"])
    # 2. peak per rank of a training pass + backward of one row at a long sequence, sp=1 vs sp=2
    long = {sp: launch(["prefill", "--frames", args.long], sp) for sp in (1, 2)}
    out["sp2_peak_mem_ratio"] = round(long[2]["pass_gb_per_rank"] / long[1]["pass_gb_per_rank"], 3)
    out["long_pass"] = {sp: {k: r[k] for k in ("frames", "tokens", "pass_gb_per_rank", "pass_s")}
                        for sp, r in long.items()}
    # 3. the largest video whose training pass fits the cap, per rank
    for sp in (1, 2):
        out[f"max_frames_sp{sp}"], out[f"max_frames_sp{sp}_measured_gb"] = largest_fitting(
            sp, args.cap_gb, {args.long: long[sp]["pass_gb_per_rank"]})
    out["cap_gb"] = args.cap_gb
    # 4. the planner vs the long training passes above (bench.py planner: whole steps, each option)
    out["planner"] = {}
    for sp, r in long.items():
        est = mr_sp.plan(mr_sp.plan_config("small"), args.long, sp, 56 * 56,
                         r["tokens"] - r["video_tokens"] - 64, 1, 64, 1, "float32",
                         ckpt=CKPT)["training_pass"] / 2**30
        out["planner"][f"small_pass_{args.long}f_sp{sp}"] = dict(
            estimate_gb=round(est, 3), measured_gb=round(r["pass_gb_per_rank"], 3),
            ratio=round(est / r["pass_gb_per_rank"], 3))
    # 5. the rollout engine against the naive generate
    out["engine_vs_naive"] = engine_vs_naive()
    out["minutes"] = round((time.time() - t0) / 60, 1)
    print(f"{'frames':>6} | {'cache s':>8} | {'re-encode s':>11} | speedup")
    for f, x in out["cache_step_s"].items():
        print(f"{f:>6} | {x['cache']:8.2f} | {x['reencode']:11.2f} | {out['cache_speedup'][f]:.2f}x")
    print(f"sp=2 / sp=1 training-pass peak per rank at {args.long} frames: {out['sp2_peak_mem_ratio']:.3f}; "
          f"most frames under {args.cap_gb} GiB: sp=1 {out['max_frames_sp1']}, sp=2 {out['max_frames_sp2']}")
    for k, x in out["planner"].items():
        print(f"planner {k}: estimate {x['estimate_gb']:.3f} GiB, "
              f"measured {x['measured_gb']:.3f} GiB ({x['ratio']:.2f}x)")
    e = out["engine_vs_naive"]
    print(f"engine {e['engine_tok_s']:.0f} tok/s, naive {e['naive_tok_s']:.0f} tok/s "
          f"({e['ratio']:.1f}x), same tokens: {e['same_tokens']}")
    print(json.dumps(out))


def engine(args):
    """bench.py generate (--config, one prompt, G samples) run several ways to measure the engine:
    the rollout's peak memory at G=8 over G=1 and with the prefill chunked (grpo.py's default) over
    unchunked, at --frames; its time per rank at sp=2 over sp=1, alternating, paired median."""
    run = lambda *a, sp=1, timing=False: launch(  # noqa: E731
        ["generate", "--config", args.config, "--max-new", args.max_new, *a], sp, quiet=True, timing=timing)
    mem = {G: run("--frames", args.frames, "--G", G) for G in (1, 8)}
    whole = run("--frames", args.frames, "--G", 8, "--prefill-chunk", 0)
    times = {1: [], 2: []}
    for i in range(args.repeats):
        for sp in (1, 2)[::1 if i % 2 == 0 else -1]:
            times[sp].append(run("--frames", args.sp_frames, "--G", 8, sp=sp, timing=True)["rollout_s"])
    gb = lambda r: r["rollout_gb_per_rank"]  # noqa: E731
    cfg = mr_sp.plan_config(args.config)
    plan = lambda r: mr_sp.plan(cfg, args.frames, 1, frame_side(cfg) ** 2,  # noqa: E731
                                r["tokens"] - 2 * args.frames, r["G"], args.max_new, 1, "float32",
                                prefill_chunk=r["chunk"])["rollout"] / 2**30
    out = dict(tokens=mem[1]["tokens"], gb_G1=gb(mem[1]), gb_G8=gb(mem[8]),
               G8_over_G1=gb(mem[8]) / gb(mem[1]),
               gb_unchunked=gb(whole), chunked_over_unchunked=gb(mem[8]) / gb(whole),
               planner_over_measured={f"G{r['G']} chunk {r['chunk']}": plan(r) / gb(r)
                                      for r in (*mem.values(), whole)},
               sp_tokens=args.sp_frames * 2, s_sp1=times[1], s_sp2=times[2],
               sp2_over_sp1=statistics.median(b / a for a, b in zip(times[1], times[2])))
    print(json.dumps(out))


def gpu(args):
    """The prepared GPU check, one GPU: Qwen2.5-VL-7B's real widths (hidden 3,584, 28 query and 4 KV
    heads, untied 152k vocabulary, its 32-block vision tower) with --layers decoder layers, random
    weights (no download; the tiny tokenizer's ids, so text is meaningless: a stand-in reward), on
    one rank's share of the paper's job: a video of --frames / --sp frames (random pixels, no
    decoding; 448x224: 64 tokens a frame), the per-rank sequence of the 3,600-frame sp-8 layout.
    Two GRPO steps (grpo.step, bf16, G samples of --max-new tokens, one row a micro-batch); step 1
    records the SDPA kernel each phase ran (aten op names), step 2 is timed and measured: per phase
    the peak of torch.cuda.max_memory_allocated against the run's plan (mr_sp.plan_run), tokens/s of
    the training pass and of the rollout. The expected time comes from the plan's FLOPs at
    ASSUMED_FLOPS. Needs torch and transformers only. --device cpu: the same code at a miniature's
    size (tests/test_mr_sp.py runs it). Last line JSON."""
    import transformers
    dev, tok = torch.device(args.device), M.tiny_tokenizer()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu needs a CUDA GPU (--device cpu --config tiny:qwen2.5-vl-7b: a "
                         "smoke run)")
    cfg = gpu_config(args, dev, tok)
    frames = args.frames // args.sp // 2 * 2
    p = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size  # pixels a token's side
    h, w = (16 * p, 8 * p) if args.size == 0 else (args.size, args.size)  # 448x224: 16 x 8 tokens
    gargs = grpo.ap.parse_args(["--init", "tiny", "--prompts", "1", "--G", str(args.G), "--max-new",
                                str(args.max_new), "--micro-batch", "1", "--dtype", args.dtype,
                                "--frames", str(frames), "--max-pixels", str(h * w),
                                "--no-dynamic-sampling", "--out", os.path.join("runs", "bench_gpu")])
    par = mr_sp.init_parallel(1)
    plan = mr_sp.plan_start(gargs, cfg, par)  # resolves --activation-checkpointing; stops if over
    with torch.device(dev):
        model = getattr(transformers, M.FAMILIES[cfg.model_type] + "ForConditionalGeneration")(cfg).eval()
    ref = grpo.copy_ref(model)
    params = grpo.rl_params(model)
    if gargs.activation_checkpointing:
        model.gradient_checkpointing_enable()
    policy = grpo.Policy(model, tok, params, torch.optim.AdamW(params, lr=gargs.lr), ref)
    s = gpu_sample(cfg, frames, h, w)
    recs, kernels = gpu_steps(args, dev, gargs, policy, s, par)
    gpu_report(args, cfg, gargs, plan, frames, recs, kernels, dev)


def gpu_config(args, dev, tok):
    """The checked model's config: --config's shapes, --layers decoder layers, tiny's token ids."""
    cfg, ids = mr_sp.plan_config(args.config), M.tiny_config(tok)
    cfg.text_config.num_hidden_layers = args.layers
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(cfg, k, getattr(ids, k))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg.text_config, k, getattr(ids.text_config, k))
    cfg._attn_implementation = M.attn_implementation(dev)
    return cfg


def gpu_sample(cfg, frames, h, w):
    """The rank's share of the video: random pixel rows of `frames` frames of h x w."""
    g = torch.Generator().manual_seed(0)
    vc = cfg.vision_config
    grid = [frames // vc.temporal_patch_size, h // vc.patch_size, w // vc.patch_size]
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * vc.temporal_patch_size * vc.patch_size ** 2,
                         generator=g)
    return dict(id="gpu", question="What happens in this video?", options=["a", "b", "c", "d"],
                kind="video", pixel_values=pixels, grid_thw=torch.tensor([grid]), second_per_grid=2.0,
                frame_times=[i / 2 for i in range(frames)])


def gpu_steps(args, dev, gargs, policy, s, par):
    """Two GRPO steps on sample s: their records, and the attention ops each phase ran in step 1."""
    from torch.utils._python_dispatch import TorchDispatchMode
    kernels = collections.defaultdict(set)

    class Ops(TorchDispatchMode):  # the attention ops a phase runs (which SDPA kernel it took)
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            if "attention" in func.__name__ or "scaled_dot" in func.__name__:
                kernels[self.name].add(func.__name__.split(".")[0])
            return func(*a, **(kw or {}))

    recs = []
    for i in range(2):
        def phase(name, i=i):
            return Ops(name) if i == 0 else contextlib.nullcontext()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, torch.bfloat16, enabled=args.dtype == "bfloat16", cache_enabled=False):
            rec = grpo.step(gargs, i, policy, lambda at: [dict(s)], 0, par,
                            lambda text, row: zlib.crc32(text.encode()) % 1000 / 1000,
                            collections.Counter(), phase)[0]
        rec["seconds"] = time.perf_counter() - t0
        recs.append(rec)
        print(f"step {i + 1}: {rec['seconds']:.1f} s, peak {rec['peak_gb']:.1f} GiB", flush=True)
    return recs, kernels


def gpu_report(args, cfg, gargs, plan, frames, recs, kernels, dev):
    """Step 2 against the plan: a line per phase, the speeds, and the JSON line."""
    rec, gib = recs[1], plan["gib"]
    held = sum(gib[k] for k in ("weights", "ref", "adam", "video_embeds"))
    planned = {k: held + gib[PLAN_PHASES[k]] + (gib["grads"] if k == "update" else 0.0) for k in PLAN_PHASES}
    L, rows = plan["tokens"], args.G
    passes = gargs.epochs  # training passes over the rows
    out = dict(config=args.config, layers=args.layers, frames=frames, tokens=L, G=args.G,
               max_new=args.max_new,
               device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               activation_checkpointing=gargs.activation_checkpointing, step_s=round(rec["seconds"], 1),
               expected_step_s=round(expected_seconds(cfg, L, rows, passes,
                                                      gargs.activation_checkpointing), 1),
               peak_gb={k: round(rec["peak_gb_ranks"][k][0], 2) for k in PLAN_PHASES},
               planned_gb={k: round(v, 2) for k, v in planned.items()},
               planned_total_gb=gib["total"], kernels={k: sorted(v) for k, v in kernels.items()},
               train_tok_s=round(rows * L * passes / rec["time_update"]),
               rollout_tok_s=round(rec["response_len"] * rows / rec["time_rollout"]),
               seconds={k[5:]: round(v, 2) for k, v in rec.items() if k.startswith("time_")})
    for k in PLAN_PHASES:
        print(f"{k:>7} | peak {out['peak_gb'][k]:6.2f} GiB | planned {out['planned_gb'][k]:6.2f} | "
              f"{', '.join(out['kernels'].get(k, [])) or '-'}", flush=True)
    print(f"training pass {out['train_tok_s']:,} tok/s, rollout {out['rollout_tok_s']:,} tok/s; step "
          f"{out['step_s']} s (expected {out['expected_step_s']} s at {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s)")
    print(json.dumps(out))


ASSUMED_FLOPS = 400e12  # bf16 on an H100 at about 40% of its 989 TFLOP/s dense peak


def expected_seconds(cfg, L, rows, passes, ckpt, flops=ASSUMED_FLOPS):
    """A GRPO step's matmul time at `flops`: the old and reference passes (forward), the training
    passes (forward, backward 2x, and a recompute with checkpointing) over rows of L tokens, with
    causal attention's scores (4 L d per token a layer, halved). Encode and rollout are left out."""
    t = cfg.get_text_config()
    per_token = mr_sp.model_costs(cfg)["lm_flops"] + 2 * L * t.hidden_size * t.num_hidden_layers
    return rows * L * per_token * (2 + passes * (3 + ckpt)) / flops


def frame_side(cfg):
    """The side in pixels of a frame of 2 x 2 tokens (a temporal group's, the planner's
    --max-pixels): 56 for Qwen2/2.5-VL's 14-pixel patches, 64 for Qwen3's 16."""
    return 2 * cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size


def planner(args):
    """mr_sp.plan's peak per rank against bench.py step's measured one (G 8 in one micro-batch,
    fp32, `frame_side` frames): --configs, sp 1 and 2, grpo.py's options one at a time (--fsdp runs
    2 processes: dp 2 at sp 1). A table, then JSON {case: estimate_gb, measured_gb, ratio}."""
    out = {}
    for config in args.configs.split(","):
        cfg = mr_sp.plan_config(config)
        side = frame_side(cfg)
        for sp in (1, 2):
            for opt in ("plain", "fsdp", "checkpointing"):
                nproc, ckpt = 2 if opt == "fsdp" else sp, opt == "checkpointing"
                r = launch(["step", "--config", config, "--frames", args.frames, "--size", side,
                            "--max-new", args.max_new, ckpt_flag(ckpt)] + ["--fsdp"] * (opt == "fsdp"), sp,
                           quiet=True, nproc=nproc)
                m = mr_sp.plan(cfg, args.frames, sp, side * side,
                               r["prompt_tokens"] - r["video_tokens"], 8, args.max_new, 8,
                               "float32", True, nproc, opt == "fsdp", ckpt, mini_batches=MINI)
                got = r["cache"]["first_step_gb_per_rank"]
                out[f"{config} sp{sp} {opt}"] = dict(estimate_gb=round(m["peak"] / 2**30, 3),
                                                     measured_gb=round(got, 3),
                                                     ratio=round(m["peak"] / 2**30 / got, 3))
                print(f"{config} sp{sp} {opt}: {json.dumps(out[f'{config} sp{sp} {opt}'])}", flush=True)
    print(json.dumps(out))


def hour(args):
    """One GRPO step on 3,600 frames (an hour at 1 fps), tiny model, sp=2: step under torchrun."""
    t0 = time.time()
    r = launch(["step", "--config", "tiny", "--frames", args.frames, "--G", args.G,
                "--max-new", args.max_new, "--size", args.size], sp=2)
    c = r["cache"]
    est = mr_sp.plan(mr_sp.plan_config("tiny"), args.frames, 2, args.size * args.size,
                     r["prompt_tokens"] - r["video_tokens"], args.G, args.max_new, args.G,
                     "float32", ckpt=CKPT, mini_batches=MINI)["peak"] / 2**30
    print(f"{args.frames} frames ({r['video_tokens']:,} video tokens), G={args.G}, max_new={args.max_new}, "
          f"sp=2: step {c['step_s']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in c["phases_s"].items())
          + f"), peak {r['peak_rss_gb_per_rank']:.2f} GiB per rank ({c['first_step_gb_per_rank']:.2f} above "
          f"the runtime; the planner said {est:.2f})")
    print(json.dumps(dict(
        frames=args.frames, step_s=round(c["step_s"], 2),
        peak_mem_gb_per_rank=round(r["peak_rss_gb_per_rank"], 3),
        above_runtime_gb_per_rank=round(c["first_step_gb_per_rank"], 3), planner_gb=round(est, 3),
        phases_s=c["phases_s"], phases_gb_rank0=c["phases_gb_rank0"], video_tokens=r["video_tokens"],
        G=args.G, max_new=args.max_new, size=args.size, sp=2, minutes=round((time.time() - t0) / 60, 1))))


def rehearse(args):
    """The paper's job at a miniature, on this CPU: grpo.py under torchrun on --nproc processes
    (gloo), --fsdp, at each layout of --layouts, on a task of --frames-frame videos (mp4, decoded as
    a user's are), two GRPO steps (lr 1e-4, one update a step, no dynamic sampling: the same updates
    on any number of ranks). Each layout: a run SIGKILLed after its step-1 checkpoint, whose weights
    are compared with one process's after one step (max |diff|, and how many differ by over 1e-5),
    then resumed and compared with the uninterrupted run (bitwise); per rank and phase, peak memory
    above the runtime (grpo.py's peak_gb_ranks) against the run's own plan (plan.json). Last line
    JSON."""
    t0 = time.time()
    layouts, prompts, base, env = rehearse_setup(args)
    grpo_run = functools.partial(rehearse_run, base, env)
    one = os.path.join(args.out, "one")
    res = dict(init=args.init, nproc=args.nproc, frames=args.frames, prompts=prompts, G=args.G,
               max_new=args.max_new, one_process_s=round(grpo_run(one, 1, "--steps", "1"), 1), layouts={})
    w1 = rehearse_weights(one)
    for sp in layouts:
        name = f"sp{sp}"
        r = res["layouts"][name] = rehearse_layout(args, sp, grpo_run, w1)
        print(f"{name} (dp {r['dp']}): max |w - one process| {r['max_weight_diff_vs_one']:.2e}, resumed "
              f"bitwise {r['resumed_bitwise']}, {r['run_s']:.0f} s", flush=True)
        for phase, m in r["memory"].items():
            print(f"  {phase:>7} | measured GiB per rank {m['measured']} | planned {m['planned']} | "
                  f"ratio {m['ratio_min']:.2f}-{m['ratio_max']:.2f}", flush=True)
    res["minutes"] = round((time.time() - t0) / 60, 1)
    print(json.dumps(res))


def rehearse_setup(args):
    """The layouts to run (--layouts, 'plan' picked), prompts a step, grpo.py's common flags (the
    task written if absent) and the workers' environment."""
    real = mr_sp.plan_parser().parse_args(["plan", "--config", args.real, "--frames",
                                           str(args.real_frames), "--fsdp"])
    picked = lambda: next(iter(mr_sp.pick_layout(real, mr_sp.plan_config(args.real), args.nproc,  # noqa: E731
                                                 real.gpu_gb * 2**30)))
    layouts = [picked() if x == "plan" else int(x) for x in args.layouts.split(",")]
    layouts = list(dict.fromkeys(layouts))  # "plan" may pick one already listed
    prompts = args.prompts or max(args.nproc // sp for sp in layouts)
    data = os.path.join(args.out, "task")
    if not os.path.exists(os.path.join(data, "train.jsonl")):
        D.synth(data, n=4 * prompts, n_frames=args.frames, seed=0, size=args.size, n_test=0)
    base = ["grpo.py", "--init", args.init, "--data", data, "--part", "all", "--frames", str(args.frames),
            "--max-pixels", str(args.size * args.size), "--prompts", str(prompts), "--G", str(args.G),
            "--max-new", str(args.max_new), "--mini-batches", "1", "--epochs", "1", "--lr", "1e-4",
            "--steps", "2",
            "--no-dynamic-sampling", "--reward", "toy_rewards:length"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                          os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")])}
    return layouts, prompts, base, env


def rehearse_run(base, env, out, nproc, *extra, kill=False):
    """grpo.py with `base` flags and `extra` on nproc processes into out: its seconds; kill: SIGKILLed
    once its step-1 checkpoint is written."""
    pre = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else [])
    cmd = pre + base + list(extra) + ["--out", out]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t = time.time()
    if not kill:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return time.time() - t
    p = subprocess.Popen(cmd + ["--save-every", "1"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    state = os.path.join(out, "model", "state.pt")
    while not os.path.exists(state) and p.poll() is None:
        time.sleep(0.05)
    kill_tree(p.pid)  # in step 2
    p.wait()
    return time.time() - t


def rehearse_weights(d):
    from safetensors.torch import load_file
    return load_file(os.path.join(d, "model", "model.safetensors"))


def rehearse_layout(args, sp, grpo_run, w1):
    """One layout at --fsdp: its run, a run killed after step 1 (its weights vs one process's
    step, w1) and resumed (bitwise vs the uninterrupted run), and its memory against its plan."""
    name, flags = f"sp{sp}", ["--fsdp", "--sp", str(sp)]
    d, killed = os.path.join(args.out, name), os.path.join(args.out, name + "-killed")
    shutil.rmtree(killed, ignore_errors=True)
    r = dict(sp=sp, dp=args.nproc // sp, run_s=round(grpo_run(d, args.nproc, *flags), 1))
    grpo_run(killed, args.nproc, *flags, kill=True)  # its checkpoint: step 1's weights
    state = torch.load(os.path.join(killed, "model", "state.pt"), weights_only=True)
    r["killed_after_step"] = state["step"]
    w = rehearse_weights(killed)
    diff = {k: (w[k] - w1[k]).abs() for k in w1}
    r["max_weight_diff_vs_one"] = max(x.max().item() for x in diff.values())
    r["weights_over_1e-5"] = sum(int((x > 1e-5).sum()) for x in diff.values())
    r["weights"] = sum(x.numel() for x in diff.values())
    r["resume_s"] = round(grpo_run(killed, args.nproc, *flags, "--resume"), 1)
    w, wk = rehearse_weights(d), rehearse_weights(killed)
    r["resumed_bitwise"] = all(torch.equal(w[k], wk[k]) for k in w)
    recs = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    plan = json.load(open(os.path.join(d, "plan.json")))
    r["memory"] = memory_vs_plan(recs, plan)
    r["tokens_per_rank"] = plan.get("tokens_per_rank")
    return r

def kill_tree(pid):
    """SIGKILL a process and its children at once, as a node failure would: torchrun's workers run
    in sessions of their own, so killing the launcher's process group leaves them running."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    for k in kids + [pid]:
        try:
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while any(map(_alive, kids)):  # dead before the caller goes on
        time.sleep(0.01)


def _alive(pid):
    """A process that exists and is not a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# the planner's phase for each of grpo.step's (and the state held through all of them)
PLAN_PHASES = dict(encode="encode", rollout="rollout", old="no_grad_pass", ref="no_grad_pass",
                   update="training_pass")


def memory_vs_plan(recs, plan):
    """Per phase: each rank's measured peak (the first step's; GiB) and the plan's (state held all
    step + the phase's own), and their ratios' range over ranks."""
    g = plan["gib"]
    held = sum(g[k] for k in ("weights", "ref", "adam", "video_embeds"))
    out = {}
    for phase, key in PLAN_PHASES.items():
        got = recs[0]["peak_gb_ranks"][phase]
        want = held + g[key] + (g["grads"] if key == "training_pass" else 0.0)
        out[phase] = dict(measured=[round(x, 3) for x in got], planned=round(want, 3),
                          ratio_min=round(min(got) / want, 3), ratio_max=round(max(got) / want, 3))
    got = [max(recs[0]["peak_gb_ranks"][p][i] for p in PLAN_PHASES) for i in range(len(got))]
    out["step"] = dict(measured=[round(x, 3) for x in got], planned=round(g["peak"], 3),
                       ratio_min=round(min(got) / g["peak"], 3), ratio_max=round(max(got) / g["peak"], 3))
    return out


def rollout(args):
    model, tok = M.load(args.model, dtype=getattr(torch, args.dtype))
    grid = torch.tensor([[int(x) for x in args.grid.split(",")]])
    s = M.random_samples(model, [grid[0].tolist()])[0]
    prompts = [mr_sp.prepare(model, tok, s, f"Question {i}: what happens in this video?")
               for i in range(args.prompts)]
    engines = dict(engine=None, vllm=mr_sp.vllm_engine(model, tok, args.model, args.dtype))

    def call(name, k):  # tokens generated by one rollout call
        seeds = [mr_sp.seed_of(k, i) for i in range(args.prompts)]
        return int(mr_sp.rollout(model, tok, prompts, args.G, seeds, engines[name],
                                 max_new=args.max_new, temperature=args.temperature)[2].sum())

    res = {"engine": [], "vllm": []}
    call("engine", -1), call("vllm", -1)  # warm-up: first calls allocate and (vLLM) compile
    for k in range(args.repeats):
        for name in res:
            t0, c0 = time.time(), time.process_time()
            n = call(name, k)
            res[name].append((n, time.time() - t0, time.process_time() - c0))
            _, wall, cpu = res[name][-1]
            print(f"{name:>6} | call {k} | {n} tokens | {wall:.2f} s | {n / wall:.0f} tok/s | "
                  f"cpu {cpu:.2f} s | {n / cpu:.0f} tok/cpu-s", flush=True)
    tps = {k: [n / t for n, t, _ in v] for k, v in res.items()}
    cps = {k: [n / c for n, _, c in v] for k, v in res.items()}
    ratio = statistics.median(v / e for v, e in zip(tps["vllm"], tps["engine"]))
    cpu_ratio = statistics.median(v / e for v, e in zip(cps["vllm"], cps["engine"]))
    print(f"vLLM / our engine, median of {args.repeats} pairs: {ratio:.2f}x wall, {cpu_ratio:.2f}x cpu time")
    print(json.dumps(dict(vllm_tok_s=round(statistics.median(tps["vllm"]), 1),
                          engine_tok_s=round(statistics.median(tps["engine"]), 1), ratio=round(ratio, 2),
                          vllm_tok_cpu_s=round(statistics.median(cps["vllm"]), 1),
                          engine_tok_cpu_s=round(statistics.median(cps["engine"]), 1),
                          cpu_ratio=round(cpu_ratio, 2), model=args.model, prompts=args.prompts,
                          G=args.G, max_new=args.max_new, video_tokens=M.n_visual_tokens(grid),
                          threads=torch.get_num_threads(), calls=args.repeats,
                          vllm_tok_s_all=[round(x, 1) for x in tps["vllm"]],
                          engine_tok_s_all=[round(x, 1) for x in tps["engine"]])))


if __name__ == "__main__":
    args = ap.parse_args()
    {"learning": learning, "step": step, "prefill": prefill, "mrsp": mrsp, "hour": hour,
     "rollout": rollout, "planner": planner, "generate": generate, "engine": engine,
     "gpu": gpu, "rehearse": rehearse}[args.cmd](args)
