"""MR-SP: Multi-modal Reinforcement Sequence Parallelism, the system side of long-video RL.

    python mr_sp.py plan --frames 3600 --sp 8 --fsdp  # per-rank memory of a GRPO step, Qwen2.5-VL-7B
    python mr_sp.py plan --frames 1024 --config tiny --max-pixels 3136 --dtype float32 --micro-batch 8

What every stage calls for its videos and its long sequences:
- `init_parallel(sp)`: the `Parallel` layout (rank, world = dp x sp, the SP group, device), the
  same under `python` and `torchrun`; `dp_sum` reduces named metrics over data-parallel ranks.
- `prepare`: a sample's prompt and its video's embeddings through the (frozen) vision tower
  (`encode`), computed once per prompt; rollouts and every prefill pass of the step reuse them.
- `rollout`: tokens and log-probs from the one engine entry: ours (model.generate: prompt prefilled
  once, KV cache copied into G rows decoding together) or vLLM's (`vllm_engine`, cached embeddings).
- `prefill_logprobs`: response-token log-probs of [prompt | response] rows (old, reference, policy).
- `shard` (--fsdp): FSDP2 over all ranks instead of replicated weights and `sync_grads`; a pass
  runs through the `run` it returns (`call` when replicated), a rollout through `unsharded` (the
  weights gathered once); `full_state` and `load_optimizer` keep checkpoints in the replicated format.
- `open_log`, `log_step`: a run's args.json and metrics.jsonl.

With `group=`, the two MR-SP stages (paper section 4; tests/test_mr_sp.py: equal to one process):
1. `encode` splits a video's temporal patch groups over the ranks and all-gathers the embeddings.
2. `prefill_logprobs` splits the sequence over the ranks; text attention is Ulysses
   (`ulysses_attention`, entered through transformers' attention registry): an all-to-all trades
   the sequence split for a head split, attention runs over the full sequence, and back.
"""
import atexit
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from tqdm import tqdm

import model as M


# Process-group backends by device type: on CUDA, NCCL for GPU tensors and gloo beside it for the
# CPU ones (metric sums, sample lengths, counts): "nccl" alone maps only cuda, and a collective on a CPU
# tensor then fails ("No backend type associated with device type cpu").
BACKEND = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def init_distributed():
    """(rank, world, device). Under torchrun: a process group of BACKEND[device type]."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group(BACKEND["cuda" if cuda else "cpu"])
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Where this process sits in world = dp x sp (checked in init_parallel): ranks [k*sp, (k+1)*sp)
    form SP group k and split its samples' videos and sequences; data splits over dp groups."""
    rank: int  # this process, 0 .. world-1
    world: int  # processes, dp * sp
    dp_rank: int  # which share of the data: rank // sp
    dp: int  # data-parallel size: world // sp
    sp: int  # sequence-parallel degree
    group: object  # this rank's SP process group; None when sp is 1 (the plain data-parallel path)
    device: torch.device


def init_parallel(sp=1):
    """This process's Parallel layout, its process groups made (every rank makes every group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if sp < 1 or world % sp:  # SystemExit prints its text only: one line at start, no traceback
        raise SystemExit(f"world size {world} is not divisible by --sp {sp}: world = dp x sp needs "
                         f"a whole number of data-parallel groups, dp = {world}/{sp}")
    rank, world, device = init_distributed()
    groups = [dist.new_group(list(range(k * sp, (k + 1) * sp)))
              for k in range(world // sp)] if sp > 1 else None
    return Parallel(rank, world, rank // sp, world // sp, sp, groups and groups[rank // sp], device)


def shutdown():
    """Leave the process group together: a rank tearing gloo down while another works (rank 0 on
    the checkpoint) can abort the job. Only init_distributed's: in-process vLLM ends its own, and
    under torchrun also ours (its engine's finalizer destroys the default group at exit)."""
    if dist.is_initialized() and "RANK" in os.environ:
        dist.barrier()
        if not _vllm_spmd:
            dist.destroy_process_group()


_vllm_spmd = False  # set by vllm_engine under torchrun


def all_reduce(x, op="sum"):
    """Reduce a tensor over ranks in place ("sum" or "max"); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def dp_sum(values, group=None):
    """{name: number} summed over data-parallel ranks in one all-reduce, as floats (float64 sums).
    SP peers hold the same rows and compute the same values, so only the first rank of each SP
    group contributes (the others add zeros): exact, unlike dividing a sum over all ranks by sp."""
    x = torch.tensor(list(values.values()), dtype=torch.float64)
    if group is not None and dist.get_rank(group):
        x.zero_()
    return dict(zip(values, all_reduce(x).tolist()))


def sync_grads(params):
    """Data parallel: sum every rank's gradients (each rank's loss is its share of the global mean).
    One all-reduce per tensor (DDP without buckets); a parameter without a gradient adds zeros.
    Sharded (FSDP) parameters are skipped: their gradients were reduce-scattered in backward."""
    from torch.distributed.tensor import DTensor
    for p in params:
        if isinstance(p, DTensor):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)


def call(fn, *args, **kw):
    """A pass on a replicated model: what `shard`'s root does, minus the gathering."""
    return fn(*args, **kw)


class _Root(torch.nn.Module):
    """FSDP's root unit, a call-through forward around the model: FSDP gathers a unit's weights in
    hooks around its forward, and our passes call the model's parts (visual, language_model,
    lm_head), never model.forward. root(fn, *args) runs a pass with the root's weights gathered."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kw):
        return fn(*args, **kw)


def shard(model, params=None, dtype=torch.float32):
    """FSDP2 (`fully_shard`) over all ranks, instead of sync_grads for a model too big to replicate.
    Units: each decoder layer and vision block holding `params` (default: the trainable ones), and
    the input embeddings unless tied, gathered in their forward and backward; the root (final norms,
    lm_head, vision patch embedding and merger; tied embeddings), gathered once for a whole pass. A
    unit's forward is a collective every rank must enter as often as the others: each pass embeds
    once on every rank, but lm_head runs in chunks over the responses, and under --sp only on the
    ranks holding response columns, so an lm_head unit of its own would hang. In the root it costs
    its gathered copy through the pass (Qwen2.5-VL-7B: 1.1 GB in bf16). Other parameters stay
    replicated: a
    frozen tower has no gradients or optimizer state, and its MR-SP encode (uneven shares, no
    forward on some ranks) must not wait on a gather. Returns run(fn, *args) for every forward
    (`call`'s signature); ranks must run equally many passes (unit forwards are collective), and a
    rollout runs in `unsharded`. Make the optimizer after (it replaces parameters).

    dtype: the gathered weights' (bfloat16 for --dtype bfloat16: FSDP's mixed precision, as
    torchtitan's; shards, AdamW and the gradients' reduction stay fp32), which halves what a pass and
    the rollout gather.

    Gradients come out as sync_grads's, summed over all ranks (dp x sp): our loss is already each
    rank's share of the global mean, where FSDP would average. A divide factor of 1 alone reduces
    with PREMUL_SUM, which gloo rejects; forcing SUM collectives makes it a plain sum."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # FSDP warns that an in-place op on a view it returns would skip its backward hook: our passes
    # return log-probs sliced from one tensor (views) and never change them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    params = {p for p in model.parameters() if p.requires_grad} if params is None else set(params)
    blocks = list(model.model.language_model.layers) + list(getattr(model.model.visual, "blocks", []))
    if not model.config.tie_word_embeddings:  # a tied weight cannot sit in two units
        blocks.append(model.get_input_embeddings())
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    units = [fully_shard(b, mp_policy=mp) for b in blocks if any(p in params for p in b.parameters())]
    root = fully_shard(_Root(model), ignored_params=set(model.parameters()) - params, mp_policy=mp)
    for u in units + [root]:
        u.set_gradient_divide_factor(1.0)
        u.set_force_sum_reduction_for_comms(True)
    return root


def unsharded(run, fn, *args, **kw):
    """run(fn, *args) with every unit of a sharded model gathered once up front (one all-gather a
    unit, on every rank) and kept until fn returns: the rollout then decodes as many steps as its
    rank needs with no collective, where per-layer gathers would need every rank at every step.
    Replicated (run is `call`): fn(*args)."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(run, FSDPModule):
        return run(fn, *args, **kw)
    units = [m for m in run.modules() if isinstance(m, FSDPModule)]

    def gathered():
        for u in units:
            u.unshard()
        return fn(*args, **kw)

    run.set_reshard_after_forward(False)  # every unit: forward hooks keep the gathered weights
    try:
        return run(gathered)
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(u is not run, recurse=False)  # fully_shard's defaults


def _param_names(model, opt):
    """The optimizer's parameters by name, in its order: torch.distributed.checkpoint keys optimizer
    state by name, Optimizer.state_dict() by position."""
    name = {p: n for n, p in model.named_parameters()}
    return [name[p] for g in opt.param_groups for p in g["params"]]


def _rekey(osd, key):
    return {"state": {key(k): s for k, s in osd["state"].items()},
            "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in osd["param_groups"]]}


def full_state(model, opt=None):
    """(model state dict, optimizer state dict) of a sharded model, whole and on CPU on rank 0
    (empty elsewhere); every rank must call it (the shards are gathered). The optimizer's is keyed
    by position like Optimizer.state_dict(), so state.pt is the same with and without FSDP."""
    import torch.distributed.checkpoint.state_dict as dcp
    o = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = dcp.get_model_state_dict(model, options=o)
    osd = dcp.get_optimizer_state_dict(model, opt, options=o) if opt is not None else None
    # a tied weight (the tiny model's lm_head is its embedding) is gathered under each of its names,
    # as two tensors; keep its first name only, as save_pretrained keeps of the model's own
    aliases = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
               - dict(model.named_parameters()).keys())
    sd = {k: v for k, v in sd.items() if k not in aliases}
    if opt is None:
        return sd, None
    ids = {n: i for i, n in enumerate(_param_names(model, opt))}
    return sd, _rekey(osd, ids.__getitem__) if osd else osd


def load_optimizer(model, opt, osd):
    """Optimizer.load_state_dict for a sharded model: every rank passes the whole state (as
    full_state returns it) and keeps its shards."""
    import torch.distributed.checkpoint.state_dict as dcp
    dcp.set_optimizer_state_dict(model, opt, _rekey(osd, _param_names(model, opt).__getitem__),
                                 options=dcp.StateDictOptions(full_state_dict=True))


def open_log(args, start):
    """Rank 0, at a run's start: --out made, the resolved config in args.json, metric lines after
    step `start` dropped (a run killed after its last checkpoint logged steps the resume redoes)."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    path = os.path.join(args.out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if json.loads(line)["step"] <= start]
        with open(path, "w") as f:
            f.writelines(keep)


_writers = {}


def log_step(out, rec, line):
    """One step: its line on the console (above the progress bar), its record appended to
    out/metrics.jsonl, and its numbers in TensorBoard when tensorboard is installed."""
    tqdm.write(line)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    if out not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
            _writers[out] = SummaryWriter(out)
        except ImportError:
            _writers[out] = None
    for k, v in rec.items() if _writers[out] else ():
        if isinstance(v, (int, float)):
            _writers[out].add_scalar(k, v, rec["step"])


def seed_of(*key):
    """An integer seed from a key such as (seed, step, sample id): the same in every process and
    every run (Python's hash() of strings is not)."""
    return zlib.crc32(repr(key).encode())


def encode(model, sample, group=None):
    """A sample's visual embeddings (n_tokens, width), detached (the vision tower is frozen in RL);
    None for a text-only sample. Qwen3-VL's DeepStack features ride along (model.encode).

    With an SP group (MR-SP stage 1) each rank encodes a contiguous share of the video's temporal
    patch groups, all-gathered after. The vision attention of every family (Qwen2.5-VL's window and
    full blocks alike) never crosses a temporal group, and Qwen3-VL's learned position embeddings
    are interpolated per frame's grid: this equals one rank encoding the whole video."""
    if sample.get("kind") is None:
        return None
    dev = next(model.parameters()).device
    pixels, grid = sample["pixel_values"].to(dev), sample["grid_thw"].to(dev)
    with torch.no_grad():
        if group is None:
            return M.encode(model, pixels, grid)
        if len(grid) != 1:
            raise ValueError(f"sharded encode takes one video per sample, got grid_thw {grid.tolist()}")
        sp, r = dist.get_world_size(group), dist.get_rank(group)
        t, h, w = grid[0].tolist()
        counts = [t // sp + (i < t % sp) for i in range(sp)]  # temporal groups per rank, near-even
        per = h * w // model.config.vision_config.spatial_merge_size ** 2  # tokens a temporal group
        start = sum(counts[:r]) * h * w  # pixel rows are group-major: h*w rows per temporal group
        width = model.config.get_text_config().hidden_size * (
            1 + len(getattr(model.config.vision_config, "deepstack_visual_indexes", ())))
        # all_gather takes equal sizes: every share is padded to the largest, and trimmed after; in
        # the dtype the tower returns (under autocast its compute dtype, not its fp32 weights')
        dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                 else model.model.visual.dtype)
        buf = torch.zeros(max(counts) * per, width, dtype=dtype, device=dev)
        if counts[r]:
            buf[:counts[r] * per] = M.encode(model, pixels[start:start + counts[r] * h * w],
                                             grid.new_tensor([[counts[r], h, w]]))
        shares = [torch.empty_like(buf) for _ in range(sp)]
        dist.all_gather(shares, buf, group=group)
        return torch.cat([x[:c * per] for x, c in zip(shares, counts)])


def prepare(model, tok, sample, text, group=None):
    """A sample as its rollouts and step's passes use it: prompt ids, (3, P) positions, its video's
    or image's embeddings encoded once (over the SP group: `encode`; None: text only), and for
    vLLM, which expands the visual placeholder and places the embeddings itself, the unexpanded
    ids and what it needs to expand them (kind, grid, seconds per temporal group, frame times)."""
    ids, pos = M.prompt_of(tok, model.config, sample, text)
    kind, grid, times = sample.get("kind"), sample.get("grid_thw"), sample.get("frame_times")
    return dict(prompt=ids, pos=pos, visual=encode(model, sample, group), kind=kind, grid_thw=grid,
                second_per_grid=sample.get("second_per_grid"), frame_times=times,
                engine_prompt=M.build_prompt(tok, model.config, text, kind, grid, times, expand=False))


def visuals(rows):
    """The rows' visual embeddings in row order (text-only rows have none), or None."""
    v = [r["visual"] for r in rows if r["visual"] is not None]
    return torch.cat(v) if v else None


def rollout(model, tok, prompts, G, seeds=None, llm=None, max_new=64, temperature=1.0, top_p=1.0,
            group=None, chunk=1024):
    """G samples per prompt from our engine (model.generate: each prompt prefilled once, in chunks
    of `chunk` tokens, its KV cache shared by the G samples) or, given `llm`, vLLM fed the same
    cached embeddings. Returns tokens (B*G, T) padded after EOS, log-probs and lengths (EOS
    included); a prompt's G rows are adjacent.

    prompts: dicts from `prepare`. seeds: one int per prompt (seed_of a key such as (seed, step,
    id)); sample j draws from seed + j, as in vLLM, so what a sample is depends neither on its batch
    nor on the number of ranks. With an SP group whose size divides G, each peer samples its share
    of every prompt's G and the peers exchange them: every peer returns all G (the same as without
    a group). The engines draw from different random streams: the same seeds, different tokens."""
    gen = dict(max_new=max_new, temperature=temperature, top_p=top_p)
    sp, r = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    sp, r = (sp, r) if G % sp == 0 else (1, 0)  # G not splitting: every peer samples all of it
    n = G // sp
    if llm is not None:  # (with no prompts too: vLLM's engines under torchrun step in lockstep)
        out = vllm_rollout(llm, tok, prompts, n, seeds and [x + r * n for x in seeds], **gen)
        return out if sp == 1 else _gather_samples(out, len(prompts), tok.pad_token_id, group)
    dev = next(model.parameters()).device
    outs, k = [], 0
    for batch in _batches(prompts, ROLLOUT_TOKENS):
        with torch.no_grad():
            cache, mask, h = _stack([_prefill_one(model, p, dev, group, chunk) for p in batch],
                                    model.config.get_text_config())
        gens = None if seeds is None else [torch.Generator(dev).manual_seed(x + j) for x in
                                           seeds[k:k + len(batch)] for j in range(r * n, (r + 1) * n)]
        nxt = torch.tensor([int(p["pos"].max()) + 1 for p in batch], device=dev)
        outs.append(M.decode(model, cache, mask, h, nxt, n, eos_ids=eos_ids(tok), banned=M.banned_ids(tok),
                             pad_id=tok.pad_token_id, generator=gens, **gen))
        k += len(batch)
    T = max((o[0].shape[1] for o in outs), default=0)
    out = (torch.cat([F.pad(o[0], (0, T - o[0].shape[1]), value=tok.pad_token_id) for o in outs]),
           torch.cat([F.pad(o[1], (0, T - o[1].shape[1])) for o in outs]), torch.cat([o[2] for o in outs]))
    return out if sp == 1 else _gather_samples(out, len(prompts), tok.pad_token_id, group)


# Prompts whose KV caches decode together hold at most this many prompt tokens (a longer prompt
# decodes alone): their separately prefilled caches are copied into one batch, and at a long video's
# length one prompt's cache is GBs (Qwen2.5-VL-7B: 13 GB at 3,600 frames).
ROLLOUT_TOKENS = 32768


def _batches(prompts, budget):
    """Consecutive runs of prompts of at most `budget` prompt tokens in all (at least one prompt)."""
    out = []
    for p in prompts:
        if out and sum(len(q["prompt"]) for q in out[-1]) + len(p["prompt"]) <= budget:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _prefill_one(model, p, dev, group, chunk):
    """One prompt prefilled alone, so with no padding and no attention mask: its KV cache, the
    cache's (1, columns) mask (under SP: right-padded to a multiple of sp), and the last prompt
    column's hidden states (1, H)."""
    ids = torch.tensor([p["prompt"]], device=dev)
    embeds, pos, mask = M.splice(model, ids, p["visual"]), p["pos"][:, None].to(dev), torch.ones_like(ids)
    cache, h = (M.prefill(model, embeds, pos, None, chunk) if group is None
                else sp_prefill(model, embeds, pos, mask, group))
    return cache, F.pad(mask, (0, cache.get_seq_length() - mask.shape[1])), h


def _stack(parts, config):
    """(cache, mask, h) of prompts prefilled one by one -> one batch: the caches left-padded to the
    longest (a copy; one prompt: as it is), masks (B, P), hidden states (B, H)."""
    if len(parts) == 1:
        return parts[0]
    from transformers import DynamicCache
    P = max(m.shape[1] for _, m, _ in parts)
    pad = lambda x: F.pad(x, (0, 0, P - x.shape[2], 0))  # noqa: E731  (B, Hkv, t, D), on the left
    cache = DynamicCache(config=config)
    for i in range(len(parts[0][0].layers)):
        cache.update(torch.cat([pad(c.layers[i].keys) for c, _, _ in parts]),
                     torch.cat([pad(c.layers[i].values) for c, _, _ in parts]), i)
    return (cache, torch.cat([F.pad(m, (P - m.shape[1], 0)) for _, m, _ in parts]),
            torch.cat([h for _, _, h in parts]))


def sp_prefill(model, embeds, pos, mask, group):
    """M.prefill with the prompt split over the SP group, as the training passes split it (Ulysses):
    each rank runs its l = P/sp columns (activations over l, not P), then every layer's keys and
    values are all-gathered, so each rank holds the whole prompt's cache (right-padded to sp*l
    masked columns) and the last column's hidden states (from the rank that ran it)."""
    from transformers import DynamicCache
    sp, r = dist.get_world_size(group), dist.get_rank(group)
    use_ulysses(model)
    P = embeds.shape[1]
    l = -(-P // sp)
    embeds, pos, mask = (F.pad(embeds, (0, 0, 0, sp * l - P)), F.pad(pos, (0, sp * l - P)),
                         F.pad(mask, (0, sp * l - P)))
    cache = DynamicCache(config=model.config.get_text_config())
    mine = slice(r * l, (r + 1) * l)
    h = M.forward(model, embeds[:, mine], pos[..., mine], None, cache, sp_group=group,
                  sp_mask=sp_mask_of(mask))
    for layer in cache.layers:
        for name in ("keys", "values"):
            parts = [torch.empty_like(getattr(layer, name)) for _ in range(sp)]
            dist.all_gather(parts, getattr(layer, name).contiguous(), group=group)
            setattr(layer, name, torch.cat(parts, 2))  # (B, Hkv, sp*l, D)
    last = (h[:, P - 1 - r * l].clone() if r * l <= P - 1 < (r + 1) * l
            else h.new_zeros(h.shape[0], h.shape[2]))  # (a copy: gloo reduces a strided view wrongly)
    dist.all_reduce(last, group=group)  # one rank holds column P-1, the others add zeros
    return cache, last


def _gather_samples(out, B, pad_id, group):
    """Each SP peer's n samples per prompt -> all peers' (B*sp*n rows, a prompt's adjacent, peer
    order): tokens and log-probs padded to the longest, then all-gathered over the group."""
    toks, lps, lens = out
    T = torch.tensor([toks.shape[1]])
    dist.all_reduce(T, op=dist.ReduceOp.MAX, group=group)
    T = int(T)
    toks, lps = F.pad(toks, (0, T - toks.shape[1]), value=pad_id), F.pad(lps, (0, T - lps.shape[1]))
    parts = []
    for x in (toks, lps, lens):
        got = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(got, x.contiguous(), group=group)
        parts.append(torch.stack(got).unflatten(1, (B, -1)).transpose(0, 1).flatten(0, 2))  # (B*sp*n, ...)
    return tuple(parts)


def eos_ids(tok):
    return [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def prefill_logprobs(model, tok, rows, temperature=1.0, group=None):
    """Log-probs and entropies (N, T) of each row's response, and the response mask (N, T).

    rows: dicts with prompt (ids), pos (3, P), visual (embeddings or None), response (ids). With an
    SP group every rank of it passes the same rows and gets the same tensors back (MR-SP stage 2)."""
    dev = next(model.parameters()).device
    ids, pos, mask, P = M.layout([r["prompt"] for r in rows], [r["pos"] for r in rows],
                                 [r["response"] for r in rows], pad_id=tok.pad_token_id)
    # no attention mask for right padding only (a micro-batch of one prompt's rows: grpo.mini_batches):
    # causal attention alone is exact for every real token (decided on the host, once a pass)
    causal = sp_mask_of(mask) is None
    ids, pos, mask = ids.to(dev), pos.to(dev), mask.to(dev)
    embeds = M.splice(model, ids, visuals(rows))
    kw = dict(temperature=temperature, banned=M.banned_ids(tok))
    attn = None if causal else mask
    if group is None:
        lp, ent = M.response_logprobs(model, embeds, pos, attn, P, ids[:, P:], **kw)
    else:
        lp, ent = sp_response_logprobs(model, embeds, pos, attn, P, ids[:, P:], group, **kw)
    return lp, ent, mask[:, P:].to(lp.dtype)


# -----------------------------------------------------------------------------
# MR-SP stage 2: Ulysses sequence parallelism for the prefill.

def _all_to_all(x, group):
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j. Differentiable."""
    x = x.contiguous()
    return dist_nn.all_to_all_single(torch.empty_like(x), x, group=group)


def ulysses_heads(H, K, sp):
    """(H', K'): the query heads (zero heads added) and KV heads (repeated) Ulysses splits over sp
    ranks so that each rank holds whole GQA groups over whole KV heads. Each KV head repeats rep =
    lcm(K, sp)/K times (K' = lcm(K, sp)); each group of g = H/K query heads is padded to a multiple
    of rep (Qwen2.5-VL-7B at sp 8: K 4 -> 8, g 7 -> 8, H 28 -> 32). H' = H when rep divides g."""
    rep = sp // math.gcd(K, sp)
    return K * (-(-H // K // rep) * rep), K * rep


def ulysses_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, sp_group=None,
                      sp_mask=None, **kw):
    """Text attention for transformers' registry (name "ulysses"). q (B, H, l, D) after rotary,
    k, v (B, Hkv, l, D): this rank's block of l = L/sp tokens. Returns (B, l, H, D).

    Without sp_group (rollout, or sp=1) it is transformers' SDPA. With it: an all-to-all scatters
    heads and gathers the sequence, each rank attends with H'/sp heads over all L tokens, and the
    inverse all-to-all returns this rank's tokens with all heads (`ulysses_heads`: the zero heads
    that make the heads split are dropped). sp_mask (B, L) is the full sequence's padding mask
    (transformers' per-layer one covers only this block), or None when the rows are right-padded
    only: the caller decides once a pass, since deciding here would sync the host every layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if sp_group is None:
        return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kw)
    sp = dist.get_world_size(sp_group)
    (H, l), K = q.shape[1:3], k.shape[1]
    Hp, Kp = ulysses_heads(H, K, sp)
    k, v = k.repeat_interleave(Kp // K, 1), v.repeat_interleave(Kp // K, 1)
    if Hp > H:  # zero query heads at the end of each group (their outputs are dropped below)
        q = F.pad(q.unflatten(1, (K, H // K)), (0, 0, 0, 0, 0, (Hp - H) // K)).flatten(1, 2)
    hq, hk = Hp // sp, Kp // sp
    x = torch.cat([t.unflatten(1, (sp, -1)) for t in (q, k, v)], 2).transpose(0, 1)  # (sp, B, hq+2hk, l, D)
    x = _all_to_all(x, sp_group).permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, hq+2hk, L, D)
    q, k, v = x.split([hq, hk, hk], 1)
    L = x.shape[2]
    if sp_mask is None:  # right padding only: causal alone is exact
        mask = None
    else:  # left padding: (B, 1, L, L) causal, real keys, and the diagonal (all-masked rows: NaN)
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = (causal & sp_mask.bool()[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         dropout_p=dropout, scale=scaling, enable_gqa=hk != hq)
    y = out.unflatten(2, (sp, l)).permute(2, 0, 1, 3, 4)  # (B, hq, L, D) -> (sp, B, hq, l, D)
    y = _all_to_all(y, sp_group).permute(1, 3, 0, 2, 4).flatten(2, 3)  # (B, l, H', D)
    if Hp > H:  # the zero heads' outputs dropped
        y = y.unflatten(2, (K, Hp // K))[:, :, :, :H // K].flatten(2, 3)
    return y, None


def sp_mask_of(mask):
    """What ulysses_attention takes as sp_mask: None when the rows are right-padded only (causal
    alone is exact), else the mask. One host sync, made once a pass by its callers."""
    return None if bool((mask[:, 1:] <= mask[:, :-1]).all()) else mask


def use_ulysses(model):
    """Switch the text attention to `ulysses_attention` (vision attention unchanged). Without an SP
    group it is SDPA with transformers' own masks, so rollouts on the same model are unaffected."""
    if model.config.text_config._attn_implementation != "ulysses":
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionInterface.register("ulysses", ulysses_attention)
        AttentionMaskInterface.register("ulysses", sdpa_mask)
        model.set_attn_implementation({"text_config": "ulysses"})


def sp_response_logprobs(model, embeds, pos, mask, P, targets, group, **kw):
    """M.response_logprobs with the sequence split over group; the same (B, T) results on each rank.

    Gradients: callers compute the same loss from these gathered tensors on every rank. The gather's
    backward sums those sp identical gradients, a hook divides by sp: each rank's gradients are its
    share, and their group sum is exactly the sp=1 gradient (sync_grads sums them, over dp too)."""
    sp, r = dist.get_world_size(group), dist.get_rank(group)
    use_ulysses(model)
    B, T = targets.shape
    n = P + T - 1  # columns run through the model: the last token predicts nothing
    l = -(-n // sp)  # tokens per rank; the sequence is padded to sp*l with masked columns
    embeds, pos = F.pad(embeds[:, :n], (0, 0, 0, sp * l - n)), F.pad(pos[..., :n], (0, sp * l - n))
    mask = None if mask is None else F.pad(mask[:, :n], (0, sp * l - n))  # None: right padding only
    mine = slice(r * l, (r + 1) * l)
    hidden = M.forward(model, embeds[:, mine], pos[..., mine], sp_group=group, sp_mask=mask)
    a, b = max(P - 1, r * l), min(P - 1 + T, (r + 1) * l)  # this rank's response-predicting columns
    if b > a:  # column P-1+j predicts response token j
        lp, ent = M.token_logprobs(model, hidden[:, a - r * l:b - r * l],
                                   targets[:, a - P + 1:b - P + 1], **kw)
        local = F.pad(torch.stack([lp, ent]), (a - r * l, (r + 1) * l - b))  # (2, B, l)
    else:  # no response here, still tied to hidden (every rank must run every all-to-all's backward)
        # and to lm_head: FSDP reduce-scatters a unit's gradients as one buffer of the parameters that
        # have one, which must be the same on every rank (a real token: 0 x a finite log-prob)
        lp, ent = M.token_logprobs(model, hidden[:, -1:], targets[:, :1], **kw)
        local = hidden.new_zeros(2, B, l, dtype=torch.float32) + 0.0 * (lp.sum() + ent.sum())
    if local.requires_grad:
        local.register_hook(lambda g: g / sp)
    full = torch.cat(dist_nn.all_gather(local, group=group), -1)  # (2, B, sp*l)
    return full[0, :, P - 1:P - 1 + T], full[1, :, P - 1:P - 1 + T]


# -----------------------------------------------------------------------------
# Memory planner: python mr_sp.py plan --frames F --sp N --config tiny|small|qwen2.5-vl-7b|HF_FOLDER

# bench.py's model: vision FLOPs per video token / LM FLOPs per token = 0.393, Qwen2.5-VL-7B's 0.394
# (`model_costs`; matmul FLOPs, no attention scores), found by trying LM widths and depths around
# the tiny model's vision tower until it matched: vision and LM split time and memory as in the 7B.
SMALL = dict(hidden=256, layers=6, heads=4, kv_heads=2, vision_hidden=128, vision_depth=2, vision_heads=4)
# The real checkpoints' config.json values that shape parallelism and memory (planned without a
# download); model.TINY's "tiny:<name>" miniatures share their structure at tiny widths.
REAL = {
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(  # Qwen2.5-VL-7B-Instruct
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           tokens_per_second=2),
        tie_word_embeddings=False)),
    "qwen2.5-vl-3b": ("qwen2_5_vl", dict(  # Qwen2.5-VL-3B-Instruct: what bench.py gpu built on one GPU
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           tokens_per_second=2),
        tie_word_embeddings=True)),
    "qwen3-vl-8b": ("qwen3_vl", dict(  # Qwen3-VL-8B-Instruct
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False)),
}


def plan_config(name):
    """A config by name: "tiny", "small" (SMALL), a model.TINY name, a REAL name, or a local HF folder."""
    import transformers
    if name in ("tiny", "small"):
        return M.tiny_config(M.tiny_tokenizer(), **(SMALL if name == "small" else {}))
    if name in M.TINY:
        family, kw = M.TINY[name]
        return M.tiny_config(M.tiny_tokenizer(), family, **kw)
    if name.lower() in REAL:
        family, cfg = REAL[name.lower()]
        return getattr(transformers, M.FAMILIES[family] + "Config")(**cfg)
    return transformers.AutoConfig.from_pretrained(name)


def model_costs(config):
    """Parameters (all; trainable in RL: LM and lm_head) and forward FLOPs per token (vision per
    video token, LM per token) of a config, on a meta-device model: no memory, no download."""
    import transformers
    with torch.device("meta"):
        m = getattr(transformers, M.FAMILIES[config.model_type] + "ForConditionalGeneration")(config)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    vis, lm = m.model.visual, m.model.language_model
    merge = config.vision_config.spatial_merge_size ** 2  # patches per video token; merger: once a token
    return dict(params=n(m), trainable=n(m) - n(vis), vision=n(vis), layer=n(lm.layers[0]),
                head=0 if config.tie_word_embeddings else n(m.lm_head),  # untied: embeddings too
                vision_flops=2 * (merge * (n(vis) - n(vis.merger)) + n(vis.merger)),
                lm_flops=2 * (n(lm) - n(lm.embed_tokens)))


def plan(config, frames, sp=1, max_pixels=128 * 28 * 28, text=64, G=8, max_new=1024, micro_batch=1,
         dtype="bfloat16", ref=True, world=None, fsdp=False, ckpt=False, chunk=1024, prefill_chunk=1024):
    """Estimated peak memory per rank, in bytes, of one GRPO step of this code (grpo.py) on one
    video prompt per data-parallel rank: the components and the peak.

    Held all step: fp32 policy weights and its reference (the language model), AdamW's two fp32
    states, and the cached video embeddings; `fsdp` divides the first three by `world` (default sp)
    and gathers in the compute dtype. Plus the largest phase:
    - encode: the video's pixel rows (all on every rank), dropped once encoded;
    - rollout: the prompt's KV cache once, its spliced embeddings, and the larger of the prefill
      (sp=1: a `prefill_chunk` of layer intermediates, and transformers' (chunk, P) bool mask that
      SDPA turns into floats, 5 B an entry; sp>1: Ulysses over P/sp tokens, no mask) and the decode
      (this rank's G/sp samples: their own KV, one layer's fp32 scores over the prompt, logits);
      with fsdp, the whole policy gathered (`unsharded`);
    - no-grad pass (old, reference; sequence-parallel): a micro-batch's largest layer intermediates;
    - training pass: autograd's saved values per token and layer, counted on our path with
      torch.autograd.graph.saved_tensors_hooks (tiny models): 4I + 8d + 2*Hkv*D + H + 2 at sp=1,
      Ulysses 4I + 7d + 2*H'*D + 2*lcm(Hkv, sp)*D + H' + 2 per local token (its all-to-all
      output: one more copy; H' = H unless `ulysses_heads` adds zero heads); `ckpt` (activation
      checkpointing) keeps d per token and layer, and one layer's values in its recompute. Then
      the larger of the backward's two stages: the lm_head chunk recomputed (chunk x vocab
      logits, about 6 fp32 copies), or one layer's backward intermediates; at sp=1
      with ragged rows the (B, L, L) mask, a float copy saved by every layer's SDPA (Ulysses: none
      for right padding); with fsdp the units gathered (and their unsharded gradients); plus the
      policy's fp32 gradients (`grads`, sharded with fsdp).
    Layer-level terms (no Python, allocator slack, small buffers). `python bench.py planner` checks
    it against peak RSS on CPU (tiny and small, sp 1 and 2, each option: 0.84x to 1.04x measured).

    Qwen2.5-VL-7B, 3,600 frames, sp=8 on 8 x 80 GB (`python mr_sp.py plan --frames 3600 --sp 8
    --fsdp`; bf16, G=8, 1,024-token responses, micro-batch 1): 231,488 tokens a row, 28,936 per
    rank. Peak 49.8 GiB per rank: policy weights, gradients and AdamW 14.5 (116 replicated), the
    reference 3.5 (28.4), the rollout 33.8 (the prompt's KV cache once, 12.4; the policy gathered in
    bf16, 15.5), the training pass 16.1 (172 without checkpointing). The largest video that fits 80
    GB is 9,068 frames (`max_frames`). The code before --fsdp, checkpointing and the shared prompt
    cache needed 311 GiB per rank here, most of it G copies of the prompt's KV cache and every
    layer's activations. The paper reports 3,600 frames (about 256k tokens) of RL on one 8 x A100 node."""
    W = (world or sp) if fsdp else 1  # ranks sharding policy and reference
    t = config.get_text_config()
    d, I, layers, H, K, V = (t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                             t.num_attention_heads, t.num_key_value_heads, t.vocab_size)
    D = getattr(t, "head_dim", None) or d // H
    b = 2 if dtype == "bfloat16" else 4  # activations and reference copy; policy weights stay fp32
    c = model_costs(config)
    groups, per_group = frames // 2, max_pixels // (28 * 28)  # groups of 2 frames, tokens a group
    video = groups * per_group
    P, T = video + text, max_new
    L, B = P + T, min(micro_batch, G)
    l = -(-L // sp)  # tokens per rank in the training passes
    Hp, kv = ulysses_heads(H, K, sp)  # Ulysses' padded query heads and repeated KV heads
    # values saved a token a layer; Ulysses' q and output after the all-to-all have the zero heads
    layer = 4 * I + (7 * d + 2 * Hp * D if sp > 1 else 8 * d) + 2 * kv * D + Hp + 2
    # checkpointed: each layer's input kept, one layer's values alive again in its recompute
    kept = (d * layers if ckpt else layer * layers) + 2 * D + 2 * d
    logits = 6 * 4 * min(chunk, B * T) * V
    # rows of different lengths at sp=1: transformers' (B, 1, L, L) bool mask, plus a float copy
    # saved by every layer's SDPA (measured: 13 B per element with 3 layers); no-grad: one at a time
    mask = B * L * L * (1 + 4 * (1 if ckpt else layers)) if sp == 1 and B > 1 else 0
    lm = c["trainable"]  # language model and lm_head: trained, and all of the reference
    # --fsdp, in the compute dtype (x2 in backward: unsharded gradients): a pass holds the root (norm,
    # lm_head, tied embeddings) and gathers a layer, the untied embeddings, at a time; the rollout, all
    fs = dict(root=b * (lm - layers * c["layer"] - c["head"]), layer=b * c["layer"],
              embed=b * c["head"]) if W > 1 else dict(root=0, layer=0, embed=0)
    m = dict(weights=4 * (lm + c["vision"]) / W, ref=4 * lm / W * ref, grads=4 * lm / W, adam=8 * lm / W,
             video_embeds=b * video * d)
    # backward: the head's (logits, its weights) then the layers' (a recompute, intermediates)
    back = max(logits,
               b * B * l * ((layer if ckpt else 0) + 3 * I + 2 * d) + 2 * fs["layer"])
    n = G // sp if G % sp == 0 else G  # samples this rank decodes
    C = min(prefill_chunk or P, P)
    pre = (b * l * (3 * I + 4 * d) + 2 * b * L * (Hp + 2 * kv) * D // sp if sp > 1
           else b * C * (3 * I + 4 * d) + (5 * C * P if C < P else 0))
    dec = n * T * layers * 2 * K * D * b + 4 * n * H * P + 4 * n * V
    phase = dict(encode=4 * frames * max_pixels * 3,  # the pixel rows, dropped once encoded
                 rollout=(b * P * (layers * 2 * K * D + d) + max(pre, dec)
                          + (b * (lm + c["vision"]) if W > 1 else 0)),
                 no_grad_pass=(b * B * l * (3 * I + 4 * d) + (5 * B * L * L if mask else 0)
                               + fs["root"] + max(fs["layer"], fs["embed"])),
                 training_pass=b * B * l * kept + back + mask + 2 * fs["root"])
    m.update(phase)
    m["state"] = m["weights"] + m["grads"] + m["adam"]  # the policy's: what --fsdp divides
    m["peak"] = (sum(m[k] for k in ("weights", "ref", "adam", "video_embeds"))
                 + max(phase["encode"], phase["rollout"], phase["no_grad_pass"],
                       phase["training_pass"] + m["grads"]))
    m.update(tokens=L, video_tokens=video, tokens_per_rank=l)
    return m


def plan_main(argv=None):
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="mr_sp.py plan", description=plan.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["plan"], help="the planner (the only command)")
    ap.add_argument("--frames", type=int, required=True, help="frames per video")
    ap.add_argument("--sp", type=int, default=1, help="sequence-parallel degree; default 1")
    ap.add_argument("--config", default="qwen2.5-vl-7b",
                    help="tiny | small | qwen2.5-vl-7b | qwen2.5-vl-3b | HF folder; default qwen2.5-vl-7b")
    ap.add_argument("--max-pixels", type=int, default=128 * 28 * 28,
                    help="pixels per frame, /784 = tokens per 2 frames; default 128*28*28 (64 tokens/frame)")
    ap.add_argument("--text", type=int, default=64, help="prompt text tokens besides video; default 64")
    ap.add_argument("--G", type=int, default=8, help="rollouts per prompt; default 8")
    ap.add_argument("--max-new", type=int, default=1024, help="response tokens; default 1024")
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per training forward; default 1")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--kl-coef", type=float, default=1e-2, help="0: no reference model; default 1e-2")
    ap.add_argument("--fsdp", action="store_true", help="policy and reference sharded over --world ranks")
    ap.add_argument("--world", type=int, default=0, help="ranks, dp x sp; default --sp (dp 1)")
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="decoder layers recomputed in backward (grpo.py's default: on)")
    ap.add_argument("--prefill-chunk", type=int, default=1024, help="grpo.py's: prefill tokens a forward")
    ap.add_argument("--gpu-gb", type=float, default=80, help="GiB per rank to compare with; default 80")
    a = ap.parse_args(argv)
    cfg = plan_config(a.config)
    peak = lambda f: plan(cfg, f, a.sp, a.max_pixels, a.text, a.G, a.max_new,  # noqa: E731
                          a.micro_batch, a.dtype, a.kl_coef != 0, a.world or a.sp, a.fsdp,
                          a.activation_checkpointing,
                          prefill_chunk=a.prefill_chunk)
    m, lo, hi = peak(a.frames), 0, 2
    while peak(hi)["peak"] <= a.gpu_gb * 2**30 and hi < 2**22:  # the largest even frame count that fits
        lo, hi = hi, 2 * hi
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if peak(mid)["peak"] <= a.gpu_gb * 2**30 else (lo, mid)
    print(f"{a.config}, {a.frames} frames = {m['video_tokens']:,} video tokens, "
          f"{m['tokens']:,} per row, {m['tokens_per_rank']:,} per rank at sp={a.sp}")
    for k in ("weights", "ref", "grads", "adam", "state", "video_embeds", "encode", "rollout",
              "no_grad_pass", "training_pass", "peak"):
        print(f"{k:>14} | {m[k] / 2**30:9.2f} GiB")
    gb = {k: round(x / 2**30, 3) for k, x in m.items()
          if k not in ("tokens", "video_tokens", "tokens_per_rank")}
    print(json.dumps(dict(config=a.config, frames=a.frames, sp=a.sp,
                          **{k: m[k] for k in ("tokens", "tokens_per_rank")}, gib=gb,
                          fits=m["peak"] <= a.gpu_gb * 2**30, max_frames=lo)))


# -----------------------------------------------------------------------------
# The vLLM rollout engine (--engine vllm), the paper's: fed the same cached video embeddings, it
# never runs the vision tower. vLLM is optional and imported only here; tests/test_vllm.py checks
# it against `rollout` and `prefill_logprobs` (in the environment .ci/vllm_env builds on CPU).

def vllm_engine(model, tok, path, dtype="float32", mem=0.7, tp=1, seed=0):
    """A vLLM engine in this process on model's HF folder `path` (a temporary one for the tiny
    model, which has none); no engine-core subprocess, so a weight sync is a call, not a socket
    copy. mem: fraction of GPU memory for weights and KV cache (gpu_memory_utilization); tp:
    tensor-parallel GPUs; on CPU the KV cache takes VLLM_CPU_KVCACHE_SPACE GiB (1 unless set).

    Under torchrun every rank runs its own engine, vLLM's SPMD mode for trainers (executor
    "external_launcher", data_parallel_size = world, in the job's own process group): the engines
    step in lockstep, so every rank must call generate equally often (grpo.collect's rounds do),
    with or without prompts of its own."""
    global _vllm_spmd
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and tp > 1:
        raise SystemExit("--engine vllm under torchrun: one engine a rank, --vllm-tp 1")
    _vllm_spmd = world > 1
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM: 1 thread
    try:
        from vllm import LLM
    except ImportError as e:
        raise ImportError("--engine vllm needs vLLM: `pip install vllm` on GPU; on CPU run with "
                          "the python that `bash .ci/vllm_env` prints (its own environment with "
                          "the CPU build of vLLM)") from e
    if not os.path.isdir(path):  # the tiny model: rank 0 writes it (transformers saves on rank 0 only)
        from torch.distributed.tensor import DTensor
        first = not dist.is_initialized() or dist.get_rank() == 0
        path = [tempfile.mkdtemp(prefix="longrl-engine-") if first else None]
        if world > 1:
            dist.broadcast_object_list(path, 0)
        path = path[0]
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        sd = full_state(model)[0] if sharded else None  # collective: every rank
        if first:
            atexit.register(shutil.rmtree, path, True)
            M.save(model, tok, path, state_dict=sd)
        if world > 1:
            dist.barrier()
    cuda = torch.cuda.is_available()
    return LLM(model=path, dtype=dtype, seed=seed, enforce_eager=not cuda, enable_mm_embeds=True,
               limit_mm_per_prompt={"image": 1, "video": 1}, gpu_memory_utilization=mem,
               tensor_parallel_size=tp, enable_sleep_mode=cuda, logprobs_mode="processed_logprobs",
               **(dict(distributed_executor_backend="external_launcher", data_parallel_size=world)
                  if world > 1 else {}))  # log-probs after ban and temperature, as our sampler


def vllm_rollout(llm, tok, prompts, G, seeds=None, max_new=64, temperature=1.0, top_p=1.0):
    """`rollout` on a vLLM engine (call `rollout` with llm=): the same arguments and return.

    Each prompt goes once with n = G, its unexpanded ids (`prepare`) and its video or image as
    cached embeddings (DeepStack features concatenated, as vLLM's Qwen3-VL takes them) with what
    vLLM needs to expand and position them as model.positions does: grid, and seconds per temporal
    group (Qwen2.5-VL) or each group's timestamp (Qwen3-VL). allowed_token_ids bans vision special
    tokens (exact -inf). Log-probs are of vLLM's sampling distribution: ours (temperature applied;
    greedy: at temperature 1) at top_p 1; below, vLLM renormalizes over the nucleus, we do not.
    vLLM gives sample j seed + j."""
    from vllm import SamplingParams
    banned = set(M.banned_ids(tok).tolist())
    allowed = [i for i in range(llm.llm_engine.model_config.get_vocab_size()) if i not in banned]
    greedy = temperature == 0  # vLLM takes n = 1 only: the G identical answers are copies
    family = llm.llm_engine.model_config.hf_config.model_type
    reqs, params = [], []
    for b, p in enumerate(prompts):
        req, kind = dict(prompt_token_ids=p["engine_prompt"]), p["kind"]
        if kind is not None:
            item = {f"{kind}_embeds": p["visual"].detach().cpu(),
                    f"{kind}_grid_thw": torch.as_tensor(p["grid_thw"]).view(-1, 3)}
            if kind == "video" and family == "qwen2_5_vl":
                item["second_per_grid_ts"] = torch.tensor([float(p["second_per_grid"])], dtype=torch.float64)
            if kind == "video" and family == "qwen3_vl":
                item["timestamps"] = [M.group_times(p["frame_times"])]  # a batch of one video
            req["multi_modal_data"] = {kind: item}
        reqs.append(req)
        params.append(SamplingParams(n=1 if greedy else G, max_tokens=max_new, temperature=temperature,
                                     top_p=top_p, logprobs=0, seed=None if seeds is None else seeds[b],
                                     allowed_token_ids=allowed, stop_token_ids=eos_ids(tok)))
    outs = [c for o in llm.generate(reqs, params, use_tqdm=False)
            for c in (o.outputs * G if greedy else sorted(o.outputs, key=lambda c: c.index))]
    lens = torch.tensor([len(c.token_ids) for c in outs], dtype=torch.long)  # with the stop token
    toks = torch.full((len(outs), max(lens.tolist(), default=0)), tok.pad_token_id, dtype=torch.long)
    lps = torch.zeros(toks.shape)
    for i, c in enumerate(outs):
        toks[i, :lens[i]] = torch.tensor(c.token_ids)
        lps[i, :lens[i]] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
    return toks, lps, lens


def vllm_sync(llm, model):
    """Load the policy's language-model weights into the engine in place (HF names, as saved), then
    drop what the old ones computed: prefix-cache KV blocks and encoder outputs (else vLLM fails
    with "Encoder cache miss"). The frozen vision tower, never run by vLLM, is not sent. No engine
    (llm None): ours samples from the policy itself, nothing to do."""
    if llm is None:
        return
    from torch.distributed.tensor import DTensor
    # one tensor at a time; a sharded (--fsdp) one gathered, in the same order on every rank
    weights = ((k, (v.full_tensor() if isinstance(v, DTensor) else v).detach())
               for k, v in model.state_dict().items() if not k.startswith("model.visual."))
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


def vllm_sleep(llm, asleep):
    """GPU: free the engine's memory for training (weights offloaded to CPU, KV cache dropped), and
    take it back before the next rollouts. CPU (no sleep mode) or no engine: nothing to do."""
    if llm is None or not torch.cuda.is_available():
        return
    if asleep:
        llm.sleep(level=1)
    else:
        llm.wake_up()


if __name__ == "__main__":
    plan_main()
