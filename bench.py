"""Benchmarks: long runs that measure, never part of the tests.

    python bench.py learning                 # SFT -> GRPO on the synthetic task, 3 seeds (about an hour on 2 cores)
    python bench.py learning --seeds 0 --sft-steps 100 --grpo-steps 10     # a quick look

learning: for each seed, SFT on the SFT third of train, greedy eval on the held-out split (and a
blind control: the same model with every video blanked), the SFT model's pass@8 on 200 held-out rows
(headroom for RL),
GRPO on the other two thirds from that checkpoint, greedy eval again. The last line is JSON with
chance, blind_acc, sft_acc, grpo_acc (held-out means over seeds), per-seed values and seeds.
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


if __name__ == "__main__":
    args = ap.parse_args()
    {"learning": learning}[args.cmd](args)
