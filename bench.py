"""Benchmarks: long runs that measure, never part of the tests.

    python bench.py learning                 # SFT -> GRPO on the synthetic task, 3 seeds (about an hour on 2 cores)
    python bench.py learning --seeds 0 --sft-steps 100 --grpo-steps 10     # a quick look
    $(bash .ci/vllm_env | tail -1) bench.py rollout      # vLLM (CPU build) vs our engine, rollout tokens/s

learning: for each seed, SFT on the SFT third of train, greedy eval on the held-out split (and a
blind control: the same model with every video blanked), the SFT model's pass@8 on 200 held-out rows
(headroom for RL),
GRPO on the other two thirds from that checkpoint, greedy eval again. The last line is JSON with
chance, blind_acc, sft_acc, grpo_acc (held-out means over seeds), per-seed values and seeds.

rollout: the same model, prompts and cached video embeddings through our engine (mr_sp.rollout) and
vLLM (mr_sp.vllm_rollout), G samples per prompt, alternating, after one warm-up call each. Tokens/s
counts the generated tokens (up to and including EOS) over the wall time of the call, and over the
CPU time of this process (less sensitive to other jobs on a shared machine); ratios are medians of
the per-pair ratios. Runs where vllm imports (its own environment on CPU: bash .ci/vllm_env). The
last line is JSON with vllm_tok_s, engine_tok_s (medians over calls, wall time), ratio, cpu_ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
sub = ap.add_subparsers(dest="cmd", required=True)
lp = sub.add_parser("learning", help="does GRPO improve on SFT? (held-out accuracy, mean of seeds)")
lp.add_argument("--seeds", default="0,1,2", help="comma list of training seeds; default 0,1,2")
lp.add_argument("--data", default="data/synth", help="task folder (written if absent); default data/synth")
lp.add_argument("--out", default="runs/bench_learning", help="runs go to OUT/seed<k>/{sft,grpo}")
lp.add_argument("--sft-steps", type=int, default=300, help="SFT steps; default 300")
lp.add_argument("--grpo-steps", type=int, default=100, help="GRPO steps; default 100")
lp.add_argument("--grpo-args", default="", help="extra grpo.py arguments, quoted")
lp.add_argument("--sft-args", default="", help="extra sft.py arguments, quoted")
lp.add_argument("--limit", type=int, default=0, help="held-out rows to evaluate (0 = all)")
rp = sub.add_parser("rollout", help="rollout tokens/s: vLLM vs our engine, same model and batch")
rp.add_argument("--model", default="tiny", help="HF folder, or 'tiny' (built in code); default tiny")
rp.add_argument("--prompts", type=int, default=8, help="prompts per call; default 8")
rp.add_argument("--G", type=int, default=8, help="samples per prompt; default 8")
rp.add_argument("--max-new", type=int, default=64, help="max tokens per sample; default 64")
rp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; default 1.0")
rp.add_argument("--grid", default="16,8,8", help="video grid t,h,w in patches (t = frames/2); default 16,8,8 "
                "(32 frames of 112x112, 256 video tokens)")
rp.add_argument("--repeats", type=int, default=15, help="timed calls per engine, alternating; default 15")
rp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype; default float32")


def sh(*cmd):
    """Run a stage, streaming its output; its last line (JSON) is returned parsed."""
    print("$ " + " ".join(cmd), flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
        for line in p.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if p.returncode:
        raise SystemExit(f"{cmd[1]} failed with exit code {p.returncode}")
    return json.loads(lines[-1])


def learning(args):
    py, res, t0 = sys.executable, {}, time.time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        d = os.path.join(args.out, f"seed{seed}")
        ev = [py, "eval.py", "--data", args.data] + (["--limit", str(args.limit)] if args.limit else [])
        sh(py, "sft.py", "--data", args.data, "--seed", str(seed), "--steps", str(args.sft_steps),
           "--out", f"{d}/sft", *args.sft_args.split())
        sft = sh(*ev, "--model", f"{d}/sft/model", "--out", f"{d}/eval_sft")
        blind = sh(*ev, "--model", f"{d}/sft/model", "--blind", "--out", f"{d}/eval_blind")
        pass8 = sh(py, "eval.py", "--data", args.data, "--limit", "200", "--model", f"{d}/sft/model", "--n", "8",
                   "--temperature", "1.0", "--out", f"{d}/eval_pass8")  # headroom; 200 rows keep it cheap
        sh(py, "grpo.py", "--init", f"{d}/sft/model", "--data", args.data, "--seed", str(seed),
           "--steps", str(args.grpo_steps), "--out", f"{d}/grpo", *args.grpo_args.split())
        grpo = sh(*ev, "--model", f"{d}/grpo/model", "--out", f"{d}/eval_grpo")
        res[seed] = dict(sft_acc=sft["accuracy"], blind_acc=blind["accuracy"], grpo_acc=grpo["accuracy"],
                         sft_sampled_acc=pass8["accuracy"], sft_pass8=pass8["pass@8"],
                         sft_by_category=sft["by_category"], grpo_by_category=grpo["by_category"])
        print(json.dumps({"seed": seed, **res[seed]}), flush=True)
    mean = lambda k: statistics.mean(r[k] for r in res.values())  # noqa: E731
    print(f"{'seed':>4} | {'blind':>6} | {'sft':>6} | {'grpo':>6} | {'sft pass@8':>10}")
    for s, r in res.items():
        print(f"{s:>4} | {r['blind_acc']:6.3f} | {r['sft_acc']:6.3f} | {r['grpo_acc']:6.3f} | {r['sft_pass8']:10.3f}")
    print(json.dumps(dict(chance=0.25, blind_acc=mean("blind_acc"), sft_acc=mean("sft_acc"), grpo_acc=mean("grpo_acc"),
                          grpo_minus_sft=mean("grpo_acc") - mean("sft_acc"), sft_pass8=mean("sft_pass8"),
                          n_test=sft["n_questions"], seeds=list(res), per_seed=res,
                          minutes=round((time.time() - t0) / 60, 1))))


def rollout(args):
    import shutil
    import tempfile

    import torch

    import model as M
    import mr_sp
    model, tok = M.load(args.model, dtype=getattr(torch, args.dtype))
    grid = torch.tensor([[int(x) for x in args.grid.split(",")]])
    pixels = M.random_video_batch(model, tok, [grid[0].tolist()])[0]
    video = mr_sp.encode(model, dict(pixel_values=pixels, grid_thw=grid))  # one video, cached, shared by all prompts
    prompts = [M.build_prompt(tok, f"Question {i}: what happens in this video?", M.n_video_tokens(grid))
               for i in range(args.prompts)]
    pos = [M.positions(p, grid, [2.0], model.config) for p in prompts]
    path = args.model
    if not os.path.isdir(path):  # the tiny model: written where vLLM loads it from, for this run
        path = os.path.join(tempfile.mkdtemp(), "model")
        M.save(model, tok, path)
    llm = mr_sp.vllm_engine(path, args.dtype)
    gen = dict(max_new=args.max_new, temperature=args.temperature)

    def ours(k):
        gens = [mr_sp.generator(k, i) for i in range(args.prompts)]
        return mr_sp.rollout(model, tok, prompts, pos, [video] * args.prompts, args.G, generator=gens, **gen)[2]

    def theirs(k):
        seeds = [mr_sp.seed_of(k, i) for i in range(args.prompts)]
        return mr_sp.vllm_rollout(llm, tok, prompts, [video] * args.prompts, [grid] * args.prompts,
                                  [2.0] * args.prompts, args.G, seeds=seeds, **gen)[2]

    res = {"engine": [], "vllm": []}
    ours(-1), theirs(-1)  # warm-up: first calls allocate and (vLLM) compile
    for k in range(args.repeats):
        for name, fn in (("engine", ours), ("vllm", theirs)):
            t0, c0 = time.time(), time.process_time()
            n = int(fn(k).sum())
            res[name].append((n, time.time() - t0, time.process_time() - c0))
            _, wall, cpu = res[name][-1]
            print(f"{name:>6} | call {k} | {n} tokens | {wall:.2f} s | {n / wall:.0f} tok/s | "
                  f"cpu {cpu:.2f} s | {n / cpu:.0f} tok/cpu-s", flush=True)
    tps = {k: [n / t for n, t, _ in v] for k, v in res.items()}
    cps = {k: [n / c for n, _, c in v] for k, v in res.items()}
    ratio = statistics.median(v / e for v, e in zip(tps["vllm"], tps["engine"]))
    cpu_ratio = statistics.median(v / e for v, e in zip(cps["vllm"], cps["engine"]))
    print(f"vLLM / our engine, median of {args.repeats} pairs: {ratio:.2f}x wall time, {cpu_ratio:.2f}x cpu time")
    print(json.dumps(dict(vllm_tok_s=round(statistics.median(tps["vllm"]), 1),
                          engine_tok_s=round(statistics.median(tps["engine"]), 1), ratio=round(ratio, 2),
                          vllm_tok_cpu_s=round(statistics.median(cps["vllm"]), 1),
                          engine_tok_cpu_s=round(statistics.median(cps["engine"]), 1), cpu_ratio=round(cpu_ratio, 2),
                          model=args.model, prompts=args.prompts, G=args.G, max_new=args.max_new,
                          video_tokens=M.n_video_tokens(grid), threads=torch.get_num_threads(), calls=args.repeats,
                          vllm_tok_s_all=[round(x, 1) for x in tps["vllm"]],
                          engine_tok_s_all=[round(x, 1) for x in tps["engine"]])))
    if path != args.model:
        shutil.rmtree(os.path.dirname(path))


if __name__ == "__main__":
    args = ap.parse_args()
    {"learning": learning, "rollout": rollout}[args.cmd](args)
