"""GRPO on long videos: the second stage, after sft.py.

    python grpo.py                                   # tiny model from runs/sft, synthetic task
    torchrun --nproc_per_node 2 grpo.py              # the same, data parallel
    torchrun --nproc_per_node 2 grpo.py --sp 2       # videos, sequences split over 2 ranks (MR-SP)
    torchrun --nproc_per_node 2 grpo.py --fsdp       # policy and reference sharded (FSDP2)
    python grpo.py --init /path/to/Qwen2.5-VL-7B-sft --data /path/to/LongVideo-Reason --dtype bfloat16
    $(bash .ci/vllm_env | tail -1) grpo.py --engine vllm  # rollouts on vLLM's CPU build (own venv)

Writes --out (default runs/grpo): model/ (the policy as a Hugging Face folder, with state.pt:
optimizer, step, data cursor, for --resume), args.json (resolved config), plan.json (the run's
memory plan), metrics.jsonl (per step).
Memory: at start, before any weights load, the run is planned from the model's config
(mr_sp.plan_start: one line printed); a plan over the GPU's memory stops with the flags that fit.
Unset, --micro-batch and --activation-checkpointing (each decoder layer recomputed in backward)
are what the plan needs; --fsdp shards weights, gradients, AdamW state and the reference over all
ranks, and gathers the policy once a step for its rollouts (`python mr_sp.py plan`: any layout).
The variant that runs, exactly:
1. Each step takes --prompts prompts (in contiguous blocks over data-parallel ranks). The frozen
   vision tower encodes a prompt's video once (Qwen2.5-Omni's audio tower its sound), for its G
   rollouts and the old-policy, reference and policy passes (mr_sp.py); --sp splits the encode and
   the three passes over the SP group's ranks.
2. G samples per prompt at --temperature, --top-p, up to --max-new tokens; vision special tokens
   masked out of the policy. Sample j of a prompt is seeded by (seed, step, prompt) + j: a global
   batch samples the same tokens on any number of ranks; --sp peers split each prompt's G samples.
   Our engine holds a prompt's KV cache once for its G samples. --engine vllm: vLLM gets each
   prompt with its cached embeddings once (n = G, or G/sp per SP peer; same seed key), and the
   weights in place after each step (on GPU it sleeps in training). --rollout-dtype bfloat16 runs
   the rollouts alone in bf16 (autocast; vLLM: the engine's dtype) beside an fp32 trainer.
3. Reward r = 0.9 * accuracy + 0.1 * format: format is a fullmatch of
   `<think>.*?</think>\\s*<answer>.*?</answer>`, accuracy grades the answer span against the
   ground truth (letter, number or normalized text). --reward module:function replaces it.
4. Reward shaping, --overlong-buffer N (DAPO, arXiv 2503.14476, eq. 13): a response of L tokens
   (EOS included) past --max-new - N loses --overlong-penalty * (L - (max_new - N)) / N, linearly up
   to the whole penalty at --max-new (used for advantages; the logged reward is the task's).
5. Advantage, the same for every token of a sample (--adv), from the G rewards r of its prompt:
   grpo: (r - mean) / (std + 1e-6), unbiased std (DeepSeekMath, arXiv 2402.03300); drgrpo: r - mean
   (Dr. GRPO, arXiv 2503.20783); rloo: r minus the mean of the other G - 1 (arXiv 2402.14740);
   reinforce++: r - mean, then (a - mu) / sqrt(var + 1e-8) with mu and unbiased var over every
   response token of the step's global batch, all data-parallel ranks (REINFORCE++-baseline,
   arXiv 2501.03262, as verl's reinforce_plus_plus_baseline). Dynamic sampling (on unless
   --no-dynamic-sampling) drops groups whose rewards are all equal (no signal) and refills from the
   next prompts; after 8 step-sized rounds of prompts it trains on the groups it found, saying so
   (flat_groups, the share of samples in such groups, and rollout_entropy are logged every step).
6. Old log-probs: a no-grad pass before the updates, on their micro-batches (first ratio exactly 1);
   with one epoch and one mini-batch (on-policy) none: each micro-batch's update pass gives them
   (its log-probs detached, before any update: the same numbers, as TRL does).
   The engine's log-probs of its samples are compared with them (rollout_logprob_gap, max abs
   difference: float error if both describe one policy). --tis C (truncated importance sampling, Yao
   et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"): each
   token's policy-gradient loss times w = min(pi_old / pi_rollout, C), detached, per token or, at
   --tis-level seq, with the ratio of the sequences' probabilities (log w needs no clamp: a w that
   overflows to inf is cut at C); tis_frac logs the share of response tokens whose w was cut at C.
   Reference: frozen initial policy (none at --kl-coef 0), stored and run as the policy is, so at
   step 0 its log-probs equal the policy's, in bf16 too.
7. Loss per token (--loss), r = exp(logp - old_logp) with log r clamped to +-20 as verl does (fp32's
   exp is inf past 88 nats: the loss or gradient would be inf or NaN and the update skipped): clip:
   max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) (PPO, arXiv 1707.06347, with DAPO's
   clip-higher), bounded by -A * dual_clip where A < 0 (dual clip, arXiv 1912.09729); gspo: the same
   without the dual clip (as its paper and verl), every token's r the sequence's ratio s = exp(mean
   over its tokens of logp - old_logp), log s at most 10 (verl's bound), as sg(s) * pi / sg(pi):
   value s, gradient s * grad log pi (GSPO, arXiv 2507.18071; its paper's loss with --agg seq);
   cispo: -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp, every token keeps its gradient
   (CISPO, MiniMax-M1, arXiv 2506.13585); clipped on both sides as in verl, where MiniMax-M1 and
   TRL clip only above (--clip-low 1 gives theirs).
   Plus kl_coef * KL(k1|k2|k3) to the reference (k3: its log-ratio clamped to +-20, its value to
   +-10, as verl). --mask-truncated: responses cut at --max-new (no EOS) carry no loss.
   Aggregation (--agg) over the global mini-batch: token: mean over response tokens; seq: mean of
   sequences' token means; drgrpo: token sum over sequences x --max-new, TRL's dr_grpo and verl's
   seq-mean-token-sum-norm divided by the number of sequences (verl sums over sequences, and its
   divisor defaults to the padded width). With --mask-truncated the truncated rows leave drgrpo's
   number of sequences too, so its divisor is no longer the constant Dr. GRPO intends.
8. --epochs passes over the rollout batch in exactly --mini-batches updates each (mini-batch m: the
   m-th of near-equal slices of every rank's rows; one with no rows on any rank changes nothing;
   a micro-batch holds rows of one prompt, so no pass needs an attention mask, and the prompt runs
   once for all of them: each response attends to it, exactly as the rows one by one, at the cost
   of about one row, not G (--no-shared-prefix: row by row)); AdamW with gradient
   clipping; data-parallel gradients summed with one all-reduce per tensor per
   update, so the loss is the global mean whatever the world size. grad_norm logs the mean over
   the step's updates, before clipping."""
import argparse
import collections
import contextlib
import copy
import dataclasses
import importlib
import itertools
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import data as D
import model as M
import mr_sp

# -----------------------------------------------------------------------------
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = ap.add_argument_group("model and data")
g.add_argument("--init", default="runs/sft/model",
               help=f"policy: HF folder (any family) or a tiny model ({', '.join(M.TINY)}); "
               "default runs/sft/model")
g.add_argument("--data", default="data/synth", help="train.jsonl folder (synthetic task made if absent)")
g.add_argument("--part", default="rl", choices=["sft", "rl", "all"],
               help="rows used: the paper splits train 1/3 SFT, 2/3 RL; default rl")
g.add_argument("--frames", type=int, default=32, help="frames sampled per video; default 32")
g.add_argument("--max-pixels", type=int, default=D.MAX_PIXELS, help="max pixels a frame; default 128*28*28")
g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
               help="compute dtype; bfloat16 autocasts over fp32 weights; default float32")
g.add_argument("--audio-seconds", type=float, default=None, help="a model that hears (Qwen2.5-Omni): "
               "seconds of each video's sound, for the memory plan only; default --frames (a frame a second)")
g = ap.add_argument_group("rollout")
g.add_argument("--G", type=int, default=8, help="samples per prompt; default 8")
g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; default 1.0")
g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; default 1.0 (off)")
g.add_argument("--max-new", type=int, default=128, help="max response tokens; default 128")
g.add_argument("--prompts", type=int, default=8, help="prompts per step over all ranks; default 8")
g.add_argument("--prefill-chunk", type=int, default=1024,
               help="rollout prefill, tokens per forward (0: whole prompt); default 1024")
g.add_argument("--engine", default="own", choices=["own", "vllm"],
               help="own (ours, model.py: each prompt prefilled once, its KV cache held once for its G "
               "samples) or vllm (an engine a rank; needs vllm); default own")
g.add_argument("--vllm-mem", type=float, default=0.5,
               help="vllm: GPU memory share for weights and KV cache; default 0.5 (CPU: ignored)")
g.add_argument("--vllm-tp", type=int, default=1, help="vllm: tensor-parallel GPUs; default 1")
g.add_argument("--rollout-dtype", default=None, choices=["float32", "bfloat16"],
               help="the rollouts' dtype (autocast; vllm: the engine's), e.g. bf16 beside an fp32 "
               "trainer; default: --dtype")
g = ap.add_argument_group("algorithm")
g.add_argument("--reward", default=None, help="module:function(text, row) -> float or dict; default built-in")
g.add_argument("--adv", default="grpo", choices=["grpo", "drgrpo", "rloo", "reinforce++"],
               help="advantage estimator (docstring item 5); default grpo")
g.add_argument("--loss", default="clip", choices=["clip", "gspo", "cispo"],
               help="policy loss: token ratio clipped, sequence ratio clipped, clipped weight x "
               "logp (docstring item 7); default clip")
g.add_argument("--overlong-buffer", type=int, default=0,
               help="DAPO overlong shaping over the last N tokens of --max-new (0 = off)")
g.add_argument("--overlong-penalty", type=float, default=1.0,
               help="reward lost at --max-new tokens with --overlong-buffer; default 1.0")
g.add_argument("--mask-truncated", action="store_true",
               help="responses cut at --max-new (no EOS) carry no loss; default off")
g.add_argument("--tis", type=float, default=0.0,
               help="truncated importance sampling: loss x min(pi_old / pi_rollout, C), C > 0 "
               "(0 = off); default 0")
g.add_argument("--tis-level", default="token", choices=["token", "seq"],
               help="--tis ratio per token or per sequence (its tokens' product); default token")
g.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1; default 0.2")
g.add_argument("--clip-high", type=float, default=0.28, help="ratio clip above 1; default 0.28")
g.add_argument("--dual-clip", type=float, default=3.0,
               help="--loss clip: max -A*ratio for A < 0 (0 = off); default 3")
g.add_argument("--kl", default="k3", choices=["k1", "k2", "k3"], help="KL estimator; default k3")
g.add_argument("--kl-coef", type=float, default=1e-2, help="KL weight (0 = no reference model); default 1e-2")
g.add_argument("--agg", default="token", choices=["token", "seq", "drgrpo"],
               help="loss aggregation: token mean, mean of sequence means, or token sum / "
               "(sequences x --max-new) (Dr. GRPO); default token")
g.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch; default 2")
g.add_argument("--mini-batches", type=int, default=2, help="optimizer updates per pass; default 2")
g.add_argument("--micro-batch", type=int, default=None,
               help="rows per forward/backward (accumulated); default: 16 on CPU, on a GPU the largest "
               "of 16, 8, 4, 2, 1 that the plan fits, at most 32,768 tokens a rank")
g.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
               help="a micro-batch (one prompt's rows) runs the prompt once for all its responses, "
               "exactly as row by row (--no-shared-prefix); default on")
g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=True,
               help="drop equal-reward groups (no signal), refill from next prompts; default on")
g.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate; default 3e-5")
g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay; default 0.01")
g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; default 1.0")
g = ap.add_argument_group("run")
g.add_argument("--steps", type=int, default=200, help="training steps; default 200")
g.add_argument("--sp", type=int, default=1, help="sequence-parallel degree: ranks per SP group, "
               "which split each sequence; world = dp x sp; default 1")
g.add_argument("--fsdp", action="store_true", help="shard the trained weights, their gradients and "
               "AdamW state over all ranks (FSDP2), not replicate: the same updates; no-op in one process")
g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
               help="keep each decoder layer's input only, recompute the layer in backward: a 4,096-"
               "frame pass 0.26x the memory, 1.25x the time; default: on where the plan does not "
               "fit without it (on CPU: a training pass over 2 GiB a rank)")
g.add_argument("--seed", type=int, default=0, help="seed for data order and sampling; default 0")
g.add_argument("--out", default="runs/grpo", help="output folder; default runs/grpo")
g.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps (0 = end only)")
g.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
# -----------------------------------------------------------------------------


def load_reward(spec):
    """The reward function: data.reward, or module:function from --reward."""
    if spec is None:
        return D.reward
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def score(fn, text, row):
    """Reward dict of one sample; a raising reward function is reported by the caller."""
    r = fn(text, row)
    r = r if isinstance(r, dict) else {"overall": float(r)}
    if not math.isfinite(r["overall"]):
        raise ValueError(f"non-finite reward {r['overall']}")
    return r


def check_args(args):
    """Settings that would fail late or train silently wrong, refused at start (usage, exit 2)."""
    if args.temperature <= 0:
        ap.error("--temperature must be > 0: the trainer divides logits by it, and greedy rollouts "
                 "give a prompt's G samples one answer (no signal)")
    if args.G < 2:
        ap.error("--G must be at least 2: an advantage compares a sample with its prompt's others")
    if 0 < args.dual_clip <= 1:
        ap.error("--dual-clip must be > 1 (or 0 = off): at or below 1 it replaces the loss of "
                 "every A < 0 token with the constant -A * dual_clip (zero gradient)")
    if not 0 <= args.overlong_buffer <= args.max_new:
        ap.error(f"--overlong-buffer must be in [0, --max-new = {args.max_new}]")
    if args.tis < 0:
        ap.error("--tis must be > 0 (or 0 = off)")
    return args


# The algorithm's math, each piece small enough to test against hand-computed values.

def group_advantages(r, G, kind="grpo", eps=1e-6):
    """(N,) rewards, G per consecutive group -> (N,) advantages (docstring item 5): grpo
    (r - mean) / (std + eps), unbiased std (arXiv 2402.03300); drgrpo r - mean (arXiv 2503.20783);
    rloo r - the mean of the other G - 1 = G / (G - 1) (r - mean) (arXiv 2402.14740); reinforce++
    r - mean, which `whiten` then normalizes over the batch (arXiv 2501.03262)."""
    r = r.view(-1, G)
    a = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        a = a / (r.std(1, keepdim=True) + eps)
    elif kind == "rloo":
        a = a * G / (G - 1)
    return a.view(-1)


def whiten(adv, lens, sp_group=None, eps=1e-8):
    """REINFORCE++-baseline's batch normalization (arXiv 2501.03262; verl's masked_whiten over the
    response mask): (N,) advantages -> (a - mu) / sqrt(var + eps), mu and unbiased var over every
    response token of all data-parallel ranks' rows (a row counts len(response) times)."""
    adv, lens = adv.double(), lens.double()
    n = mr_sp.dp_sum(dict(tokens=float(lens.sum()), sum=float((lens * adv).sum())), sp_group)
    mu = n["sum"] / max(n["tokens"], 1.0)
    ss = mr_sp.dp_sum(dict(ss=float((lens * (adv - mu) ** 2).sum())), sp_group)["ss"]
    return (adv - mu) / math.sqrt(ss / max(n["tokens"] - 1, 1.0) + eps)


def overlong_penalty(length, max_new, buffer, penalty):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), scaled by penalty: 0 up to
    max_new - buffer tokens, then falling linearly to -penalty at max_new. 0 when buffer is 0."""
    return -penalty * min(max(length - (max_new - buffer), 0), buffer) / buffer if buffer else 0.0


def kl_estimate(logp, ref, kind):
    """Per-token KL(policy || ref) estimators, Schulman, "Approximating KL divergence" (2020)."""
    d = ref - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    d = d.clamp(-20, 20)  # as verl: exp(d) of fp32 is inf past 88, and its gradient NaN
    return (d.exp() - d - 1).clamp(-10, 10)  # k3, clamped as in verl / Long-RL


def clamp_keep_nan(x, lo, hi):
    """x clamped to [lo, hi] with no gradient past them, as verl bounds log-ratios; a NaN keeps its
    gradient (torch.clamp's is 0 there), so a NaN that reaches the loss still skips the update."""
    return torch.where((x < lo) | (x > hi), x.clamp(lo, hi), x)


def policy_loss(logp, old, adv, mask, kind, clip_low, clip_high, dual_clip):
    """Per-token loss (N, T) and where clipping changed it (N, T) (docstring item 7): logp, old,
    mask (N, T), adv (N,); kind clip, gspo or cispo."""
    a = adv[:, None]
    log_r = logp - old
    if kind == "gspo":  # the sequence's length-normalized log-ratio at each token, gradient of logp
        seq = (log_r * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (N, 1)
        log_r = clamp_keep_nan(logp - logp.detach() + seq.detach(), -math.inf, 10)  # verl: log s <= 10
    else:  # verl's bound: fp32's exp is inf past 88 nats, and then a loss or gradient inf or NaN
        log_r = clamp_keep_nan(log_r, -20, 20)
    ratio = log_r.exp()
    if kind == "cispo":
        w = ratio.clamp(1 - clip_low, 1 + clip_high)
        return -w.detach() * a * logp, (w != ratio).float()
    pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip and kind == "clip":  # GSPO's paper and verl bound s by the clip alone
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual_clip), pg)
    return pg, (pg != pg1).float()


def tis_weights(old, rollout, mask, cap, level):
    """Truncated importance sampling (Yao et al. 2025; verl's rollout correction): (N, T) weights
    min(pi_old / pi_rollout, cap) of the sampled tokens, per token or, level "seq", the ratio of
    the sequences' probabilities (exp of the sum over their tokens) at each token; and where the
    cap cut them (N, T). old, rollout: log-probs (N, T); mask (N, T) marks the response tokens."""
    log_w = (old - rollout) * mask
    if level == "seq":
        log_w = log_w.sum(1, keepdim=True).expand_as(old)
    w = log_w.exp()
    return w.clamp(max=cap), (w > cap).float() * mask


def aggregate(x, mask, agg, n_tokens, n_seqs, max_new=None):
    """Sum of this micro-batch's share of the global mean: token-mean, seq-mean-token-mean, or
    Dr. GRPO's token sum over n_seqs x max_new, a constant (arXiv 2503.20783; verl's
    seq-mean-token-sum-norm, TRL's dr_grpo)."""
    if agg == "token":
        return (x * mask).sum() / n_tokens
    if agg == "drgrpo":
        return (x * mask).sum() / (n_seqs * max_new)
    return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs


def chunks(xs, size):
    return [xs[j:j + size] for j in range(0, len(xs), size)]


def mini_batches(rows, n, size, sharded=False):
    """This rank's rows as n near-equal slices (update m takes slice m of every rank's rows), each
    in micro-batches of at most `size` rows of one prompt: (micro-batches, each update's micro-batch
    indices). Rows of one prompt share its length, so a micro-batch is padded on the right only and
    no pass needs an attention mask (an (L, L) one at a long video's L would not fit).
    sharded (FSDP): every rank runs as many passes in each update (mr_sp.equal_passes)."""
    parts = [rows[m * len(rows) // n:(m + 1) * len(rows) // n] for m in range(n)]
    parts = [[mb for _, g in itertools.groupby(p, key=lambda x: x["key"]) for mb in
              chunks(list(g), size)] for p in parts]  # a prompt's rows: adjacent, its prepare key
    parts = mr_sp.equal_passes(parts, sharded)
    ends = [sum(len(p) for p in parts[:m + 1]) for m in range(n)]
    mini_idx = [list(range(e - len(p), e)) for p, e in zip(parts, ends)]
    return [mb for p in parts for mb in p], mini_idx


# -----------------------------------------------------------------------------
# One step: collect groups of rollouts, score them with the old policy and the reference, update.

@dataclasses.dataclass
class Policy:
    """What a GRPO step samples from and trains."""
    model: torch.nn.Module
    tok: object
    params: list  # the trained parameters: language model and lm_head (the vision tower is frozen)
    opt: torch.optim.Optimizer
    ref: torch.nn.Module = None  # the frozen initial policy of the KL term; None at --kl-coef 0
    llm: object = None  # a vLLM engine to roll out with; None: ours (mr_sp.rollout chooses)
    run: object = mr_sp.call  # run(fn, *args): a pass on model (--fsdp: its root, which gathers)
    run_ref: object = mr_sp.call  # the same for ref


def load_ref(path, device, **tiny_kwargs):
    """The KL term's reference: the initial policy, stored and run as the policy is (fp32 weights;
    under --dtype bfloat16 the same autocast), so at step 0 both give the same log-probs. Without
    the towers (vision; Qwen2.5-Omni's audio): they never run, the policy's frozen towers encode
    each video and its sound for both."""
    ref = M.load(path, device=device, **tiny_kwargs)[0].requires_grad_(False)
    for name in M.towers(ref):  # dropped, not copied: loading holds one model at a time
        setattr(M.parts(ref)[0], name, None)
    return ref


def copy_ref(model):
    """A frozen copy of model without its towers, as load_ref returns (bench.py gpu)."""
    holder, towers = M.parts(model)[0], M.towers(model)
    for name in towers:
        setattr(holder, name, None)
    ref = copy.deepcopy(model).requires_grad_(False)
    for name, tower in towers.items():
        setattr(holder, name, tower)
    return ref


def build_policy(args, par, src, **tiny_kwargs):
    """The policy from src (a folder, or "tiny" built with tiny_kwargs), the reference from --init,
    and AdamW, laid out as args ask: --activation-checkpointing, --sp (Ulysses), --fsdp (sharded
    over all ranks when there are several; run and run_ref then gather)."""
    model, tok = M.load(src, device=par.device, **tiny_kwargs)
    params = rl_params(model)
    ref = load_ref(args.init, par.device, **tiny_kwargs) if args.kl_coef else None
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if args.sp > 1:
        for m in (model, ref) if ref is not None else (model,):
            mr_sp.use_ulysses(m)
    run, run_ref = mr_sp.call, mr_sp.call
    if args.fsdp and par.world > 1:  # one process holds everything either way
        # the frozen tower too: it runs only in the step's collect, where `unsharded` gathers all
        dtype = getattr(torch, args.dtype)
        run = mr_sp.shard(model, model.parameters(), dtype)
        params = [p for p in model.parameters() if p.requires_grad]  # now sharded
        if ref is not None:
            run_ref = mr_sp.shard(ref, ref.parameters(), dtype)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return Policy(model, tok, params, opt, ref, run=run, run_ref=run_ref)


def rl_params(model):
    """The parameters RL trains, the language model and lm_head; the towers are frozen."""
    model.requires_grad_(False)
    for m in (M.parts(model)[1], model.lm_head):
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# sums over scored samples; flat: samples of groups whose rewards are all equal; nll: their tokens'
# -log p under the sampling policy (over response_len: an estimate of its entropy, nats a token)
SCORES = ("reward", "accuracy", "format", "response_len", "truncated", "samples", "flat", "nll")
PHASES = ("encode", "rollout", "old", "ref", "update")  # a step's, timed and their peak memory


def prompt_positions(cursor, rank, world, per, start, n):
    """Data-order positions of data-parallel rank `rank`'s prompts start .. start+n-1 in a step from
    `cursor` with `per` prompts per rank. The first per*world go in contiguous blocks of per, one
    per rank (one process whose micro-batch is one rank's rows runs exactly the ranks' batches);
    those dynamic sampling reads later stride over ranks. E.g. cursor 100, 2 ranks, per 3: rank 0
    reads 100 101 102, then 106 108 110 ...; rank 1 reads 103 104 105, then 107 109 111 ... If the
    most any rank read is 5, the step consumed 5 * 2 = 10; the next starts at 110."""
    return [cursor + rank * per + k if k < per else cursor + per * world + rank + (k - per) * world
            for k in range(start, start + n)]


def score_groups(args, tok, samples, prompts, out, reward_fn, stats):
    """Reward each prompt's G rollouts. Returns the kept groups' training rows (G per prompt, with
    advantages) and a SCORES list per scored sample, dropped groups included (kept groups lean to
    mixed rewards: the policy's numbers are over all). Dynamic sampling drops groups of all-equal
    rewards (A = 0: no signal); a raising reward function costs its group (counted in stats)."""
    toks, lps, lens = out
    rows, scored, eos = [], [], mr_sp.eos_ids(tok)
    for b, (s, p) in enumerate(zip(samples, prompts)):
        group = []
        try:
            for j in range(b * args.G, (b + 1) * args.G):
                resp = toks[j, :lens[j]].tolist()
                r = score(reward_fn, tok.decode(resp, skip_special_tokens=True), s)
                group.append(dict(p, response=resp, reward=r, rollout_lp=lps[j, :lens[j]].cpu()))
        except Exception as e:  # a broken reward function must not kill a long run
            print(f"reward function failed on sample {s['id']}: {e!r}; its group is skipped", file=sys.stderr)
            stats["reward_errors"] += 1
            continue
        sizes = [len(x["response"]) for x in group]  # EOS included: cut at --max-new without one
        cut = [float(n == args.max_new and x["response"][-1] not in eos)
               for x, n in zip(group, sizes)]
        shaping = [overlong_penalty(n, args.max_new, args.overlong_buffer, args.overlong_penalty)
                   for n in sizes]
        rs = torch.tensor([x["reward"]["overall"] + p for x, p in zip(group, shaping)])
        flat = float((rs == rs[0]).all())
        scored += [[x["reward"]["overall"], x["reward"].get("accuracy", 0.0),
                    x["reward"].get("format", 0.0), n, c, 1.0, flat, -float(x["rollout_lp"].sum())]
                   for x, n, c in zip(group, sizes, cut)]
        if args.dynamic_sampling and flat:
            stats["dropped_groups"] += 1
            continue
        for x, a, c in zip(group, group_advantages(rs, args.G, args.adv).tolist(), cut):
            x["adv"] = a
            if args.mask_truncated and c:
                x["keep"] = 0.0  # counts nowhere in the loss (as --fsdp's weight-0 copies)
        rows += group
    return rows, scored


Collected = collections.namedtuple("Collected", "rows consumed sums")


def collect(args, step, policy, read, cursor, par, reward_fn, stats, timed):
    """This data-parallel rank's groups for one step (SP peers collect the same): Collected rows (G
    per kept prompt), prompts consumed over all ranks, and SCORES sums over all scored samples.
    read(positions): the samples at those data-order positions, minus bad videos."""
    per = want = args.prompts // par.dp
    k, rows, scored = 0, [], []
    lockstep = policy.llm is not None and par.world > 1  # vLLM's engines: every rank, every round
    while want > 0 or lockstep:
        at = prompt_positions(cursor, par.dp_rank, par.dp, per, k, want)
        k += want
        with timed("encode"):
            samples = read(at)
            prompts = [mr_sp.prepare(policy.model, policy.tok, s, D.question_text(s), par.sp_group)
                       for s in samples]
            samples = [{k: v for k, v in s.items() if k not in ("pixel_values", "input_features")}
                       for s in samples]  # encoded
        if samples or lockstep:
            # SP peers split each prompt's G samples (seeded per sample) and exchange them
            bf16 = (args.rollout_dtype or args.dtype) == "bfloat16"  # the rollouts' own dtype
            with timed("rollout"), torch.autocast(par.device.type, torch.bfloat16, enabled=bf16,
                                                  cache_enabled=False):  # see main
                out = mr_sp.rollout(policy.model, policy.tok, prompts, args.G,
                                    [mr_sp.seed_of(args.seed, step, s["id"]) for s in samples], policy.llm,
                                    max_new=args.max_new, temperature=args.temperature, top_p=args.top_p,
                                    sp_group=par.sp_group, chunk=args.prefill_chunk)
            kept, sc = score_groups(args, policy.tok, samples, prompts, out, reward_fn, stats)
            rows, scored, want = rows + kept, scored + sc, want - len(kept) // args.G
        if not args.dynamic_sampling:
            break
        short, over = want > 0, want > 0 and k > 8 * per  # over: else a sharp policy reads all the data
        if lockstep:  # every rank decides alike: vLLM's engines step together
            short, over = mr_sp.all_reduce(torch.tensor([short, over], dtype=torch.int64), "max").tolist()
        if not short:
            break
        if over:
            if want > 0 and not scored:
                raise RuntimeError(f"dynamic sampling: {k} prompts read for one step and not one "
                                   "video readable")
            if want > 0:
                print(f"step {step + 1}: dynamic sampling read {k} prompts and found {per - want} of "
                      f"{per} groups whose rewards differ: training on those (a sharp policy samples "
                      "one answer G times: see flat_groups and rollout_entropy in metrics.jsonl; an "
                      "SFT checkpoint that learned its rows by heart, or a reward that cannot tell "
                      "samples apart?)", file=sys.stderr)
            break
    consumed = int(mr_sp.all_reduce(torch.tensor([k]), "max")) * par.dp  # furthest any rank read
    sums = torch.tensor(scored, dtype=torch.float64).reshape(-1, len(SCORES)).sum(0)
    return Collected(rows, consumed, dict(zip(SCORES, sums.tolist())))


def no_grad_logprobs(run, model, tok, micro, args, sp_group=None):
    """One pass over the micro-batches without gradients (old policy, reference)."""
    with torch.no_grad():
        return [run(mr_sp.logprobs, model, tok, mb, args.temperature, sp_group,
                    args.shared_prefix)[0] for mb in micro]


def update(args, policy, micro, mini_idx, old, refs, stats, sp_group=None):
    """--epochs passes over the micro-batches, an optimizer step per entry of mini_idx (a
    mini-batch: its micro-batch indices); old and refs (or None) per micro-batch. old None:
    on-policy (one epoch, one mini-batch), each micro-batch's own log-probs before any update,
    detached, filled into the list returned. Returns metrics and the old log-probs."""
    model, tok, params, opt = policy.model, policy.tok, policy.params, policy.opt
    log = dict(kl=0.0, clip_frac=0.0, entropy=0.0, grad_norm=0.0)
    olds, cut = list(old) if old is not None else [None] * len(micro), dict(cut=0.0, tokens=0.0)
    # global token and sequence counts of each mini-batch: the loss is their global mean
    # (weight-0 rows: --fsdp's copies, --mask-truncated's rows, count nothing)
    minis = [[x for i in idx for x in micro[i]] for idx in mini_idx]
    counts = [mr_sp.dp_sum(dict(tokens=sum(len(x["response"]) * x.get("keep", 1.0) for x in rows),
                                seqs=sum(x.get("keep", 1.0) for x in rows)), sp_group)
              for rows in minis]
    w = 1.0 / (args.epochs * max(sum(1 for n in counts if n["seqs"]), 1))  # logs: means of updates
    for epoch in range(args.epochs):
        for idx, n in zip(mini_idx, counts):
            if not n["seqs"]:  # no rows on any rank: nothing to learn from, no AdamW step
                continue
            n_tok, n_seq = n["tokens"], n["seqs"]
            for i in idx:
                lp, ent, mask = policy.run(mr_sp.logprobs, model, tok, micro[i],
                                           args.temperature, sp_group, args.shared_prefix)
                olds[i] = lp.detach() if olds[i] is None else olds[i]
                keep = torch.tensor([x.get("keep", 1.0) for x in micro[i]], device=mask.device)
                mask = mask * keep[:, None]
                adv = torch.tensor([x["adv"] for x in micro[i]], dtype=lp.dtype, device=lp.device)
                loss_tok, clipped = policy_loss(lp, olds[i], adv, mask, args.loss, args.clip_low,
                                                args.clip_high, args.dual_clip)  # (N, T)
                if args.tis:  # the engine's log-probs laid out as the trainer's (N, T)
                    eng, on = torch.zeros_like(lp), torch.zeros_like(lp)
                    for b, x in enumerate(micro[i]):
                        eng[b, :len(x["rollout_lp"])] = x["rollout_lp"]
                        on[b, :len(x["rollout_lp"])] = x.get("keep", 1.0)  # weight-0 rows unmarked
                    tw, c = tis_weights(olds[i], eng, on, args.tis, args.tis_level)
                    loss_tok = loss_tok * tw
                    if epoch == 0:
                        cut = dict(cut=cut["cut"] + float(c.sum()), tokens=cut["tokens"] + float(on.sum()))
                if refs is not None:
                    kl = kl_estimate(lp, refs[i], args.kl)
                    loss_tok = loss_tok + args.kl_coef * kl
                    log["kl"] += w * float((kl.detach() * mask).sum()) / n_tok
                aggregate(loss_tok, mask, args.agg, n_tok, n_seq, args.max_new).backward()
                log["clip_frac"] += w * float((clipped * mask).sum()) / n_tok
                log["entropy"] += w * float((ent.detach() * mask).sum()) / n_tok
            gn, skipped = mr_sp.optimizer_step(params, opt, args.grad_clip)
            if skipped:  # (stats need no key until a step is skipped)
                stats["skipped_updates"] += 1
            log["grad_norm"] += w * gn
    log.update(mr_sp.dp_sum({k: log[k] for k in ("kl", "clip_frac", "entropy")}, sp_group))
    cut = mr_sp.dp_sum(cut, sp_group)
    return dict(log, tis_frac=cut["cut"] / max(cut["tokens"], 1.0)), olds


def logprob_gap(old, micro):
    """The largest gap over ranks between the engine's log-probs of its samples and the trainer's
    (old): float error when both describe the same policy (at --top-p 1); a stale engine or other
    positions would show here."""
    gap = max([(o[b, :len(x["response"])].cpu() - x["rollout_lp"]).abs().max().item()
               for o, mb in zip(old, micro) for b, x in enumerate(mb)], default=0.0)
    return mr_sp.all_reduce(torch.tensor([gap]), "max").item()


def step(args, i, policy, read, cursor, par, reward_fn, stats, phase=lambda name: contextlib.nullcontext()):
    """GRPO step i (from 0): collect this rank's groups, old-policy and reference passes, updates,
    and for --engine vllm the weight sync. Returns the metrics record (the caller adds stats, the
    run's counters) and the prompts consumed over all ranks. Times its phases encode, rollout, old,
    ref, update, sync; phase(name), a context manager around each, lets benchmarks time them too."""
    times, peaks = collections.defaultdict(float), collections.defaultdict(float)

    @contextlib.contextmanager
    def timed(name):
        t0 = time.perf_counter()
        mr_sp.memory_window()
        with phase(name):
            yield
        times[name] += time.perf_counter() - t0
        peaks[name] = max(peaks[name], mr_sp.peak_memory() / 2**30)

    model, tok, llm = policy.model, policy.tok, policy.llm
    model.eval()
    # --fsdp: the policy's weights gathered once for all of this step's rollouts, released after
    batch = mr_sp.unsharded(policy.run, collect, args, i, policy, read, cursor, par, reward_fn, stats, timed)
    mr_sp.vllm_sleep(llm, True)  # GPU: a vLLM engine's memory goes to the training passes
    if args.adv == "reinforce++":  # normalized over the global batch, whatever the number of ranks
        adv = whiten(torch.tensor([x["adv"] for x in batch.rows]),
                     torch.tensor([len(x["response"]) for x in batch.rows]), par.sp_group)
        for x, a in zip(batch.rows, adv.tolist()):
            x["adv"] = a
    # sharded: each pass gathers, so every rank runs as many in each update
    micro, mini_idx = mini_batches(batch.rows, args.mini_batches, args.micro_batch, mr_sp.sharded(model))
    with timed("old"):  # on-policy (one epoch, one mini-batch): the update's own, detached
        old = (None if args.epochs == 1 and args.mini_batches == 1 else
               no_grad_logprobs(policy.run, model, tok, micro, args, par.sp_group))
    with timed("ref"):
        refs = (no_grad_logprobs(policy.run_ref, policy.ref, tok, micro, args, par.sp_group)
                if policy.ref is not None else None)
    model.train()
    with timed("update"):
        log, old = update(args, policy, micro, mini_idx, old, refs, stats, par.sp_group)
    gap = logprob_gap(old, micro)
    with timed("sync"):  # the next rollouts sample from the updated policy
        mr_sp.vllm_sleep(llm, False)
        mr_sp.vllm_sync(llm, model)
    # each rank's peak memory per phase (GiB; CPU: above the Python runtime), every rank's row
    table = torch.zeros(par.world, len(PHASES), dtype=torch.float64)
    table[par.rank] = torch.tensor([peaks[k] for k in PHASES], dtype=torch.float64)
    table = mr_sp.all_reduce(table).T.tolist()
    s = mr_sp.dp_sum({**batch.sums, "groups": len(batch.rows) / args.G}, par.sp_group)
    n, busy = max(s["samples"], 1.0), sum(times[k] for k in PHASES)
    rec = dict(step=i + 1, groups=round(s["groups"]), reward=s["reward"] / n, accuracy=s["accuracy"] / n,
               format=s["format"] / n, response_len=s["response_len"] / n,
               truncated=s["truncated"] / n, flat_groups=s["flat"] / n,
               rollout_entropy=s["nll"] / max(s["response_len"], 1.0), rollout_logprob_gap=gap,
               **log, time_encode=times["encode"], time_rollout=times["rollout"],
               time_prefill=times["old"] + times["ref"], time_update=times["update"],
               time_sync=times["sync"], tok_per_s=s["response_len"] / busy,
               peak_gb=max(map(max, table)), peak_gb_ranks={k: [round(x, 4) for x in row]
                                                             for k, row in zip(PHASES, table)})
    return rec, batch.consumed


def main(args):
    check_args(args)
    par = mr_sp.init_parallel(args.sp)
    if args.init == ap.get_default("init") and not os.path.exists(args.init):
        raise SystemExit(f"{args.init} not found: run `python sft.py` first, or pass --init tiny "
                         "--no-dynamic-sampling to start from scratch")
    ckpt = os.path.join(args.out, "model")
    src, state = M.resume(ckpt) if args.resume else (args.init, None)
    # planned from the config alone, before any weights load: unset flags resolved, a layout that
    # cannot run (--prompts over dp) or a GPU it does not fit refused
    mr_sp.plan_start(args, mr_sp.plan_config(src), par)
    policy = build_policy(args, par, src)
    model, tok, opt = policy.model, policy.tok, policy.opt
    if args.engine == "vllm":
        policy.llm = mr_sp.vllm_engine(model, tok, src, args.rollout_dtype or args.dtype,
                                       args.vllm_mem, args.vllm_tp, args.seed)
    start = mr_sp.load_state(model, opt, state)
    cursor, stats = ((state["cursor"], state["stats"]) if state else
                     (0, {"bad_samples": 0, "reward_errors": 0, "dropped_groups": 0, "skipped_updates": 0}))
    rows = D.split_rows(D.load_rows(D.prepare_task(args.data, par.rank)), args.part)
    # each SP peer keeps only the pixels of the frames it encodes (mr_sp.encode_visual)
    ds = D.VideoDataset(rows, nframes=args.frames, max_pixels=args.max_pixels,
                        proc=M.processor_config(model.config), sp=(par.rank % par.sp, par.sp))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    reward_fn = load_reward(args.reward)
    if par.rank == 0:
        mr_sp.open_log(args, start)
        print(f"GRPO from {args.init}: {len(rows)} prompts ({args.part} part of {args.data}), "
              f"{par.world} process(es) (dp {par.dp} x sp {args.sp}), G={args.G}, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
              f"parameters{' (sharded)' if mr_sp.sharded(model) else ''}")

    def read(positions):  # a bad video is skipped, never replaced (counted in ds.n_bad)
        return list(ds.iter_samples([order[a % len(order)] for a in positions]))

    with mr_sp.autocast(par.device, args.dtype):
        for i in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="grpo",
                      disable=par.rank != 0):
            rec, used = step(args, i, policy, read, cursor, par, reward_fn, stats)
            cursor += used
            stats["bad_samples"] = ds.n_bad
            rec.update(stats)
            if par.rank == 0:
                mr_sp.log_step(args.out, rec, " | ".join([
                    f"step {i + 1}", f"reward {rec['reward']:.3f}", f"acc {rec['accuracy']:.3f}",
                    f"fmt {rec['format']:.2f}", f"len {rec['response_len']:.0f}", f"kl {rec['kl']:.4f}",
                    f"clip {rec['clip_frac']:.3f}", f"ent {rec['entropy']:.2f}", f"flat {rec['flat_groups']:.2f}",
                    f"gnorm {rec['grad_norm']:.2f}", f"lp gap {rec['rollout_logprob_gap']:.0e}"
                    + (f" tis cut {rec['tis_frac']:.3f}" if args.tis else ""),
                    f"encode {rec['time_encode']:.1f}s rollout {rec['time_rollout']:.1f}s "
                    f"prefill {rec['time_prefill']:.1f}s update {rec['time_update']:.1f}s",
                    f"{rec['tok_per_s']:.0f} tok/s", f"peak {rec['peak_gb']:.2f} GB"]))
            if (args.save_every and (i + 1) % args.save_every == 0) or i + 1 == args.steps:
                sd, state = mr_sp.save_state(model, opt, step=i + 1, cursor=cursor, stats=stats)  # collective
                if par.rank == 0:
                    M.save(model, tok, ckpt, state_dict=sd, state=state)
    if par.rank == 0:
        print(json.dumps({"out": ckpt, "steps": args.steps, **stats}))
    mr_sp.shutdown()


if __name__ == "__main__":
    main(ap.parse_args())
