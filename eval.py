"""Evaluate a policy on a QA split: accuracy overall, by category and by frame count.

    python eval.py  # runs/grpo/model (else runs/sft/model) on the synthetic test split
    python eval.py --model runs/sft/model --frames 16,32,64
    python eval.py --model runs/sft/model,runs/grpo/model    # the before/after table
    torchrun --nproc_per_node 2 eval.py --model runs/grpo/model
    torchrun --nproc_per_node 2 eval.py --model runs/grpo/model --sp 2  # 2 ranks encode each video
    python eval.py --model /path/to/ckpt --data /path/to/LongVideo-Reason --split test --n 8 --temperature 1.0
    python eval.py --model runs/sft/model --data data/sound --mute  # audio-blind control (--blind: video)
    python eval.py --model runs/sft/model --split train --part rl --n 8 --temperature 1 --keep data/rl
    $(bash .ci/vllm_env | tail -1) eval.py --engine vllm   # on vLLM's CPU build (own environment)

Greedy by default (else --n samples at --temperature: accuracy is the mean over samples, plus
pass@n). --keep DIR is the difficulty filter for RL: each row's pass rate over its --n samples,
rows per number of correct samples, and DIR/<split>.jsonl holding the rows whose rate lies in
--band (default: neither always wrong nor always right, the groups dynamic sampling keeps). Writes
--out (default <model>/../eval): results.jsonl (one line per question, sample and frame count,
keyed by row id, so questions sharing a video never collide), summary.json, and frames.png for a
sweep if matplotlib is installed. The last printed line is the JSON summary."""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import model as M
import mr_sp

# -----------------------------------------------------------------------------
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default=None,
                help="HF folder, or a comma list to compare; default runs/grpo/model, else runs/sft/model")
ap.add_argument("--data", default="data/synth", help="folder of <split>.jsonl; default data/synth")
ap.add_argument("--split", default="test", help="jsonl name in --data; default test")
ap.add_argument("--part", default="all", choices=["sft", "rl", "all"],
                help="rows of the split: the SFT third, RL two thirds (data.split_rows), all; default all")
ap.add_argument("--frames", default="32", help="frames per video or comma list (sweep); default 32")
ap.add_argument("--max-pixels", type=int, default=D.MAX_PIXELS, help="per frame; default 128*28*28")
ap.add_argument("--n", type=int, default=1, help="samples per question; default 1")
ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
ap.add_argument("--max-new", type=int, default=128, help="max response tokens; default 128")
ap.add_argument("--batch", type=int, default=16,
                help="questions per rollout call (mr_sp.rollout); default 16")
ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows (0 = all)")
ap.add_argument("--blind", action="store_true", help="control: replace videos and images with mid-gray "
                "frames (the sound stays)")
ap.add_argument("--mute", action="store_true", help="control: replace the sound with silence as long "
                "(a model that hears: Qwen2.5-Omni; the frames stay)")
ap.add_argument("--seed", type=int, default=0, help="sampling seed; default 0")
ap.add_argument("--sp", type=int, default=1, help="seq-parallel degree, world = dp x sp; default 1")
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                help="the weights' dtype: bfloat16 loads them in bf16 and runs in bf16 (nothing trains "
                "here, so no fp32 weights are kept; sft.py's and grpo.py's --dtype bfloat16 autocasts "
                "over fp32 weights instead); default float32")
ap.add_argument("--engine", default="own", choices=["own", "vllm"],
                help="own (ours, model.py: each prompt prefilled once, its KV cache held once for "
                "its --n samples) or vllm (one process only; needs vllm); default own")
ap.add_argument("--vllm-mem", type=float, default=0.7,
                help="vllm: GPU memory share for weights and KV cache; default 0.7 (CPU: ignored)")
ap.add_argument("--vllm-tp", type=int, default=1, help="vllm: tensor-parallel GPUs; default 1")
ap.add_argument("--out", default=None, help="output folder; default <model>/../eval")
ap.add_argument("--keep", default=None, metavar="DIR", help="difficulty filter: write DIR/<split>.jsonl, "
                "the rows whose pass rate over --n samples is in --band (with pass_rate), DIR/filter.json")
ap.add_argument("--band", default="0,1", help="--keep's open interval lo,hi of pass rates; default 0,1")
# -----------------------------------------------------------------------------


def evaluate(model, tok, rows, frames, args, par, llm=None):
    """Answers for this rank's rows (strided over data-parallel ranks; SP peers share them, each
    video encoded by the SP group) at one frame count: a list of result dicts, and the bad samples.
    llm: a vLLM engine holding model's weights, to generate with instead of ours."""
    ds = D.VideoDataset(rows, nframes=frames, max_pixels=args.max_pixels, mute=args.mute,
                        proc=M.processor_config(model.config), sp=(par.rank % par.sp, par.sp))
    mine = list(range(par.dp_rank, len(rows), par.dp))
    out = []
    for b in tqdm(range(0, len(mine), args.batch), desc=f"eval {frames} frames",
                  disable=par.rank != 0, file=sys.stderr):
        samples = list(ds.iter_samples(mine[b:b + args.batch]))
        for s in samples if args.blind else ():
            if "pixel_values" in s:  # (sound alone has none)
                s["pixel_values"] = torch.zeros_like(s["pixel_values"])  # normalized 0 = mean gray
        if not samples:
            continue
        prompts = [mr_sp.prepare(model, tok, s, D.question_text(s), par.sp_group) for s in samples]
        # SP peers run the same rollout and get the same tokens (bit-identical video embeddings)
        toks, _, lens = mr_sp.rollout(model, tok, prompts, args.n,
                                      [mr_sp.seed_of(args.seed, s["id"], frames) for s in samples],
                                      llm, max_new=args.max_new, temperature=args.temperature,
                                      sp_group=par.sp_group)
        for i, s in enumerate(samples):
            for j in range(args.n):
                k = i * args.n + j
                text = tok.decode(toks[k, :lens[k]].tolist(), skip_special_tokens=True)
                r = D.reward(text, s)
                out.append(dict(id=s["id"], video=s["video"], category=s["category"], frames=frames,
                                sample=j, answer=s["answer"], response=text, correct=r["accuracy"],
                                format=r["format"]))
    return out, ds.bad


def summarize(results, n):
    """Accuracy, format rate, pass@n, and accuracy by category."""
    if not results:
        return dict(n_questions=0, accuracy=0.0, format=0.0)
    by_q, by_cat = defaultdict(list), defaultdict(list)
    for r in results:
        by_q[r["id"]].append(r["correct"])
        by_cat[r["category"] or "all"].append(r["correct"])
    s = dict(n_questions=len(by_q), accuracy=sum(r["correct"] for r in results) / len(results),
             format=sum(r["format"] for r in results) / len(results),
             by_category={c: sum(v) / len(v) for c, v in sorted(by_cat.items())})
    if n > 1:
        s[f"pass@{n}"] = sum(max(v) for v in by_q.values()) / len(by_q)
    return s


def pass_bands(results, rows, n, lo=0.0, hi=1.0):
    """The difficulty filter: rows per number of correct samples of n ("k/n"; "none": no sample,
    its video failed), and the rows whose pass rate k/n lies strictly between lo and hi, with it."""
    by_id = defaultdict(list)
    for r in results:
        by_id[r["id"]].append(r["correct"])
    bands, kept = {**{f"{k}/{n}": 0 for k in range(n + 1)}, "none": 0}, []
    for row in rows:
        v = by_id.get(row["id"])
        bands[f"{int(sum(v))}/{n}" if v else "none"] += 1
        if v and lo < sum(v) / n < hi:
            kept.append(dict(row, pass_rate=sum(v) / n))
    return bands, kept


def plot(sweep, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = sorted(sweep)
    plt.figure(figsize=(5, 3.5))
    plt.plot(xs, [sweep[x]["accuracy"] for x in xs], marker="o", label="overall")
    for c in sweep[xs[0]]["by_category"]:
        plt.plot(xs, [sweep[x]["by_category"].get(c, 0) for x in xs], marker=".", alpha=0.6, label=c)
    plt.xscale("log", base=2)
    plt.xlabel("frames")
    plt.ylabel("accuracy")
    plt.legend(fontsize=7)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    return path


def report(path, results, bad, frame_counts, args, seconds):
    """Write results.jsonl, summary.json (and frames.png) for one model; return its summary."""
    sweep = {f: summarize([r for r in results if r["frames"] == f], args.n) for f in frame_counts}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for r in sorted(results, key=lambda r: (r["frames"], r["id"], r["sample"])):
            f.write(json.dumps(r) + "\n")
    summary = dict(model=path, split=args.split, blind=args.blind, mute=args.mute, n=args.n,
                   temperature=args.temperature, **sweep[frame_counts[0]], bad_samples=len(bad),
                   seconds=round(seconds, 1), sweep=sweep)
    if len(frame_counts) > 1:
        summary["by_frames"] = {str(f): sweep[f]["accuracy"] for f in frame_counts}
        summary["plot"] = plot(sweep, os.path.join(out, "frames.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def keep(args, results, rows, summary):
    """--keep: the rows of the --band of pass rates as a split of their own (DIR/<split>.jsonl) and
    the summary with the rows per band (DIR/filter.json)."""
    lo, hi = (float(x) for x in args.band.split(","))
    bands, kept = pass_bands(results, rows, args.n, lo, hi)
    os.makedirs(args.keep, exist_ok=True)
    with open(os.path.join(args.keep, f"{args.split}.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
    summary.update(bands=bands, kept=len(kept), band=[lo, hi], part=args.part)
    with open(os.path.join(args.keep, "filter.json"), "w") as f:
        json.dump(summary, f, indent=1)


def main(args):
    par = mr_sp.init_parallel(args.sp)
    paths = args.model.split(",") if args.model else \
        [next((p for p in ("runs/grpo/model", "runs/sft/model") if os.path.exists(p)), None)]
    if None in paths:
        raise SystemExit("no model: pass --model DIR, or train one first (python sft.py)")
    if args.out and len(paths) > 1:
        raise SystemExit("--out takes one model; with several, each writes to <model>/../eval")
    D.prepare_task(args.data, par.rank)
    rows = D.split_rows(D.load_rows(os.path.join(args.data, f"{args.split}.jsonl")), args.part)
    rows = rows[:args.limit] if args.limit else rows
    frame_counts = [int(f) for f in str(args.frames).split(",")]
    if args.keep and (len(paths) > 1 or len(frame_counts) > 1 or args.n < 2 or not args.temperature):
        raise SystemExit("--keep takes one model, one frame count, --n > 1 samples at --temperature > 0")
    if args.keep and os.path.abspath(args.keep) == os.path.abspath(args.data):
        raise SystemExit("--keep DIR must not be --data: it would overwrite the rows it reads")
    summaries, llm = [], None
    for path in paths:
        model, tok = M.load(path, dtype=getattr(torch, args.dtype), device=par.device)
        if args.mute and "feature_extractor_type" not in M.processor_config(model.config):
            raise SystemExit(f"--mute: {path} does not hear (a {model.config.model_type} model)")
        if args.engine == "vllm":  # one engine; a later model of the comparison is synced into it
            if par.world > 1:  # vLLM's engines under torchrun step in lockstep; our rows are uneven
                raise SystemExit("eval.py --engine vllm runs in one process")
            if llm is None:
                llm = mr_sp.vllm_engine(model, tok, path, args.dtype, args.vllm_mem, args.vllm_tp, args.seed)
            else:
                mr_sp.vllm_sync(llm, model)
        results, bad, t0 = [], [], time.time()
        for frames in frame_counts:
            r, b = evaluate(model, tok, rows, frames, args, par, llm)
            results += r
            bad += b
        if dist.is_initialized():
            gathered = [None] * par.world
            # SP peers hold the same answers: only the first rank of each SP group contributes
            dist.all_gather_object(gathered, (results, bad) if par.rank % par.sp == 0 else ([], []))
            results, bad = [r for g in gathered for r in g[0]], [b for g in gathered for b in g[1]]
        if par.rank == 0:
            summaries.append(report(path, results, bad, frame_counts, args, time.time() - t0))
    if par.rank == 0:
        cats = sorted({c for s in summaries for f in frame_counts for c in s["sweep"][f]["by_category"]})
        width = max(len(p) for p in paths)
        print(f"{'model':<{width}} | {'frames':>6} | {'acc':>6} | {'format':>6} | "
              + " | ".join(f"{c[:12]:>12}" for c in cats))
        for s in summaries:
            for f in frame_counts:
                x = s["sweep"][f]
                print(f"{s['model']:<{width}} | {f:>6} | {x['accuracy']:6.3f} | {x['format']:6.3f} | "
                      + " | ".join(f"{x['by_category'].get(c, 0):12.3f}" for c in cats))
            del s["sweep"]
        if args.keep:
            keep(args, results, rows, summaries[0])
        print(json.dumps(summaries[0] if len(summaries) == 1 else {"models": summaries}))
    mr_sp.shutdown()


if __name__ == "__main__":
    main(ap.parse_args())
