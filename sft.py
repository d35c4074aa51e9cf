"""Chain-of-thought SFT on video QA: the first stage, before grpo.py.

    python sft.py                               # tiny model from scratch, synthetic task
    python sft.py --init tiny-qwen3-vl          # the same on a tiny Qwen3-VL (or tiny-qwen2-vl)
    torchrun --nproc_per_node 2 sft.py          # the same, data parallel
    torchrun --nproc_per_node 2 sft.py --sp 2   # the same, each sequence split over 2 ranks (MR-SP)
    torchrun --nproc_per_node 2 sft.py --fsdp   # the same, FSDP2: weights, gradients, AdamW sharded
    python sft.py --init /ckpt/Qwen2.5-VL-7B-Instruct --data /data/LongVideo-Reason --dtype bfloat16 --lr 1e-5

Cross-entropy on the assistant tokens only (`<think>reasoning</think><answer>X</answer><|im_end|>`)
given the row's video, image or no visual input, and question, averaged over the global batch's
target tokens (a row whose trace reasons to another answer than the row's, its trace_answer, on its
bare true answer: trains_bare); --answer-epochs first trains on the bare answer
(`<answer>X</answer><|im_end|>`, asked for by its own instruction), a target the video decides, then
on the traces, under one learning-rate schedule, --answer-mix of each later batch's rows as bare
answers too. A tiny model from random weights by default trains on the traces alone, and only where
they leave its held-out accuracy within BLIND_MARGIN of answering blind (each category's most common
training answer) starts over from its initial weights with BARE_EPOCHS of bare answers first (the
traces' run kept in --out/traces/): some tasks it learns best from the traces, others only from the
answers first (RESULTS.md). Validation: every --eval-every steps, --val rows SFT does not train on
(with --part sft, rows of the RL part) get their loss, the mean entropy of the model's next-token
distribution over the target, and greedy answers graded by the task's reward (accuracy, by
category). A small dataset can be learned by heart (training loss near 0) while held-out answers get
worse, and a hard one still improves after many epochs: model/ is the step with the lowest
validation loss, not the last (accuracy on a few hundred rows moves by several points between
evaluations; the loss is smooth), and the run stops after --patience validations without a lower one
(validations of the bare answers, other targets, are logged and count for neither).
Writes --out: model/ (HF folder: the best step, its numbers in val.json; the last step's without
--val), last/ (the last checkpoint, with state.pt: optimizer, step, for --resume), args.json,
plan.json (the run's memory plan, made from the config at start: mr_sp.plan_start), metrics.jsonl
(a line per step; "val_*" lines per validation), traces/ (the traces' run where a tiny model
started over); the same with --fsdp.
"""
import argparse
import collections
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data as D
import model as M
import mr_sp

# -----------------------------------------------------------------------------
# A tiny model's fallback: accuracy under blind + BLIND_MARGIN after the traces means it did not
# learn to read the video from them (3 seeds: `motion` and `aside` -0.04 to 0.06 above blind, the
# default task 0.36 to 0.42; RESULTS.md), and BARE_EPOCHS of bare answers first taught it there
# (10 left `motion`'s `when` and `count` at chance on one seed of 3 and `aside`'s `jumps` near it)
BLIND_MARGIN, BARE_EPOCHS = 0.15, 20.0

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = ap.add_argument_group("model and data")
g.add_argument("--init", default="tiny", help="HF folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, "
               f"Qwen2.5-Omni), or a tiny model built in code: {', '.join(M.TINY)} (tiny: Qwen2.5-VL); "
               "default tiny")
g.add_argument("--data", default="data/synth", help="train.jsonl folder (synthetic task made if absent)")
g.add_argument("--part", default="sft", choices=["sft", "rl", "all"],
               help="rows used: the paper splits train 1/3 SFT, 2/3 RL; default sft")
g.add_argument("--frames", type=int, default=32, help="frames sampled per video; default 32")
g.add_argument("--max-pixels", type=int, default=D.MAX_PIXELS, help="max pixels a frame; default 128*28*28")
g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
               help="compute dtype; bfloat16 autocasts over fp32 weights; default float32")
g.add_argument("--audio-seconds", type=float, default=None, help="a model that hears (Qwen2.5-Omni): "
               "seconds of each video's sound, for the memory plan only; default --frames (a frame a second)")
g.add_argument("--vision", default="auto", choices=["auto", "train", "freeze"],
               help="vision tower (and Qwen2.5-Omni's audio tower): auto trains tiny's (random "
               "init), freezes a loaded checkpoint's")
g = ap.add_argument_group("optimization")
g.add_argument("--epochs", type=float, default=6, help="passes over the rows with reasoning traces; "
               "default 6")
g.add_argument("--answer-epochs", type=float, default=None, help="passes with bare answers "
               "(<answer>X</answer>) before the --epochs with traces, for a model that does not yet "
               f"read the video; default 0 (a tiny model: {BARE_EPOCHS:g} in a second run where "
               "the traces' held-out accuracy stays near blind)")
g.add_argument("--answer-mix", type=float, default=None, help="after the --answer-epochs, this share "
               "of each batch's rows also as bare answers (keeps what they taught); default 0.5 "
               "after a bare phase, else 0")
g.add_argument("--steps", type=int, default=None, help="optimizer steps; default: --answer-epochs plus "
               "--epochs over the rows (the phases keep their shares of --steps)")
g.add_argument("--batch", type=int, default=16, help="samples per step, over all ranks; default 16")
g.add_argument("--micro-batch", type=int, default=None,
               help="rows per forward/backward (accumulated); default: 16 on CPU, on a GPU the largest "
               "of 16, 8, 4, 2, 1 that the plan fits, at most 32,768 tokens a rank")
g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW lr; default 2e-3 (tiny model)")
g.add_argument("--warmup", type=int, default=20, help="linear warmup steps; default 20")
g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
               help="lr after warmup; default cosine")
g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay; default 0.01")
g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; default 1.0")
g = ap.add_argument_group("run")
g.add_argument("--sp", type=int, default=1, help="sequence-parallel degree: ranks per SP group, "
               "which split each sequence; world = dp x sp; default 1")
g.add_argument("--fsdp", action="store_true", help="shard the trained weights, their gradients and "
               "AdamW state over all ranks (FSDP2), not replicate: the same updates; no-op in one process")
g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
               help="keep each decoder layer's input only, recompute the layer in backward: a 4,096-"
               "frame pass 0.26x the memory, 1.25x the time; default: on where the plan does not "
               "fit without it (on CPU: a training pass over 2 GiB a rank)")
g.add_argument("--seed", type=int, default=0, help="seed for init and data order; default 0")
g.add_argument("--out", default="runs/sft", help="output folder; default runs/sft")
g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0 = end only)")
g.add_argument("--val", type=int, default=128, help="held-out rows validated (0: none, model/ is the "
               "last step); --part sft: the RL part's first, else the part's last (at most a quarter); "
               "default 128")
g.add_argument("--eval-every", type=int, default=None, help="validate every N steps and at the end; "
               "default: 10 times a run")
g.add_argument("--patience", type=int, default=3, help="stop after N validations without a lower "
               "validation loss (0: never); default 3")
g.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
# -----------------------------------------------------------------------------


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def batch_indices(step, args, n_rows, dp_rank, dp):
    """This DP rank's rows of global batch `step`: a new permutation per epoch, a contiguous block
    per rank (so one process at --micro-batch batch/dp runs exactly the ranks' micro-batches)."""
    per = args.batch // dp
    ks = range(step * args.batch + dp_rank * per, step * args.batch + (dp_rank + 1) * per)
    return [epoch_order(args.seed, k // n_rows, n_rows)[k % n_rows] for k in ks]


def mixed_rows(args):
    """Positions in the global batch whose rows --answer-mix also trains as bare answers: spread
    evenly, by position, so the same rows on any number of ranks."""
    return {j for j in range(args.batch) if math.floor((j + 1) * args.answer_mix) > math.floor(j * args.answer_mix)}


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n_rows):
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def split_val(rows, part, n):
    """(training rows, validation rows) of the part: --part sft validates on the first n rows of the
    RL part (SFT never sees them; RL trains on them later, rewarded by the truth), another part on
    its own last n (at most a quarter of it), which it then does not train on."""
    train = D.split_rows(rows, part)
    if part == "sft":
        return train, D.split_rows(rows, "rl")[:n]
    n = min(n, len(train) // 4)  # a small part keeps three quarters to train on
    return train[:len(train) - n], train[len(train) - n:]


def trains_bare(s, bare):
    """Whether row s trains (and validates) on its bare answer: in the bare phase, and always where
    its trace reasons to another answer than the row's (trace_answer): such a trace teaches the
    wrong answer (the default task's 30% kept `counting` at chance; as bare true answers, SFT
    gained 5.5 to 6.4 points on each task, 3 seeds; RESULTS.md), while its true answer still
    teaches what the video says."""
    return bare or s.get("trace_answer", s["answer"]) != s["answer"]


def target_tokens(tok, s, end, bare=False):
    """The assistant's tokens SFT trains on: the reasoning trace and answer, or (bare) the
    answer."""
    text = f"<answer>{s['answer']}</answer>" if bare else D.target_text(s)
    return tok.encode(text, add_special_tokens=False) + [end]


def validate(model, tok, ds, par, categories, end, batch=mr_sp.VAL_BATCH, bare=False):
    """Sums over this data-parallel rank's validation rows (SP peers run the same): the target's
    (target_tokens) negative log-likelihood, entropy and tokens (teacher-forced), greedy answers'
    accuracy and format (the task's reward), per category too."""
    names = ["nll", "entropy", "tokens", "correct", "format", "rows"]
    sums = collections.Counter({k: 0.0 for k in names + [f"{k}_{c}" for c in categories
                                                         for k in ("correct", "rows")]})
    mine = range(par.dp_rank, len(ds), par.dp)
    with torch.no_grad():
        for b in range(0, len(mine), batch):
            samples = list(ds.iter_samples(mine[b:b + batch]))
            if not samples:
                continue
            bares = [trains_bare(s, bare) for s in samples]
            prompts = [mr_sp.prepare(model, tok, s, D.question_text(s, b), par.sp_group)
                       for s, b in zip(samples, bares)]
            targets = [target_tokens(tok, s, end, b) for s, b in zip(samples, bares)]
            for p, t in zip(prompts, targets):  # one row at a time: no padded rows' memory
                lp, ent, mask = mr_sp.logprobs(model, tok, [dict(p, response=t)],
                                                       sp_group=par.sp_group)
                sums.update(nll=-float((lp * mask).sum()), entropy=float((ent * mask).sum()),
                            tokens=float(mask.sum()))
            toks, _, lens = mr_sp.rollout(model, tok, prompts, 1, temperature=0.0, sp_group=par.sp_group,
                                          max_new=max(map(len, targets)) + 16)
            for i, s in enumerate(samples):
                r = D.reward(tok.decode(toks[i, :lens[i]].tolist(), skip_special_tokens=True), s)
                sums.update({"correct": r["accuracy"], "format": r["format"], "rows": 1.0,
                             f"correct_{s['category']}": r["accuracy"], f"rows_{s['category']}": 1.0})
    return dict(sums)


def build(args, par, src):
    """The model from src laid out as args ask (towers trained or frozen, --sp, --activation-
    checkpointing, --fsdp), run (mr_sp.shard's root, or mr_sp.call) and AdamW over what trains."""
    model, tok = M.load(src, device=par.device, seed=args.seed)
    train_vision = args.vision == "train" or (args.vision == "auto" and args.init in M.TINY)
    for tower in M.towers(model).values():  # Qwen2.5-Omni's audio tower as its vision tower
        tower.requires_grad_(train_vision)
    if args.sp > 1:
        mr_sp.use_ulysses(model)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    fsdp = args.fsdp and par.world > 1  # one process holds everything either way
    run = mr_sp.shard(model, dtype=getattr(torch, args.dtype)) if fsdp else mr_sp.call
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return model, tok, run, params, opt, train_vision


def blind_accuracy(rows, val):
    """The validation rows' accuracy of answering without the video: each category's most common
    answer among the training rows (the most a model that reads only the question reaches)."""
    common = collections.defaultdict(collections.Counter)
    for r in rows:
        common[r["category"]][r["answer"]] += 1
    return sum(D.grade(common[r["category"]].most_common(1)[0][0], r["answer"])
               for r in val if r["category"] in common) / max(len(val), 1)


def schedule(args, n_rows):
    """Resolve the steps left to the run: --answer-mix, --steps, the bare-answer steps,
    --eval-every."""
    if args.answer_mix is None:  # it keeps what a bare phase taught: with none, nothing to keep
        args.answer_mix = 0.5 if args.answer_epochs else 0.0
    epochs = args.answer_epochs + args.epochs
    args.steps = args.steps or math.ceil(epochs * n_rows / args.batch)
    # A model from scratch can learn to read the video from the answer alone where a trace's many
    # tokens the video does not decide drown it out (RESULTS.md: the tiny model on `motion`)
    args.answer_steps = round(args.steps * args.answer_epochs / epochs) if epochs else 0
    args.eval_every = args.eval_every or max(1, args.steps // 10)


def step_rows(args, step, ds, n_rows, tok, config, par, end):
    """This rank's rows of step `step` ({sample, prompt, pos, response}; a video that fails gives
    none): traces, or bare answers in the first --answer-steps; after those, --answer-mix's share of
    the rows also as bare answers (under their own instruction), which keeps what that phase taught
    while the traces are learned."""
    bare = step < args.answer_steps
    per, mixed = args.batch // par.dp, set() if bare else mixed_rows(args)
    items = []
    for j, i in enumerate(batch_indices(step, args, n_rows, par.dp_rank, par.dp)):
        for s in ds.iter_samples([i]):
            for b in [trains_bare(s, bare)] + [True] * (par.dp_rank * per + j in mixed):
                prompt, pos = M.prompt_of(tok, config, s, D.question_text(s, b))
                items.append(dict(sample=s, prompt=prompt, pos=pos, response=target_tokens(tok, s, end, b)))
    return items


def micro_loss(model, tok, mb, n_tok, par, train_vision):
    """The micro-batch's share of the global batch's mean token loss (a weight-0 row, "keep" 0:
    none); a call, so the run of mr_sp.shard can wrap it."""
    rows = []
    for x in mb:
        # A trained tower needs the graph, so every SP peer encodes the whole video (and sound)
        # with it. The gradient stays exact: each peer's pass back-propagates only into its
        # share of the sequence, so the peers' tower gradients sum (sync_grads, or FSDP's) to the
        # sp=1 one. Frozen: each peer encodes and holds its share (mr_sp.embeddings).
        if train_vision:
            s = {k: v.to(par.device) for k, v in x["sample"].items() if torch.is_tensor(v)}
            emb = dict(visual=M.encode_pixels(model, s["pixel_values"], s["grid_thw"])
                       if "pixel_values" in s else None,
                       audio=M.encode_mels(model, s["input_features"], s["feature_attention_mask"])
                       if "input_features" in s else None)
        else:
            emb = mr_sp.embeddings(model, x["sample"], par.sp_group)
        rows.append(dict(prompt=x["prompt"], pos=x["pos"], response=x["response"], **emb))
    lp, _, mask = mr_sp.logprobs(model, tok, rows, sp_group=par.sp_group)
    weight = torch.tensor([x.get("keep", 1.0) for x in mb], dtype=lp.dtype, device=lp.device)[:, None]
    return -(lp * mask * weight).sum() / max(n_tok, 1.0)


def forward_backward(args, items, model, tok, run, par, train_vision):
    """This rank's gradients of the global batch's mean target-token loss, accumulated over
    micro-batches of its items (--fsdp: as many as every rank runs): (that loss, target tokens)."""
    # --fsdp: as many rows on every rank, not only passes (a trained tower encodes row by row)
    items = [x for one in mr_sp.equal_passes([[[x] for x in items]], mr_sp.sharded(model))[0] for x in one]
    micro = [items[k:k + args.micro_batch] for k in range(0, len(items), args.micro_batch)]
    n_tok = mr_sp.dp_sum(dict(n=float(sum(len(x["response"]) * x.get("keep", 1.0)
                                          for mb in micro for x in mb))), par.sp_group)["n"]
    loss_sum = 0.0
    for mb in micro:
        loss = run(micro_loss, model, tok, mb, n_tok, par, train_vision)
        loss.backward()
        loss_sum += loss.item()
    return mr_sp.dp_sum(dict(loss=loss_sum), par.sp_group)["loss"], n_tok


def validation(args, step, bare, model, tok, run, val_ds, par, categories, end, best):
    """Validate at step (the bare answers, or the traces), log it, and save model/ when its loss of
    the traces is the lowest yet; the first phase's loss (of bare answers) neither picks model/ nor
    stops the run. Returns best, (validation loss, step, accuracy) of model/."""
    model.eval()
    v = mr_sp.dp_sum(mr_sp.unsharded(run, validate, model, tok, val_ds, par, categories, end,
                                     bare=bare), par.sp_group)
    model.train()
    n_rows, n_tok = max(v["rows"], 1.0), max(v["tokens"], 1.0)
    rec = dict(step=step + 1, val_target="answer" if bare else "trace",
               val_loss=v["nll"] / n_tok, val_acc=v["correct"] / n_rows,
               val_format=v["format"] / n_rows, val_entropy=v["entropy"] / n_tok,
               val_rows=v["rows"], val_tokens=v["tokens"], val_by_category={
                   c: v[f"correct_{c}"] / max(v[f"rows_{c}"], 1.0) for c in categories})
    better = not bare and (best is None or rec["val_loss"] < best[0])
    best = (rec["val_loss"], step + 1, rec["val_acc"]) if better else best
    sd = mr_sp.full_state(model)[0] if better and mr_sp.sharded(model) else None  # collective
    if par.rank == 0:
        mr_sp.log_step(args.out, rec, f"val {step + 1} ({rec['val_target']}) | loss {rec['val_loss']:.4f} | "
                       f"acc {rec['val_acc']:.3f} | fmt {rec['val_format']:.2f} | entropy "
                       f"{rec['val_entropy']:.3f} | best: step {best and best[1]}")
        if better:
            M.save(model, tok, os.path.join(args.out, "model"), state_dict=sd,
                   write=lambda d: Path(d, "val.json").write_text(json.dumps(rec)))
    return best


def out_of_patience(args, step, val, best, rank):
    """Whether the validation loss has not improved for --patience validations: stop (what follows
    memorizes), and rank 0 says so."""
    stop = bool(val and args.patience and best and
                step + 1 - best[1] >= args.patience * args.eval_every)
    if rank == 0 and stop:
        print(f"step {step + 1}: no lower validation loss in {args.patience} validations; "
              f"stopping (model/: step {best[1]})")
    return stop


def main(args):
    par = mr_sp.init_parallel(args.sp)
    src, state = M.resume(os.path.join(args.out, "last")) if args.resume else (args.init, None)
    # planned from the config alone, before any weights load: unset flags resolved, a layout that
    # cannot run (--batch over dp) or a GPU it does not fit refused
    mr_sp.plan_start(args, mr_sp.plan_config(src), par)
    rows, val = split_val(D.load_rows(D.prepare_task(args.data, par.rank)), args.part, args.val)
    fallback = args.answer_epochs is None and args.init in M.TINY and bool(val)
    if args.answer_epochs is None:  # a resumed run keeps its phase: the fallback's or the traces'
        args.answer_epochs = state.get("answer_epochs", 0.0) if state else 0.0
    flags = dict(vars(args))  # as given: the fallback resolves its own steps
    best, done = train(args, par, src, state, rows, val)
    blind = blind_accuracy(rows, val)
    if fallback and not args.answer_epochs and best and best[2] < blind + BLIND_MARGIN:
        if par.rank == 0:
            print(f"held-out accuracy {best[2]:.3f} after the traces, blind {blind:.3f}: the model "
                  f"does not read the video from them; starting over with {BARE_EPOCHS:g} epochs "
                  f"of bare answers first (this run moved to {args.out}/traces)")
            keep_traces_run(args.out)
        args = argparse.Namespace(**{**flags, "answer_epochs": BARE_EPOCHS, "resume": False})
        best, done = train(args, par, args.init, None, rows, val)
    if par.rank == 0:
        print(json.dumps({"out": os.path.join(args.out, "model"), **done,
                          "answer_epochs": args.answer_epochs,
                          "best_step": best and best[1], "val_loss": best and best[0],
                          "val_acc": best and best[2], "blind_acc": blind if val else None}))
    mr_sp.shutdown()


def keep_traces_run(out):
    """Move the traces' run (its model/, last/, log and args) to out/traces before the fallback."""
    dst = os.path.join(out, "traces")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for name in ("model", "last", "metrics.jsonl", "args.json"):
        if os.path.exists(os.path.join(out, name)):
            os.replace(os.path.join(out, name), os.path.join(dst, name))


def train(args, par, src, state, rows, val):
    """SFT from src (state: --resume's) to --out on rows, validated on val: (best, (validation
    loss, step, accuracy) of model/; {steps, bad_samples})."""
    ckpt = os.path.join(args.out, "model")
    model, tok, run, params, opt, train_vision = build(args, par, src)
    start = mr_sp.load_state(model, opt, state)
    schedule(args, len(rows))
    # a frozen tower: each SP peer keeps only the pixels of frames it encodes (mr_sp.encode_visual)
    ds, val_ds = (D.VideoDataset(r, nframes=args.frames, max_pixels=args.max_pixels,
                                 proc=M.processor_config(model.config),
                                 sp=None if train_vision else (par.rank % par.sp, par.sp))
                  for r in (rows, val))
    categories, end = sorted({r["category"] for r in val}), tok.convert_tokens_to_ids("<|im_end|>")
    best = state.get("best") if state else None  # (validation loss, step, accuracy) of model/
    if par.rank == 0:
        mr_sp.open_log(args, start)
        print(f"SFT from {args.init}: {len(rows)} rows ({args.part} part of {args.data}), {args.steps} "
              f"steps ({args.steps * args.batch / len(rows):.1f} epochs; {args.answer_steps} with bare "
              f"answers, then traces), {len(val)} validation rows, "
              f"{par.world} process(es) (dp {par.dp} x sp {args.sp}), "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")
    model.train()
    with mr_sp.autocast(par.device, args.dtype):
        for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="sft",
                         disable=par.rank != 0):
            t0 = time.time()
            bare = step < args.answer_steps
            items = step_rows(args, step, ds, len(rows), tok, model.config, par, end)
            loss, n_tok = forward_backward(args, items, model, tok, run, par, train_vision)
            gn, _ = mr_sp.optimizer_step(params, opt, args.grad_clip, lr_at(step, args))
            dt = time.time() - t0
            if par.rank == 0:
                rec = dict(step=step + 1, loss=loss, lr=lr_at(step, args), grad_norm=gn,
                           tokens=n_tok, seconds=dt, bad_samples=ds.n_bad)
                mr_sp.log_step(args.out, rec, f"step {step + 1} | loss {loss:.4f} | lr {rec['lr']:.2e} | "
                               f"gnorm {gn:.2f} | {dt:.2f}s | {n_tok / dt:.0f} target tok/s")
            last = step + 1 == args.steps
            if val and ((step + 1) % args.eval_every == 0 or last):
                best = validation(args, step, bare, model, tok, run, val_ds, par, categories, end, best)
            stop = out_of_patience(args, step, val, best, par.rank)
            last = last or stop
            if (args.save_every and (step + 1) % args.save_every == 0) or last:
                sd, state = mr_sp.save_state(model, opt, step=step + 1, best=best,
                                             answer_epochs=args.answer_epochs)  # collective
                # model/ is the last step's without a validated trace step (no --val, or a run that
                # ends in the first phase)
                for d in [os.path.join(args.out, "last")] + [ckpt] * (last and best is None):
                    if par.rank == 0:
                        M.save(model, tok, d, state_dict=sd, state=state)
            if stop:
                break
    return best, dict(steps=step + 1 if start < args.steps else start, bad_samples=ds.n_bad)


if __name__ == "__main__":
    main(ap.parse_args())
