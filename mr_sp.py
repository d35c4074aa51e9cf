"""MR-SP: Multi-modal Reinforcement Sequence Parallelism, the system side of long-video RL.

    python mr_sp.py plan --frames 3600 --sp 8 --fsdp  # per-rank memory of a GRPO step, Qwen2.5-VL-7B
    python mr_sp.py plan --frames 3600 --fsdp --world 8  # the most data-parallel layout that fits
    python mr_sp.py plan --frames 1024 --config tiny --max-pixels 3136 --dtype float32 --micro-batch 8

What every stage calls for its videos and its long sequences:
- `init_parallel(sp)`: the `Parallel` layout (rank, world = dp x sp, `sp_group`, device), the
  same under `python` and `torchrun`; `dp_sum` reduces named metrics over data-parallel ranks.
- `prepare`: a sample's prompt and its video's embeddings through the (frozen) vision tower
  (`encode_visual`), and Qwen2.5-Omni's of its sound through the audio tower (`encode_audio`),
  computed once per prompt; rollouts and every log-prob pass of the step reuse them.
- `rollout`: tokens and log-probs from the one engine entry: ours (each prompt prefilled alone, no
  padding; its G samples decode over its KV cache held once) or vLLM's (`vllm_engine`, cached
  embeddings).
- `logprobs`: the training forward pass, response-token log-probs of [prompt | response]
  rows (the old-policy, reference and update passes);
  rows of one prompt run packed, the prompt once for all their responses (model.packed_attention;
  not through GDN layers, whose state would carry one response into the next).
- `memory_window`, `peak_memory`: a phase's peak (CUDA allocator; CPU resident set above the
  runtime).
- `shard` (--fsdp): FSDP2 over all ranks instead of replicated weights and `sync_grads`; a pass
  runs through the `run` it returns (`call` when replicated), a rollout through `unsharded` (the
  weights gathered once); `save_state` and `load_state` keep checkpoints in the replicated format.
- A run's skeleton, the same in sft.py, grpo.py and flow_grpo.py: `load_state` (--resume),
  `autocast` (--dtype), `equal_passes` (FSDP), `optimizer_step`, `save_state`, `open_log` and
  `log_step` (args.json, metrics.jsonl).
- `plan_run`: a run's memory per rank from its flags and the model's config alone (`plan`); grpo.py
  and sft.py plan theirs at start (`plan_start`: resolve the flags left to it, print, plan.json,
  stop a run its GPU cannot hold), and `python mr_sp.py plan` prints it for any layout.

With `sp_group=`, the two MR-SP stages (paper section 4; tests/test_mr_sp.py: equal to one process):
1. `encode_visual` splits a video's temporal patch groups over the ranks; each rank's sample holds
   only its share's pixels (data.VideoDataset with `sp`) and each rank keeps only its share's
   embeddings; `encode_audio` splits its sound's windows likewise
2. `logprobs` splits the sequence over the ranks, each splicing only its columns (the visual
   rows they hold come by one all-to-all: `splice_columns`); text attention is Ulysses
   (`ulysses_attention`, entered through transformers' attention registry): an all-to-all trades
   the sequence split for a head split, attention runs over the full sequence, and back (Qwen3.5's
   Gated DeltaNet layers likewise: `ulysses_gdn`). A rollout prefills the same way and each rank
   keeps its columns' KV cache (a GDN layer's fixed-size state: whole, gathered); the decode attends
   over the group (model.shared_prefix_attention). No rank holds a whole long video's embeddings or
   cache.
"""
import atexit
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import types
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from tqdm import tqdm

import data as D
import model as M


# Process-group backends by device type: on CUDA, NCCL for GPU tensors and gloo beside it for the
# CPU ones (metric sums, sample lengths, counts): "nccl" alone maps only cuda, and a collective on a
# CPU tensor then fails ("No backend type associated with device type cpu").
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
    sp_group: object  # this rank's SP process group; None when sp is 1 (the plain data-parallel path)
    device: torch.device


def init_parallel(sp=1):
    """This process's Parallel layout, its process groups made (every rank makes every group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if err := check_layout(world, sp):  # SystemExit prints its text only: one line, no traceback
        raise SystemExit(err)
    rank, world, device = init_distributed()
    groups = [dist.new_group(list(range(k * sp, (k + 1) * sp)))
              for k in range(world // sp)] if sp > 1 else None
    return Parallel(rank, world, rank // sp, world // sp, sp, groups and groups[rank // sp], device)


def _resident():
    """(resident set, its high-water mark) of this process, bytes; zeros where /proc is missing."""
    try:
        f = dict(line.split(":", 1) for line in open("/proc/self/status"))
    except OSError:
        return 0, 0
    return int(f["VmRSS"].split()[0]) * 1024, int(f["VmHWM"].split()[0]) * 1024


_runtime = 0


def memory_window():
    """Start a new peak-memory window (a phase's): CUDA's allocator peak, or on CPU the resident
    set's high-water mark (Linux; where it cannot be reset, the window is the whole run)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def runtime_baseline(config):
    """On CPU, the resident set that peak_memory leaves out: the interpreter with the libraries and
    the model family's code imported (transformers' modeling module alone is 150 MB), before any
    weights. The planner counts tensors, not these."""
    import importlib
    global _runtime
    try:
        importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    except ImportError:  # a family transformers lacks: model.load names it, with the families it has
        pass
    _runtime = _resident()[0]


def peak_memory():
    """Bytes at the current window's peak: CUDA's allocated tensors, or on CPU the resident set
    above the runtime's (`runtime_baseline`: what the planner counts, tensors, not the
    interpreter)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return max(_resident()[1] - _runtime, 0)


def shutdown():
    """Leave the process group together, then the process: a rank tearing gloo down while another
    works (rank 0 on the checkpoint) can abort the job, and so, once in CI, did a worker's C++
    teardown at interpreter exit after a finished run had saved everything ("terminate called
    without an active exception", exit -6; not reproduced in 160 runs here). So a torchrun worker
    leaves with os._exit(0) once the group is destroyed and its output flushed; nothing after this
    call runs (Python's exit handlers neither: the scripts register none). Only init_distributed's:
    in-process vLLM ends its own, and under torchrun also ours (its engine's finalizer destroys the
    default group at exit)."""
    if dist.is_initialized() and "RANK" in os.environ:
        dist.barrier()
        if not _vllm_spmd:
            dist.destroy_process_group()
            for w in _writers.values():
                if w:
                    w.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


_vllm_spmd = False  # set by vllm_engine under torchrun


def all_reduce(x, op="sum"):
    """Reduce a tensor over ranks in place ("sum" or "max"); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def dp_sum(values, sp_group=None):
    """{name: number} summed over data-parallel ranks in one all-reduce, as floats (float64 sums).
    It takes this rank's SP group because the all-reduce runs over the whole world (dp x sp), where
    the sp peers of a data-parallel rank hold the same rows and compute the same values: only the
    first rank of each SP group contributes (the others add zeros), which is exact, unlike dividing
    a sum over all ranks by sp. sp_group None (sp 1): every rank contributes."""
    x = torch.tensor(list(values.values()), dtype=torch.float64)
    if sp_group is not None and dist.get_rank(sp_group):
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


def optimizer_step(params, opt, clip, lr=None):
    """The accumulated gradients summed over ranks, clipped to global norm `clip`, applied at `lr`
    (None: as set) if that norm (the same on every rank) is finite, zeroed: (norm, skipped)."""
    sync_grads(params)
    gn = float(torch.nn.utils.clip_grad_norm_(params, clip))
    for g in opt.param_groups if lr is not None else ():
        g["lr"] = lr
    skipped = not math.isfinite(gn)
    if skipped:
        print(f"non-finite gradient norm ({gn}): update skipped, weights unchanged", file=sys.stderr)
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gn, skipped


def autocast(device, dtype):
    """A run's region: bfloat16 autocasts over fp32 weights (AdamW on bf16 ones loses small
    updates), uncached (its bf16 copy of a weight would live to the region's end: step 1's weights,
    ever)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16", cache_enabled=False)


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


def shard(model, params=None, dtype=torch.float32, blocks=None):
    """FSDP2 (`fully_shard`) over all ranks, instead of sync_grads for a model too big to replicate.
    Units: each decoder layer, vision block and audio tower layer holding `params` (default: the
    trainable ones), and the input embeddings unless tied, gathered in their forward and backward;
    the root (final norms, lm_head, the vision patch embedding and merger, the audio tower's
    convolutions and projection; tied embeddings), gathered once for a whole pass. A unit's forward
    is a collective every rank must enter as often as the others: each pass embeds once on every
    rank, but lm_head runs in chunks over the responses, and under --sp only on the ranks holding
    response columns, so an lm_head unit of its own would hang. In the root it costs its gathered
    copy through the pass (Qwen2.5-VL-7B: 1.1 GB in bf16). Other parameters stay replicated: a
    frozen tower has no gradients or optimizer state, and its MR-SP encode (uneven shares, no
    forward on some ranks) must not wait on a gather. Returns run(fn, *args) for every forward
    (`call`'s signature); ranks must run equally many passes (unit forwards are collective), and a
    rollout runs in `unsharded`. Make the optimizer after (it replaces parameters).

    dtype: the gathered weights' (bfloat16 for --dtype bfloat16: FSDP's mixed precision, as
    torchtitan's; shards, AdamW and the gradients' reduction stay fp32), which halves what a pass
    and the rollout gather.

    blocks: the units of a model that is not a transformers one (a diffusers transformer's blocks).

    Gradients come out as sync_grads's, summed over all ranks (dp x sp): our loss is already each
    rank's share of the global mean, where FSDP would average. A divide factor of 1 alone reduces
    with PREMUL_SUM, which gloo rejects; forcing SUM collectives makes it a plain sum."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # FSDP warns that an in-place op on a view it returns would skip its backward hook: our passes
    # return log-probs sliced from one tensor (views) and never change them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    params = {p for p in model.parameters() if p.requires_grad} if params is None else set(params)
    if blocks is None:
        tw = M.towers(model)  # vision blocks; Qwen2.5-Omni's audio tower layers too
        blocks = (list(M.parts(model)[1].layers) + list(getattr(tw.get("visual"), "blocks", []))
                  + list(getattr(tw.get("audio_tower"), "layers", [])))
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


def equal_passes(parts, fsdp):
    """FSDP's rule: a pass gathers weights (a collective), so every rank runs as many. parts: a list
    per update of this rank's micro-batches (lists of dict rows); fsdp, each padded to the most any
    rank has with weight-0 copies ("keep" 0.0; 1.0 where absent) of this rank's first
    micro-batch."""
    if not fsdp:
        return parts
    most = all_reduce(torch.tensor([len(p) for p in parts]), "max").tolist()
    if sum(most) > sum(map(len, parts)) and not any(parts):
        raise RuntimeError("this rank has no rows this step (unreadable videos or failing rewards) "
                           "for the passes the others run; --fsdp needs some")
    copy = [dict(x, keep=0.0) for x in next((mb for p in parts for mb in p), [])]
    return [p + [copy] * (k - len(p)) for p, k in zip(parts, most)]


def sharded(model):
    """Whether `shard` holds model's trainable weights as shards (DTensors)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


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


def save_state(model, opt, **state):
    """(model state dict: None if replicated, else gathered; {"opt": opt's, **state}) for rank 0's
    model.save: a checkpoint, in one format sharded or not. A collective: every rank calls it."""
    sd, osd = full_state(model, opt) if sharded(model) else (None, opt.state_dict())
    return sd, {"opt": osd, **state}


def load_state(model, opt, state):
    """--resume: opt takes save_state's (None: a new run; sharded: every rank passes the whole state
    and keeps its shards); the step to start from."""
    import torch.distributed.checkpoint.state_dict as dcp
    if state and sharded(model):
        dcp.set_optimizer_state_dict(model, opt, _rekey(state["opt"], _param_names(model, opt).__getitem__),
                                     options=dcp.StateDictOptions(full_state_dict=True))
    elif state:
        opt.load_state_dict(state["opt"])
    return state["step"] if state else 0


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


def encode_visual(model, sample, sp_group=None):
    """A sample's visual embeddings (n_tokens, width), detached (the vision tower is frozen in RL);
    None without a video or image (text, or audio alone): the vision tower (model.encode_pixels) on
    the sample's pixel rows. Qwen3-VL's DeepStack features ride along.

    With an SP group (MR-SP stage 1) each rank encodes a contiguous share of the video's temporal
    patch groups and keeps it: this rank's rows of the embeddings, `shares_of` them on each rank
    (`gather_visual` assembles the whole; the passes fetch only the rows of their columns). The
    vision attention of every family (Qwen2.5-VL's window and full blocks alike) never crosses a
    temporal group, and Qwen3-VL's learned position embeddings are interpolated per frame's grid:
    the shares are one rank's encoding of the whole video, split. A sample with "share"
    (data.VideoDataset with sp) holds only this rank's share of the pixel rows."""
    if sample.get("kind") not in ("video", "image"):
        return None
    dev = next(model.parameters()).device
    pixels, grid = sample["pixel_values"].to(dev), sample["grid_thw"].to(dev)
    share = sample.get("share")
    with torch.no_grad():
        if sp_group is None:
            if share is not None:
                raise ValueError("a sample holding an SP rank's share of its video needs the group")
            return M.encode_pixels(model, pixels, grid)
        if len(grid) != 1:
            raise ValueError(f"sharded encode takes one video per sample, got grid_thw {grid.tolist()}")
        sp, r = dist.get_world_size(sp_group), dist.get_rank(sp_group)
        t, h, w = grid[0].tolist()
        first, count = D.sp_share(t, r, sp)  # temporal groups, near-even
        if share is not None and tuple(share) != (first, count):
            raise ValueError(f"the sample holds temporal groups {tuple(share)} (first, count) of "
                             f"{t}; SP rank {r} of {sp} encodes {(first, count)}")
        start = 0 if share is not None else first * h * w  # rows are group-major: h*w per group
        if not count:
            width = model.config.get_text_config().hidden_size * (
                1 + len(getattr(model.config.vision_config, "deepstack_visual_indexes", ())))
            # in the dtype the tower returns (under autocast the compute dtype, not its weights')
            dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                     else M.parts(model)[0].visual.dtype)
            return torch.zeros(0, width, dtype=dtype, device=dev)
        px = pixels[start:start + count * h * w]
        return M.encode_pixels(model, px, grid.new_tensor([[count, h, w]]))


def audio_windows(config, frames, sp, r):
    """[lo, hi) of a clip's `frames` mel frames that SP rank r of sp encodes: a near-even share of
    the audio tower's windows of 2 * n_window frames (2 s), contiguous."""
    w = 2 * config.audio_config.n_window
    first, count = D.sp_share(-(-frames // w), r, sp)
    return min(first * w, frames), min((first + count) * w, frames)


def encode_audio(model, sample, sp_group=None):
    """A sample's audio embeddings (tokens, hidden), detached (the audio tower is frozen in RL);
    None without sound (a sample with no input_features).

    With an SP group each rank encodes a contiguous share of the clip's windows (`audio_windows`)
    and keeps it (`audio_shares_of` them on each rank; the passes fetch the rows of their columns,
    as for the video). Exact: Qwen2.5-Omni's audio tower runs each window of 2 * n_window mel frames
    on its own (its convolutions zero-padded at the window's edges, positions restarting, attention
    within the window: cu_seqlens), and a whole window pools to whole tokens (200 frames, 50
    tokens), so a share encoded as a clip of its own is the whole clip's encoding of those
    windows."""
    if "input_features" not in sample:
        return None
    dev = next(model.parameters()).device
    keep = sample["feature_attention_mask"][0].bool()
    lo, hi = 0, int(keep.sum())
    if sp_group is not None:
        lo, hi = audio_windows(model.config, hi, dist.get_world_size(sp_group), dist.get_rank(sp_group))
    feats = sample["input_features"][0][:, keep][:, lo:hi].to(dev)  # (128, this rank's frames)
    with torch.no_grad():
        if hi == lo:  # a rank past the clip's last window: none
            dtype = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
                     else model.audio_tower.dtype)
            return torch.zeros(0, model.config.text_config.hidden_size, dtype=dtype, device=dev)
        return M.encode_mels(model, feats[None], torch.ones(1, hi - lo, dtype=torch.long, device=dev))


def audio_shares_of(config, frames, sp):
    """Rows of a clip's audio embeddings (`frames` mel frames) that each of sp ranks encodes and
    holds."""
    return [int(D.audio_tokens(hi - lo)) if hi > lo else 0
            for lo, hi in (audio_windows(config, frames, sp, r) for r in range(sp))]


def embeddings(model, sample, sp_group=None):
    """A sample's encoded inputs as the passes take them: its visual and audio embeddings
    (`encode_visual`, `encode_audio`; None where it has none), and over an SP group the `shares` and
    `audio_shares` each rank holds of them (None: whole on every rank)."""
    sp = dist.get_world_size(sp_group) if sp_group is not None else 0
    frames = int(sample["feature_attention_mask"].sum()) if "input_features" in sample else 0
    grid = sample.get("grid_thw") if sample.get("kind") in ("video", "image") else None
    return dict(visual=encode_visual(model, sample, sp_group),
                audio=encode_audio(model, sample, sp_group),
                shares=shares_of(model.config, grid, sp) if sp and grid is not None else None,
                audio_shares=audio_shares_of(model.config, frames, sp) if sp and frames else None)


def shares_of(config, grid, sp):
    """Rows of a video's embeddings (grid_thw (1, 3)) that each of sp ranks encodes and holds."""
    t, h, w = [int(x) for x in torch.as_tensor(grid).view(-1)]
    per = h * w // config.vision_config.spatial_merge_size ** 2  # tokens a temporal group
    return [D.sp_share(t, i, sp)[1] * per for i in range(sp)]


def gather_visual(visual, shares, sp_group):
    """The whole embeddings from each rank's share (`encode_visual`): all-gathered, padded to the
    largest share (all_gather takes equal sizes) and trimmed. shares None: visual is whole
    already."""
    if shares is None or visual is None:
        return visual
    buf = F.pad(visual, (0, 0, 0, max(shares) - len(visual)))
    parts = [torch.empty_like(buf) for _ in shares]
    dist.all_gather(parts, buf, group=sp_group)
    return torch.cat([x[:n] for x, n in zip(parts, shares)])


def fetch_visual(visual, shares, lo, hi, sp_group):
    """Rows lo:hi of embeddings held in consecutive shares over the group (this rank's: visual),
    where each rank asks for its own lo:hi: one all-to-all, so a rank receives only what it asks
    for, never the whole video. shares None: visual is whole, sliced here."""
    if shares is None:
        return visual[lo:hi]
    asks = [torch.zeros(2, dtype=torch.long) for _ in shares]
    dist.all_gather(asks, torch.tensor([lo, hi]), group=sp_group)  # (host tensors: gloo beside NCCL)
    ends = torch.tensor(shares).cumsum(0).tolist()
    starts, r = [e - n for e, n in zip(ends, shares)], dist.get_rank(sp_group)
    overlap = lambda a, b, c, d: (max(a, c), max(min(b, d), max(a, c)))  # noqa: E731  [a,b) & [c,d)
    sends = [overlap(starts[r], ends[r], *map(int, ask)) for ask in asks]  # what each rank gets from me
    gets = [overlap(s, e, lo, hi) for s, e in zip(starts, ends)]
    send = torch.cat([visual[a - starts[r]:b - starts[r]] for a, b in sends])
    out = visual.new_empty(hi - lo, visual.shape[1])
    dist.all_to_all_single(out, send, [b - a for a, b in gets], [b - a for a, b in sends],
                           group=sp_group)
    return out


def splice_columns(model, ids, rows, a, b, sp_group=None):
    """M.splice of columns a:b of ids (B, L), row i's visual embeddings being rows[i]["visual"]
    (with rows[i]["shares"]: this rank's share, the rest fetched; `fetch_visual`), and its audio
    embeddings rows[i]["audio"] (Qwen2.5-Omni's; with rows[i]["audio_shares"] likewise). Each rank
    of an SP group passes its own columns and gets only the rows they hold. Rows of one prompt at
    the same columns (a micro-batch of its G samples) fetch them once."""
    out = []
    for what, audio in (("visual", False), ("audio", True)):
        if audio and all(r.get("audio") is None for r in rows):  # (the same on every rank)
            out.append(None)
            continue
        slots = torch.isin(ids, M.pad_ids(model.config, audio).to(ids.device))
        before = (slots.cumsum(1) - slots.long())[:, a].tolist() if a < ids.shape[1] else [0] * len(rows)
        inside = slots[:, a:b].sum(1).tolist()  # rows a row has in a:b; one host read a pass
        first = slots.long().argmax(1).tolist()  # the same on every rank: which rows fetch together
        shares = "audio_shares" if audio else "shares"
        got, parts = {}, []
        for i, row in enumerate(rows):
            if row.get(what) is None:
                continue
            key = (id(row[what]), first[i])
            if key not in got:
                got[key] = fetch_visual(row[what], row.get(shares), before[i],
                                        before[i] + inside[i], sp_group)
            parts.append(got[key])
        out.append(torch.cat(parts) if parts else None)
    return M.splice(model, ids[:, a:b], *out)


# Each prepared prompt's key: rows with one key are one prompt's (`logprobs` packs them). Not
# the prompt list's identity: FSDP's root casts a pass's inputs by rebuilding every dict and list.
_KEYS = itertools.count()


def prepare(model, tok, sample, text, sp_group=None):
    """A sample as its rollouts and step's passes use it: prompt ids, (3, P) positions, its video's
    or image's embeddings and its sound's encoded once (`embeddings`: None where it has none; over
    an SP group, this rank's shares of them and the shares of all), and for vLLM, which expands the
    visual placeholder and places the embeddings itself, the unexpanded ids and what it needs to
    expand them (kind, grid, seconds per temporal group, frame times)."""
    ids, pos = M.prompt_of(tok, model.config, sample, text)
    kind, grid, times = sample.get("kind"), sample.get("grid_thw"), sample.get("frame_times")
    return dict(prompt=ids, pos=pos, **embeddings(model, sample, sp_group), key=next(_KEYS),
                kind=kind, grid_thw=grid, second_per_grid=sample.get("second_per_grid"), frame_times=times,
                engine_prompt=M.build_prompt(tok, model.config, text, kind, grid, times, expand=False))


def rollout(model, tok, prompts, G, seeds=None, llm=None, max_new=64, temperature=1.0, top_p=1.0,
            sp_group=None, chunk=1024):
    """G samples per prompt from our engine (model.prefill and model.decode: each prompt prefilled
    once, in chunks of `chunk` tokens, its KV cache held once for its G samples, which attend to it
    through model.shared_prefix_attention) or, given `llm`, vLLM fed the same
    cached embeddings. Returns tokens (B*G, T) padded after EOS, log-probs and lengths (EOS
    included); a prompt's G rows are adjacent.

    prompts: dicts from `prepare`. seeds: one int per prompt (seed_of a key such as (seed, step,
    id)); sample j draws from seed + j, as in vLLM, so what a sample is depends neither on its batch
    nor on the number of ranks. With an SP group whose size divides G, each peer samples its share
    of every prompt's G and the peers exchange them: every peer returns all G (the same as without
    a group). The engines draw from different random streams: the same seeds, different tokens."""
    gen = dict(max_new=max_new, temperature=temperature, top_p=top_p)
    sp, r = (dist.get_world_size(sp_group), dist.get_rank(sp_group)) if sp_group is not None else (1, 0)
    sp, r = (sp, r) if G % sp == 0 else (1, 0)  # G not splitting: every peer samples all of it
    n = G // sp
    if llm is not None:  # (with no prompts too: vLLM's engines under torchrun step in lockstep)
        whole = [dict(p, visual=gather_visual(p["visual"], p.get("shares"), sp_group)) for p in prompts]
        out = vllm_rollout(llm, tok, whole, n, seeds and [x + r * n for x in seeds], **gen)
        return out if sp == 1 else _gather_samples(out, len(prompts), tok.pad_token_id, sp_group)
    dev = next(model.parameters()).device
    outs, k = [], 0
    for batch in _batches(prompts, ROLLOUT_TOKENS):
        with torch.no_grad():
            cache, mask, h = _stack([_prefill_one(model, p, dev, sp_group, chunk) for p in batch],
                                    model.config.get_text_config())
        gens = None if seeds is None else [torch.Generator(dev).manual_seed(x + j) for x in
                                           seeds[k:k + len(batch)] for j in range(r * n, (r + 1) * n)]
        nxt = torch.tensor([int(p["pos"].max()) + 1 for p in batch], device=dev)
        outs.append(M.decode(model, cache, mask, h, nxt, n, eos_ids=eos_ids(tok), banned=M.banned_ids(tok),
                             pad_id=tok.pad_token_id, generator=gens, sp_group=sp_group, **gen))
        k += len(batch)
    T = max((o[0].shape[1] for o in outs), default=0)
    out = (torch.cat([F.pad(o[0], (0, T - o[0].shape[1]), value=tok.pad_token_id) for o in outs]),
           torch.cat([F.pad(o[1], (0, T - o[1].shape[1])) for o in outs]), torch.cat([o[2] for o in outs]))
    return out if sp == 1 else _gather_samples(out, len(prompts), tok.pad_token_id, sp_group)


# Prompts whose KV caches decode together hold at most this many prompt tokens (a longer prompt
# decodes alone): stacking different prompts' separately prefilled caches into one batch (`_stack`)
# makes a second copy of them, and at a long video's length one prompt's cache is GBs
# (Qwen2.5-VL-7B: 13 GB at 3,600 frames). A prompt's own G samples never copy its cache.
ROLLOUT_TOKENS = 32768


def _batches(prompts, budget):
    """Consecutive runs of prompts of at most `budget` prompt tokens in all (at least one
    prompt)."""
    out = []
    for p in prompts:
        if out and sum(len(q["prompt"]) for q in out[-1]) + len(p["prompt"]) <= budget:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _prefill_one(model, p, dev, sp_group, chunk):
    """One prompt prefilled alone, so with no padding and no attention mask: its KV cache, the
    cache's (1, columns) mask, and the last prompt column's hidden states (1, H). Under SP, this
    rank's columns of both (`sp_prefill`)."""
    ids = torch.tensor([p["prompt"]], device=dev)
    pos = p["pos"][:, None].to(dev)
    if sp_group is not None:
        return sp_prefill(model, ids, p, pos, sp_group)
    cache, h = M.prefill(model, splice_columns(model, ids, [p], 0, ids.shape[1]), pos, None, chunk)
    return cache, torch.ones_like(ids), h


def _stack(parts, config):
    """(cache, mask, h) of prompts prefilled one by one -> one batch: the caches left-padded to the
    longest (a copy; one prompt: as it is), masks (B, P), hidden states (B, H)."""
    if len(parts) == 1:
        return parts[0]
    from transformers import DynamicCache
    P = max(m.shape[1] for _, m, _ in parts)
    pad = lambda x: F.pad(x, (0, 0, P - x.shape[2], 0))  # noqa: E731  (B, Hkv, t, D), on the left
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if hasattr(layer, "recurrent_states"):  # a GDN layer's fixed-size states: no padding
            M.set_state(layer, *(torch.cat([getattr(c.layers[i], k)[0] for c, _, _ in parts])
                                 for k in ("conv_states", "recurrent_states")))
            continue
        cache.update(torch.cat([pad(c.layers[i].keys) for c, _, _ in parts]),
                     torch.cat([pad(c.layers[i].values) for c, _, _ in parts]), i)
    return (cache, torch.cat([F.pad(m, (P - m.shape[1], 0)) for _, m, _ in parts]),
            torch.cat([h for _, _, h in parts]))


def sp_prefill(model, ids, p, pos, sp_group):
    """M.prefill with the prompt split over the SP group, as the training passes split it (Ulysses):
    each rank splices and runs its l = P/sp columns (activations over l, not P) and keeps their
    keys and values, the cache a decode over the group attends to (`M.decode` with group: no rank
    holds a long prompt's whole cache). Returns this rank's cache, its columns' mask (the padding
    to sp*l masked) and the last prompt column's hidden states (from the rank that ran it)."""
    from transformers import DynamicCache
    sp, r = dist.get_world_size(sp_group), dist.get_rank(sp_group)
    use_ulysses(model)
    P = ids.shape[1]
    l = -(-P // sp)
    ids, pos = F.pad(ids, (0, sp * l - P)), F.pad(pos, (0, sp * l - P))
    mine = slice(r * l, (r + 1) * l)
    cache = DynamicCache(config=model.config.get_text_config())
    embeds = splice_columns(model, ids, [p], r * l, (r + 1) * l, sp_group)
    h = M.forward(model, embeds, pos[..., mine], None, cache, sp_group=sp_group, sp_mask=None,
                  sp_len=P)  # right padding only: causal is exact
    mask = (torch.arange(r * l, (r + 1) * l, device=ids.device) < P).long()[None]
    last = (h[:, P - 1 - r * l].clone() if r * l <= P - 1 < (r + 1) * l
            else h.new_zeros(h.shape[0], h.shape[2]))  # (a copy: gloo reduces a strided view wrongly)
    dist.all_reduce(last, group=sp_group)  # one rank holds column P-1, the others add zeros
    return cache, mask, last


def _gather_samples(out, B, pad_id, sp_group):
    """Each SP peer's n samples per prompt -> all peers' (B*sp*n rows, a prompt's adjacent, peer
    order): tokens and log-probs padded to the longest, then all-gathered over the group."""
    toks, lps, lens = out
    T = torch.tensor([toks.shape[1]])
    dist.all_reduce(T, op=dist.ReduceOp.MAX, group=sp_group)
    T = int(T)
    toks, lps = F.pad(toks, (0, T - toks.shape[1]), value=pad_id), F.pad(lps, (0, T - lps.shape[1]))
    parts = []
    for x in (toks, lps, lens):
        got = [torch.empty_like(x) for _ in range(dist.get_world_size(sp_group))]
        dist.all_gather(got, x.contiguous(), group=sp_group)
        parts.append(torch.stack(got).unflatten(1, (B, -1)).transpose(0, 1).flatten(0, 2))  # (B*sp*n, ...)
    return tuple(parts)


def eos_ids(tok):
    return [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def logprobs(model, tok, rows, temperature=1.0, sp_group=None, packed=True):
    """Log-probs and entropies (N, T) of each row's response, and the response mask (N, T): the
    training forward pass, teacher-forced over [prompt | response] (grpo.py's old-policy, reference
    and update passes; sft.py's loss and validation). Under autograd unless the caller disables it.

    rows: dicts with prompt (ids), pos (3, P), visual (embeddings or None), response (ids). Rows of
    one prompt (grpo.py's micro-batches) run `packed`: the prompt's columns once, each response
    attending to them (`M.pack`, `M.packed_attention`), exactly as the rows one by one. Else the
    rows side by side (`M.layout`), with no attention mask when they are right-padded only: causal
    attention alone is exact for every real token (decided on the host, once a pass). With
    sp_group every rank of it passes the same rows and gets the same tensors back (MR-SP stage 2:
    `sp_logprobs`)."""
    dev = next(model.parameters()).device
    resp, pad = [r["response"] for r in rows], tok.pad_token_id
    T = max(map(len, resp))
    targets = torch.tensor([x + [pad] * (T - len(x)) for x in resp])
    mask = (torch.arange(T) < torch.tensor([len(x) for x in resp])[:, None]).long()
    packed = packed and len(rows) > 1
    if packed and rows[0].get("key") is not None and all(r.get("key") == rows[0]["key"]
                                                         for r in rows):
        ids, pos, P, T = M.pack(rows[0]["prompt"], rows[0]["pos"], resp, pad)
        at, at_rows, attn, layout, rows = M.sources(P, T, len(resp)), 0, None, dict(packed=(P, T)), rows[:1]
        use_ulysses(model)  # the attention that takes `packed` (without a group, SDPA otherwise)
    else:
        ids, pos, full, P = M.layout([r["prompt"] for r in rows], [r["pos"] for r in rows], resp, pad)
        at, at_rows = (P - 1 + torch.arange(T)).expand(len(rows), T), torch.arange(len(rows))[:, None]
        layout = {}
        attn = None if sp_mask_of(full) is None else full.to(dev)
    kw = dict(temperature=temperature, banned=M.banned_ids(tok))
    ids, pos, targets = ids.to(dev), pos.to(dev), targets.to(dev)
    if sp_group is None:
        n = int(at.max()) + 1  # columns run through the model: the ones after predict nothing
        hidden = M.forward(model, splice_columns(model, ids[:, :n], rows, 0, n), pos[..., :n],
                           None if attn is None else attn[:, :n], **layout)
        lp, ent = M.token_logprobs(model, hidden[at_rows, at.to(dev)], targets, **kw)
    else:
        lp, ent = sp_logprobs(model, ids, rows, pos, attn, at_rows, at, targets, sp_group, layout, **kw)
    return lp, ent, mask.to(dev, lp.dtype)


# -----------------------------------------------------------------------------
# MR-SP stage 2: Ulysses sequence parallelism for the log-prob passes and the rollout's prefill.

def _all_to_all(x, sp_group):
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j. Differentiable."""
    x = x.contiguous()
    return dist_nn.all_to_all_single(torch.empty_like(x), x, group=sp_group)


def scatter_heads(xs, sp_group):
    """Ulysses' first all-to-all, one collective for several tensors: each x (B, H_x, l, D) holds
    this rank's block of l = L/sp tokens with all its H_x heads (a multiple of sp); returns each as
    (B, H_x/sp, L, D): this rank's share of its heads over all L tokens (rank i: heads i*H_x/sp
    on)."""
    sp = dist.get_world_size(sp_group)
    x = torch.cat([t.unflatten(1, (sp, -1)) for t in xs], 2).transpose(0, 1)  # (sp, B, sum/sp, l, D)
    x = _all_to_all(x, sp_group).permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, sum/sp, L, D)
    return x.split([t.shape[1] // sp for t in xs], 1)


def gather_heads(y, sp_group):
    """Ulysses' inverse all-to-all: y (B, h, L, D), this rank's h heads over all L tokens, to
    (B, l, sp*h, D): this rank's block of l = L/sp tokens with every head, in rank order."""
    sp = dist.get_world_size(sp_group)
    y = y.unflatten(2, (sp, -1)).permute(2, 0, 1, 3, 4)  # (sp, B, h, l, D)
    return _all_to_all(y, sp_group).permute(1, 3, 0, 2, 4).flatten(2, 3)


def gather_sequence(x, sp_group):
    """x (B, l, ...), this rank's block of a sequence split evenly in rank order, to the whole
    (B, sp*l, ...) on every rank. Backward takes each block's gradient back to its rank as it is
    (`_SumOver`), for callers that compute the same loss from the whole on every rank."""
    sp, r = dist.get_world_size(sp_group), dist.get_rank(sp_group)
    pad = [0, 0] * (x.dim() - 2) + [r * x.shape[1], (sp - 1 - r) * x.shape[1]]
    return _SumOver.apply(F.pad(x, pad), sp_group)


def ulysses_heads(H, K, sp):
    """(H', K'): the query heads (zero heads added) and KV heads (repeated) Ulysses splits over sp
    ranks so that each rank holds whole GQA groups over whole KV heads. Each KV head repeats rep =
    lcm(K, sp)/K times (K' = lcm(K, sp)); each group of g = H/K query heads is padded to a multiple
    of rep (Qwen2.5-VL-7B at sp 8: K 4 -> 8, g 7 -> 8, H 28 -> 32). H' = H when rep divides g."""
    rep = sp // math.gcd(K, sp)
    return K * (-(-H // K // rep) * rep), K * rep


def ulysses_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, sp_group=None,
                      sp_mask=None, packed=None, **kw):
    """Text attention for transformers' registry (name "ulysses"). q (B, H, l, D) after rotary,
    k, v (B, Hkv, l, D): this rank's block of l = L/sp tokens. Returns (B, l, H, D).

    Without sp_group (rollout, or sp=1) it is transformers' SDPA. With it: an all-to-all scatters
    heads and gathers the sequence, each rank attends with H'/sp heads over all L tokens, and the
    inverse all-to-all returns this rank's tokens with all heads (`ulysses_heads`: the zero heads
    that make the heads split are dropped). sp_mask (B, L) is the full sequence's padding mask
    (transformers' per-layer one covers only this block), or None when the rows are right-padded
    only: the caller decides once a pass, since deciding here would sync the host every layer.
    packed=(P, T), with or without sp_group: the sequence is one prompt's rows `M.pack`ed, and
    attention is `M.packed_attention` (over all L tokens)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if sp_group is None and packed is not None:
        return M.packed_attention(q, k, v, *packed, scale=scaling).transpose(1, 2), None
    if sp_group is None:
        return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kw)
    sp = dist.get_world_size(sp_group)
    H, K = q.shape[1], k.shape[1]
    Hp, Kp = ulysses_heads(H, K, sp)
    k, v = k.repeat_interleave(Kp // K, 1), v.repeat_interleave(Kp // K, 1)
    if Hp > H:  # zero query heads at the end of each group (their outputs are dropped below)
        q = F.pad(q.unflatten(1, (K, H // K)), (0, 0, 0, 0, 0, (Hp - H) // K)).flatten(1, 2)
    hq, hk = Hp // sp, Kp // sp
    q, k, v = scatter_heads([q, k, v], sp_group)  # (B, hq or hk, L, D)
    L = q.shape[2]
    if sp_mask is None:  # right padding only: causal alone is exact
        mask = None
    else:  # left padding: (B, 1, L, L) causal, real keys, and the diagonal (all-masked rows: NaN)
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = (causal & sp_mask.bool()[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=q.device)
    out = (M.packed_attention(q, k, v, *packed, scale=scaling) if packed is not None else
           F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout, scale=scaling, enable_gqa=hk != hq))
    y = gather_heads(out, sp_group)  # (B, l, H', D)
    if Hp > H:  # the zero heads' outputs dropped
        y = y.unflatten(2, (K, Hp // K))[:, :, :, :H // K].flatten(2, 3)
    return y, None


def ulysses_gdn(m, hidden_states, cache_params=None, attention_mask=None, sp_group=None,
                sp_mask=None, packed=None, sp_len=None, **kw):
    """A Gated DeltaNet layer (Qwen3.5) under Ulysses, in place of its forward (`use_ulysses`).
    hidden_states (B, l, d): this rank's block of l = L/sp tokens. Its projections run on the rank's
    tokens; an all-to-all scatters heads and gathers the sequence, so the causal convolution and the
    delta-rule recurrence run over all L tokens for this rank's nk/sp key and nv/sp value heads
    (each value head with its own key head, as transformers pairs them); the inverse all-to-all
    returns this rank's tokens with every head, and the gated norm and output projection run on
    them. Without sp_group and packed: the layer's own forward (rollouts, sp=1). sp_mask (B, L):
    left padding, whose columns' inputs are zeroed as transformers zeroes them (None: right padding
    only). packed=(P, T), with or without sp_group: one prompt's rows `M.pack`ed; the prompt's
    columns run once and each response continues from its final state and last convolution inputs,
    as the rows [prompt | response] one by one. With a cache (`sp_prefill`: one prompt of sp_len
    tokens, right-padded to sp*l): the state after token sp_len (the padding's steps skipped: no
    decay, no update), each rank's heads' gathered into the layer's cache whole, as one process's
    prefill leaves it, so every rank decodes with all heads."""
    if sp_group is None and packed is None:
        return type(m).forward(m, hidden_states, cache_params=cache_params,
                               attention_mask=attention_mask, **kw)
    Q = sys.modules[type(m).__module__]  # transformers' module: its kernels, or their references
    sp, r = (dist.get_world_size(sp_group), dist.get_rank(sp_group)) if sp_group is not None else (1, 0)
    nk, nv, dk, dv = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    # key heads sp does not divide: each repeated for its value heads (sp must divide nv)
    rep = 1 if nk % sp == 0 else nv // nk
    if nv % sp or (nk * rep) % sp:
        raise NotImplementedError(f"GDN heads {nk} key, {nv} value: sp {sp} must divide {nv}")
    hk, hv, (B, l, _) = nk * rep // sp, nv // sp, hidden_states.shape
    if sp_mask is not None:
        hidden_states = hidden_states * sp_mask[:, r * l:(r + 1) * l, None].to(hidden_states.dtype)
    q, k, v = m.in_proj_qkv(hidden_states).split([nk * dk, nk * dk, nv * dv], -1)
    q, k = (t.unflatten(-1, (nk, dk)).repeat_interleave(rep, 2).flatten(2) for t in (q, k))
    b, a = m.in_proj_b(hidden_states), m.in_proj_a(hidden_states)
    parts = [t.unflatten(-1, (sp, -1)) for t in (q, k, v, b, a)]  # (B, l, sp, c/sp): a rank's heads each
    x = torch.cat(parts, -1).movedim(2, 0)  # (sp, B, l, c/sp)
    x = (_all_to_all(x, sp_group) if sp > 1 else x).movedim(0, 1).flatten(1, 2)  # (B, L, c): rank r's heads
    q, k, v, b, a = x.split([hk * dk, hk * dk, hv * dv, hv, hv], -1)
    # the convolution's channels of this rank's heads ([q | k | v], each key head's of its original)
    qc = ((torch.arange(r * hk, (r + 1) * hk) // rep)[:, None] * dk + torch.arange(dk)).flatten()
    vc = torch.arange(r * hv * dv, (r + 1) * hv * dv) + 2 * nk * dk
    w = m.conv1d.weight.squeeze(1)[torch.cat([qc, qc + nk * dk, vc]).to(x.device)]
    raw = torch.cat([q, k, v], -1).transpose(1, 2)  # (B, channels, L)
    L, heads = raw.shape[-1], slice(r * hv, (r + 1) * hv)
    g, beta = -m.A_log[heads].float().exp() * F.softplus(a.float() + m.dt_bias[heads]), b.sigmoid()
    if cache_params is not None:  # the padding after sp_len leaves the state as it is
        real = (torch.arange(L, device=g.device) < sp_len)[None, :, None]
        g, beta = g * real, beta * real
    rule = functools.partial(_gdn_rule, Q, m, w, (hk * dk, hk * dk, hv * dv))
    if packed is None:
        out, state = rule(raw, g, beta, final=cache_params is not None)
    else:
        out, state = _gdn_packed(rule, raw, g, beta, *packed, m.conv_kernel_size)
    if cache_params is not None:
        conv = raw[..., max(0, sp_len - m.conv_kernel_size):sp_len]  # the last real tokens' inputs
        _gdn_cache(m, cache_params, conv, state, rep, sp_group)
    y = out.reshape(B, sp, l, hv * dv).movedim(1, 0)  # token block j, for rank j
    y = (_all_to_all(y, sp_group) if sp > 1 else y).movedim(0, 2).reshape(B * l * nv, dv)  # all heads
    y = m.norm(y, m.in_proj_z(hidden_states).reshape(B * l * nv, dv))
    return m.out_proj(y.reshape(B, l, nv * dv))


def _gdn_packed(rule, raw, g, beta, P, T, K):
    """`ulysses_gdn`'s mixer (`rule`) over one prompt's rows packed, B = 1: [prompt | response 1 |
    ... ], responses T columns each (the last may be cut short); the prompt runs once, each response
    from its final state and last K - 1 convolution inputs. Returns the outputs and that state."""
    L = raw.shape[-1]
    n = -(-(L - P) // T)
    out, state = rule(raw[..., :P], g[:, :P], beta[:, :P], final=True)
    blocks = lambda t: F.pad(t[:, P:], (0, 0, 0, n * T - L + P)).unflatten(1, (n, T))[0]  # noqa: E731
    tail = F.pad(raw[..., max(0, P - K + 1):P], (max(0, K - 1 - P), 0))  # the convolution's inputs
    resp, _ = rule(blocks(raw.transpose(1, 2)).transpose(1, 2), blocks(g), blocks(beta),
                   conv0=tail.expand(n, -1, -1), state0=state.expand(n, -1, -1, -1).contiguous())
    return torch.cat([out, resp.flatten(0, 1)[None, :L - P]], 1), state


def _gdn_rule(Q, m, w, split, raw, g, beta, conv0=None, state0=None, final=False):
    """A GDN layer's mixer over whole sequences for some of its heads (`ulysses_gdn`'s): raw (B, c,
    L) their [q | k | v] inputs (split: the three widths), w (c, K) their convolution weights, g and
    beta (B, L, hv) their gates; conv0 (B, c, K - 1) the convolution's inputs before the sequence
    (default zeros), state0 (B, hv, dk, dv) the recurrence's state before it (default zeros).
    Returns the outputs (B, L, hv, dv) and, if final, the state after the sequence."""
    x = raw if conv0 is None else torch.cat([conv0, raw], -1)
    mixed = Q.causal_conv1d_fn(x, w, None, activation=m.activation)[..., x.shape[-1] - raw.shape[-1]:]
    q, k, v = mixed.transpose(1, 2).split(split, -1)
    q, k, v = (t.unflatten(-1, (-1, d)) for t, d in ((q, m.head_k_dim), (k, m.head_k_dim), (v, m.head_v_dim)))
    if v.shape[2] > q.shape[2]:  # value heads sharing a key head
        q, k = (t.repeat_interleave(v.shape[2] // q.shape[2], 2) for t in (q, k))
    return Q.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state0,
                                          output_final_state=final, use_qk_l2norm_in_kernel=True)


def _gdn_cache(m, cache, conv, state, rep, sp_group):
    """A GDN layer's cache from each rank's share (`ulysses_gdn`): conv (B, c, <= K) its heads' last
    convolution inputs [q | k | v] (a key head repeated `rep` times kept once), state (B, hv, dk,
    dv) its value heads' recurrent state; all-gathered and laid out as transformers' own prefill
    stores them (the convolution's inputs left-padded with zeros to K, as it pads a short
    prompt)."""
    sp, nk, dk = dist.get_world_size(sp_group), m.num_k_heads, m.head_k_dim
    conv = F.pad(conv, (m.conv_kernel_size - conv.shape[-1], 0)).contiguous()
    convs = [torch.empty_like(conv) for _ in range(sp)]
    states = [torch.empty_like(state) for _ in range(sp)]
    dist.all_gather(convs, conv, group=sp_group)
    dist.all_gather(states, state.contiguous(), group=sp_group)
    hk = nk * rep // sp
    q, k, v = zip(*[c.split([hk * dk, hk * dk, c.shape[1] - 2 * hk * dk], 1) for c in convs])
    q, k = (torch.cat(t, 1).unflatten(1, (nk, rep, dk))[:, :, 0].flatten(1, 2) for t in (q, k))
    M.set_state(cache.layers[m.layer_idx], torch.cat([q, k, torch.cat(v, 1)], 1), torch.cat(states, 1))


def sp_mask_of(mask):
    """What ulysses_attention takes as sp_mask: None when the rows are right-padded only (causal
    alone is exact), else the mask. One host sync, made once a pass by its callers."""
    return None if bool((mask[:, 1:] <= mask[:, :-1]).all()) else mask


def use_ulysses(model):
    """Switch the text attention to `ulysses_attention` (vision attention unchanged). Without an SP
    group it is SDPA with transformers' own masks, so rollouts on the same model are unaffected."""
    for m in M.parts(model)[1].modules():
        if hasattr(m, "in_proj_qkv") and "forward" not in vars(m):  # a Gated DeltaNet (Qwen3.5)
            m.forward = functools.partial(ulysses_gdn, m)
    if model.config.text_config._attn_implementation != "ulysses":
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionInterface.register("ulysses", ulysses_attention)
        AttentionMaskInterface.register("ulysses", sdpa_mask)
        model.set_attn_implementation({"text_config": "ulysses"})


def sp_logprobs(model, ids, rows, pos, mask, at_rows, at, targets, sp_group, layout, **kw):
    """`logprobs`' pass with the sequence split over sp_group: targets (B, T), each
    predicted by the hidden state at row at_rows, column at (host tensors); the same (B, T) results
    on each rank. Each rank splices and runs only its columns (`splice_columns`).

    Gradients: callers compute the same loss from these summed tensors on every rank, and each rank
    back-propagates its own columns' part (`_SumOver`): its gradients are its share, and their group
    sum is exactly the sp=1 gradient (sync_grads sums them, over dp too)."""
    sp, r = dist.get_world_size(sp_group), dist.get_rank(sp_group)
    use_ulysses(model)
    B, T = targets.shape
    n = int(at.max()) + 1  # columns run through the model: the ones after predict nothing
    l = -(-n // sp)  # tokens per rank; the sequence is padded to sp*l with masked columns
    ids, pos = F.pad(ids[:, :n], (0, sp * l - n)), F.pad(pos[..., :n], (0, sp * l - n))
    mask = None if mask is None else F.pad(mask[:, :n], (0, sp * l - n))  # None: right padding only
    hidden = M.forward(model, splice_columns(model, ids, rows, r * l, (r + 1) * l, sp_group),
                       pos[..., r * l:(r + 1) * l], sp_group=sp_group, sp_mask=mask, **layout)
    own = (at >= r * l) & (at < (r + 1) * l)  # the targets this rank's columns predict
    if own.any():
        at_rows = torch.as_tensor(at_rows).expand(B, T)[own]
        lp, ent = M.token_logprobs(model, hidden[at_rows, at[own] - r * l][None],
                                   targets[own.to(targets.device)][None], **kw)
        local = hidden.new_zeros(2, B, T, dtype=torch.float32).masked_scatter(
            own.to(hidden.device), torch.cat([lp[0], ent[0]]))
    else:  # none here, still tied to hidden (every rank must run every all-to-all's backward) and
        # to lm_head: FSDP reduce-scatters a unit's gradients as one buffer of the parameters that
        # have one, which must be the same on every rank (a real token: 0 x a finite log-prob)
        lp, ent = M.token_logprobs(model, hidden[:1, -1:], targets[:1, :1], **kw)
        local = hidden.new_zeros(2, B, T, dtype=torch.float32) + 0.0 * (lp.sum() + ent.sum())
    full = _SumOver.apply(local, sp_group)
    return full[0], full[1]


class _SumOver(torch.autograd.Function):
    """The sum over the group of each rank's part of a tensor (zero where another rank computes it).
    Backward: the gradient as it is, no collective. Every rank computes the same loss from the same
    sum, so each holds the whole gradient of it, and its part takes it where it computed values
    (torch.distributed.nn's all_reduce would sum the sp equal copies: sp times too large)."""

    @staticmethod
    def forward(ctx, x, sp_group):
        x = x.clone()
        dist.all_reduce(x, group=sp_group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# -----------------------------------------------------------------------------
# Memory planner: what one step of a run holds per rank. grpo.py and sft.py plan their own run at
# start (`plan_start`); python mr_sp.py plan --frames F [--sp N | --world N] --config NAME|FOLDER.

# bench.py's model: vision FLOPs per video token / LM FLOPs per token = 0.393, Qwen2.5-VL-7B's 0.394
# (`model_costs`; matmul FLOPs, no attention scores), found by trying LM widths and depths around
# the tiny model's vision tower until it matched: vision and LM split time and memory as in the 7B.
SMALL = dict(hidden=256, layers=6, heads=4, kv_heads=2, vision_hidden=128, vision_depth=2, vision_heads=4)
# The real checkpoints' config.json values that shape parallelism and memory (planned without a
# download); model.TINY's "tiny:<name>" miniatures share their structure at tiny widths.
REAL = {
    "qwen2.5-vl-7b": ("qwen2_5_vl", dict(  # Qwen2.5-VL-7B-Instruct
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        tie_word_embeddings=False)),
    "qwen2.5-vl-3b": ("qwen2_5_vl", dict(  # Qwen2.5-VL-3B-Instruct: what bench.py gpu built on one GPU
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                         num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=2048, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        tie_word_embeddings=True)),
    "qwen3-vl-8b": ("qwen3_vl", dict(  # Qwen3-VL-8B-Instruct
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False)),
    "qwen3.5-9b": ("qwen3_5", dict(  # Qwen3.5-9B: 24 Gated DeltaNet layers, 8 gated attention (every 4th)
        text_config=dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=256,
                         linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_conv_kernel_dim=4),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096),
        tie_word_embeddings=False)),
}


def plan_config(name):
    """A config by name: "tiny", "small" (SMALL), a model.TINY name, a REAL name, or a local HF
    folder."""
    import transformers
    if name in ("tiny", "small"):
        return M.tiny_config(M.tiny_tokenizer(), **(SMALL if name == "small" else {}))
    if name in M.TINY:
        family, kw = M.TINY[name]
        return M.tiny_config(M.tiny_tokenizer(omni=family == M.OMNI), family, **kw)
    if name.lower() in REAL:
        family, cfg = REAL[name.lower()]
        return getattr(transformers, M.FAMILIES[family] + "Config")(**cfg)
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"{name}: not a Hugging Face model folder (no config.json); pass a local "
                                f"folder, one of {', '.join(M.TINY)}, or one of {', '.join(REAL)}")
    return transformers.AutoConfig.from_pretrained(name)


_costs = {}  # model_costs by config (kept alive: its id stays its own): a meta-device 7B takes a second


def model_costs(config):
    """Parameters (all; trainable in RL: LM and lm_head; the vision and audio towers) and forward
    FLOPs per token (vision per video token, LM per token) of a config, on a meta-device model: no
    memory, no download."""
    if id(config) not in _costs:
        import transformers
        with torch.device("meta"):
            m = getattr(transformers, M.FAMILIES[config.model_type] + "ForConditionalGeneration")(config)
        n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        (vis, aud), lm = [M.towers(m).get(k) for k in ("visual", "audio_tower")], M.parts(m)[1]
        merge = config.vision_config.spatial_merge_size ** 2  # patches a token; the merger's: once
        audio = n(aud) if aud is not None else 0  # Qwen2.5-Omni's
        _costs[id(config)] = config, dict(
            params=n(m), trainable=n(m) - n(vis) - audio, vision=n(vis), audio=audio, layers=n(lm.layers),
            layer=max(n(x) for x in lm.layers),  # Qwen3.5's: its GDN and attention layers differ
            vision_root=n(vis) - n(vis.blocks),  # patch embedding, merger(s): FSDP's root
            audio_root=audio and audio - n(aud.layers),  # convolutions, projection: likewise
            head=0 if config.tie_word_embeddings else n(m.lm_head),  # untied: embeddings too
            vision_flops=2 * (merge * (n(vis) - n(vis.merger)) + n(vis.merger)),
            lm_flops=2 * (n(lm) - n(lm.embed_tokens)))
    return _costs[id(config)][1]


# What a CUDA process holds besides its tensors, added to a plan on a GPU (`plan_run`): the CUDA
# context, about 0.3 GiB with lazy kernel loading (CUDA >= 11.7) and 1 GiB before it
# (pytorch/pytorch issues 107667, 28394); an NCCL communicator's buffers, 0.5-0.7 GiB a group on
# 4 x A100 with NVLink and 1.6 GiB on a faster node (NVIDIA/nccl issues 964, 864: more channels,
# more memory), and a rank here has up to two (the world's for FSDP and data parallel, its SP
# group's); and the caching allocator's fragmentation (blocks cached at other sizes), a few percent
# of what it holds: 5% of the peak. Stated, not measured here: no GPU has run this planner yet.
ALLOWANCE = dict(context=2**30, communicator=2**30, fragmentation=0.05)
TEXT = 64  # prompt tokens besides the video's: the chat template, question and options
SFT_TARGET = 1024  # sft.py's target tokens as planned (reasoning and answer; grpo.py plans --max-new)
VAL_BATCH = 16  # sft.py's validation rows a batch (a rank's): embeddings held, decoded together
# On CPU the host's memory is shared with everything else on it: an unset --activation-checkpointing
# turns on where the training pass would pass this per rank. It buys little below: a tiny-model pass
# of 8,292 tokens is 1.29 GiB without, 0.34 with (RESULTS.md).
CPU_PASS = 2 * 2**30
# What an unset --micro-batch tries on a GPU, the largest that fits whose rows (a pass's) hold at
# most MICRO_TOKENS tokens a rank: a forward that long keeps a GPU busy, more rows only cost memory.
# On CPU it is the first: a plan at --max-pixels overstates small videos (the synthetic task's are
# 56 x 56, a 32nd), and a micro-batch changes only the speed and float order, never the updates.
MICRO_BATCHES, MICRO_TOKENS = (16, 8, 4, 2, 1), 32768


def gdn_heads(t, sp=1):
    """(key heads, value heads, key dim, value dim) of text config t's Gated DeltaNet layers as a
    rank runs them at sp (zeros without GDN layers): ulysses_gdn repeats each key head for its value
    heads when sp does not divide the key heads."""
    if not M.recurrent(t):
        return 0, 0, 0, 0
    nk, nv = t.linear_num_key_heads, t.linear_num_value_heads
    return nv if sp > 1 and nk % sp else nk, nv, t.linear_key_head_dim, t.linear_value_head_dim


def saved_bytes(t, b, sp=1):
    """Bytes autograd saves a token of a rank's in an attention layer and in a Gated DeltaNet layer
    of text config t, compute dtype b bytes (4 fp32, 2 bf16 under autocast), at sp; counted with
    torch.autograd.graph.saved_tensors_hooks (tests/test_plan.py checks them so). Attention: 4I + 8d
    + 2*Hkv*D + H + 2 values at sp=1, Ulysses 4I + 7d + 2*H'*D + 2*lcm(Hkv, sp)*D + H' + 2 (the zero
    heads of `ulysses_heads` in q and the output), Qwen3.5's output gate 7*H'*D more. In bf16 a
    layer also saves its norms' fp32 inputs and outputs beside the bf16 copies its projections take:
    8d bytes. GDN: the PyTorch reference's, fit on 11 head shapes within 2.5% (its chunked delta
    rule runs in fp32 in either dtype: 64-token chunks, a state (dk x dv) a value head and chunk);
    flash-linear-attention's kernels save less."""
    d, I, H, K = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads
    D = getattr(t, "head_dim", None) or d // H
    Hp, kv = ulysses_heads(H, K, sp)
    layer = (4 * I + (7 * d + 2 * Hp * D if sp > 1 else 8 * d) + 2 * kv * D + Hp + 2
             + 7 * Hp * D * M.recurrent(t))
    nk, nv, kd, vd = gdn_heads(t, sp)
    gdn = (b * (4 * I + 6 * d + 5 * nk * kd) + 8 * (4 - b) * d + (32 + 3 * b) * nv * (kd + vd)
           + (9 + 3 * b) * 64 * nv + (12 - 2 * b) * nv * kd * vd // 64) if nv else 0
    return b * layer + 8 * (4 - b) * d, gdn


def plan(config, frames, sp=1, max_pixels=128 * 28 * 28, text=TEXT, G=8, max_new=1024, micro_batch=1,
         dtype="bfloat16", ref=True, world=None, fsdp=False, ckpt=False, chunk=1024, prefill_chunk=1024,
         prompts=1, mini_batches=1, sft=False, train_vision=False, rollout_dtype=None, vllm=0,
         packed=True, val=0, audio_seconds=None):
    """Estimated memory per rank, in bytes, of one step of this code, grpo.py's (or sft.py's: `sft`)
    with `prompts` videos per data-parallel rank (grpo.py: their G rows each in `mini_batches`
    slices): the components and the peak (on a GPU `plan_run` adds ALLOWANCE). world = dp x sp ranks
    (default sp).

    Held all step: the policy's fp32 weights and its reference's (grpo.py; none without `ref`),
    AdamW's two fp32 states, and this rank's share of each prompt's video embeddings (grpo.py);
    `fsdp` divides the first three by `world` (grpo.py shards the frozen vision tower too, sft.py
    what it trains) and gathers in the compute dtype. Qwen2.5-Omni's audio tower is held (and
    trained, sharded) as the vision tower, this rank's share of its embeddings (`audio_embeds`) all
    step. Plus the largest phase: encode (`_encode_bytes`), rollout (grpo.py; `_rollout_bytes`, or
    with `vllm` the bytes vLLM's engine takes instead, its whole KV cache included), grpo.py's
    no-grad pass and the training pass (`_pass_bytes`), the optimizer (AdamW's foreach temporaries,
    about the parameters' size, fp32), both beside the policy's fp32 gradients, validation (sft.py
    with `val`: `_validation_bytes`). grpo.py with fsdp gathers the whole policy for the encode and
    the rollout (`collect` runs in `unsharded`). Beside the peak: `host`, a step's videos in host
    memory per rank (frames as uint8 and their fp32 pixel rows, an SP peer's share) and `load`, the
    fp32 weights from_pretrained puts on the host. Layer-level terms (no Python, allocator slack,
    small buffers). `python bench.py planner` checks it against peak RSS on CPU (tiny and small, sp
    1 and 2, each option: 0.71x to 0.98x measured).

    Qwen2.5-VL-7B, 3,600 frames, sp=8 on 8 x 80 GB (`python mr_sp.py plan --frames 3600 --sp 8
    --fsdp`: bf16, 8 prompts a step, G=8, 1,024-token responses): 231,488 tokens a row, 28,936 a
    rank. Peak 40.1 GiB a rank, 45.1 with ALLOWANCE: policy weights, gradients and AdamW 14.5 (116
    replicated), the reference 3.5, this rank's share of the 8 prompts' video embeddings 1.5, the
    rollout 21.7 (the policy gathered in bf16, 15.4; this rank's columns of a prompt's KV cache,
    1.6), the training pass 20.5 (a prompt's 8 rows packed, checkpointed; one row: 19.9). The
    largest video that fits 79 GiB is 10,094 frames (`max_frames`). The paper reports 3,600 frames
    (about 256k tokens) of RL on one 8 x A100 node."""
    W = (world or sp) if fsdp else 1  # ranks sharding policy and reference
    s = _plan_sizes(config, frames, sp, max_pixels, text, G, max_new, micro_batch, dtype, W,
                    prompts, mini_batches, sft, train_vision, rollout_dtype, packed, audio_seconds)
    m = dict(weights=4 * s.lm / W + 4 * s.vis / s.Wv, ref=0 if sft else 4 * s.lm / W * ref,
             grads=4 * s.trained / W, adam=8 * s.trained / W,
             video_embeds=0 if sft else prompts * s.b * -(-s.groups // sp) * s.per_group * s.wide,
             audio_embeds=0 if sft else prompts * s.b * s.a_tok * s.d)
    gathered = s.b * (s.lm + s.vis) if W > 1 and not sft else 0  # collect runs in `unsharded`
    ours = _rollout_bytes(s, prefill_chunk, val if sft else prompts)
    no_grad, train = _pass_bytes(s, ckpt, chunk)
    phase = dict(encode=sum(_encode_bytes(s, sft and train_vision)) + (0 if sft else gathered),
                 rollout=0 if sft else gathered + (vllm or ours), no_grad_pass=0 if sft else no_grad,
                 training_pass=train, optimizer=4 * s.trained / W,
                 validation=_validation_bytes(s, val, chunk, ours) if sft and val else 0)
    m.update(phase)
    m["state"] = m["weights"] + m["grads"] + m["adam"]  # the policy's: what --fsdp divides
    m["peak"] = (sum(m[k] for k in ("weights", "ref", "adam", "video_embeds", "audio_embeds"))
                 + max(phase["encode"], phase["rollout"], phase["no_grad_pass"],
                       phase["validation"], phase["training_pass"] + m["grads"],
                       phase["optimizer"] + m["grads"]))
    n, mel = max(prompts, val), s.mel  # uint8 + fp32 rows; the wave (16 kHz fp32), log-mels: whole
    m["host"] = (n * s.groups * s.tp * s.per_group * s.px ** 2 * 3 * 5 / sp
                 + n * (640 * mel + 8 * 128 * mel))
    m["load"] = 4 * s.c["params"]
    m.update(tokens=s.L, video_tokens=s.video, audio_tokens=s.audio, tokens_per_rank=s.l, rows=s.B)
    return m


def _plan_sizes(config, frames, sp, max_pixels, text, G, max_new, micro_batch, dtype, W, prompts,
                mini_batches, sft, train_vision, rollout_dtype, packed, audio_seconds):
    """What `plan`'s terms read, by name: the model's widths, the dtypes' bytes, a row's tokens, a
    pass's rows and tokens per rank, the weights FSDP gathers (over W ranks) or autocast copies.
    Qwen2.5-Omni's sound (`audio_seconds`, default a second a frame): 25 tokens a second a row."""
    t, vc = config.get_text_config(), config.vision_config
    d, I, layers, H, K, V = (t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                             t.num_attention_heads, t.num_key_value_heads, t.vocab_size)
    D = getattr(t, "head_dim", None) or d // H  # Qwen3-VL's is its own
    # Qwen3.5's Gated DeltaNet layers (a fixed-size state, no KV cache); the others attention
    gdn = (getattr(t, "layer_types", None) or [])[:layers].count("linear_attention")
    att = layers - gdn
    dv = getattr(vc, "embed_dim", None) or vc.hidden_size  # Qwen2-VL's tower width is embed_dim
    Iv, depth = getattr(vc, "intermediate_size", None) or int(dv * vc.mlp_ratio), vc.depth
    b = 2 if dtype == "bfloat16" else 4  # activations and gathered weights; policy weights stay fp32
    rb = 2 if (rollout_dtype or dtype) == "bfloat16" else 4  # the rollout's
    # the residual stream starts as the embedding table's output: fp32, its weights' dtype (autocast
    # leaves embeddings and additions alone), unless FSDP gathers the table in the compute dtype
    r, rr = (b, rb) if W > 1 else (4, 4)
    c = model_costs(config)
    px, tp = vc.patch_size * vc.spatial_merge_size, vc.temporal_patch_size  # a token's pixels, frames
    merge = vc.spatial_merge_size ** 2  # patches a token
    groups, per_group = -(-frames // tp), max_pixels // px ** 2  # temporal groups, tokens a group
    video = groups * per_group
    wide = d * (1 + len(getattr(vc, "deepstack_visual_indexes", None) or ()))  # DeepStack: 1 + k
    # the sound: 100 mel frames a second (the paper's hour is 3,600 frames), 25 tokens; a rank
    # encodes its share of the audio tower's windows of 2 s (`encode_audio`)
    ac = getattr(config, "audio_config", None)
    mel = int(100 * (frames if audio_seconds is None else audio_seconds)) if ac is not None else 0
    shares = audio_shares_of(config, mel, sp) if mel else [0]
    audio, a_tok = sum(shares), max(shares)  # the clip's tokens; the largest share's (rank 0's)
    lo, hi = audio_windows(config, mel, sp, 0) if mel else (0, 0)
    a_mel = hi - lo  # rank 0's mel frames
    P, T = video + audio + text, max_new
    L = P + T
    # rows a pass: sft.py's samples; grpo.py's, one prompt's G at most, in one mini-batch's slice
    B = min(micro_batch, prompts) if sft else min(micro_batch, G, -(-prompts * G // mini_batches))
    # grpo.py's `packed` passes: a micro-batch's B rows (one prompt's) as one sequence
    rows, B = B, min(B, 1) if packed and not sft else B  # rows: those a pass scores, packed or not
    l = -(-(P + rows * T if rows > B else L) // sp)  # tokens per rank in a pass (packed: its sequence's)
    Hp, kv = ulysses_heads(H, K, sp)  # Ulysses' padded query heads and repeated KV heads
    saved, saved_gdn = saved_bytes(t, b, sp)
    nk, nv, kd, vd = gdn_heads(t, sp)
    # a no-grad GDN mixer's fp32 working set a token (measured peak, 8 shapes within 5%)
    mixer = 4 * nv * (8 * (kd + vd) + 3 * 64)
    # values a token Ulysses' all-to-alls carry in a layer: attention's q, k, v; GDN's q, k, v, b, a
    a2a_width = max((Hp + 2 * kv) * D, 2 * nk * kd + nv * (vd + 2))
    lm, vis = c["trainable"], c["vision"] + c["audio"]  # language model and lm_head; the towers
    trained = lm + vis * train_vision
    Wv = W if not sft or train_vision else 1  # FSDP over the tower: grpo.py's all, sft.py's trained
    # --fsdp, in the compute dtype (x2 in backward: unsharded gradients): a pass holds the root
    # (norm, lm_head, tied embeddings, the tower's patch embedding and merger) and gathers a layer,
    # the untied embeddings, at a time
    towers_root = c["vision_root"] + c["audio_root"] if Wv > 1 else 0
    fs = dict(root=b * (lm - c["layers"] - c["head"] + towers_root),
              layer=b * c["layer"], embed=b * c["head"]) if W > 1 else dict(root=0, layer=0, embed=0)
    cast = b * V * d if b == 2 and W == 1 else 0  # bf16 without FSDP: autocast's lm_head copy
    return types.SimpleNamespace(**locals())


def _encode_bytes(s, whole):
    """The encode beside the weights: (the towers' working set, what it keeps). It runs one tower at
    a time on this rank's share (`whole`, sft.py training the towers: all, every SP peer): the pixel
    rows and vision tower intermediates of the temporal groups, or the audio tower's of the mel
    frames: the log-mels (two fp32 copies: its kept frames', the windows padded), the first
    convolution's output and activation (100 a second), and the layers' intermediates at 50 a second
    (the vision tower's rule; the tiny thinker's 900 s on CPU, peak RSS, fp32: 0.72x of this). It
    keeps the share's embeddings; sft.py's: its micro-batch's samples, and with fsdp the root."""
    b, share = s.b, s.groups if whole else -(-s.groups // s.sp)
    n, held = (s.mel, s.audio) if whole else (s.a_mel, s.a_tok)  # mel frames, tokens
    work = (4 * share * s.tp * s.per_group * s.px ** 2 * 3
            + b * share * s.per_group * s.merge * (3 * s.Iv + 6 * s.dv))
    if s.mel:
        da, Fa = s.ac.d_model, s.ac.encoder_ffn_dim
        work = max(work, 8 * 128 * n + 2 * b * n * da + b * (n // 2) * (3 * Fa + 6 * da))
    kept = b * share * s.per_group * s.wide + b * held * s.d
    if s.sft:
        kept += b * s.B * (s.video * s.wide + s.audio * s.d) + s.fs["root"]
    return work, kept


def _rollout_bytes(s, prefill_chunk, prompts):
    """A rollout beside the weights (sft.py's validation: its batch at G 1): prompts prefilled one
    at a time; those of at most ROLLOUT_TOKENS tokens in all decode together, their caches stacked
    (a copy: twice their KV cache), a longer one alone. Prefill: sp=1 a `prefill_chunk` of layer
    intermediates and transformers' (chunk, P) mask, 5 B an entry; sp>1 Ulysses over P/sp tokens,
    each rank keeping its columns' cache. Decode: this rank's G/sp samples of each prompt, their own
    KV cache, one layer's fp32 scores of every rank's samples over this rank's columns, and logits.
    Qwen3.5's GDN layers hold no KV cache but a fixed-size state per sequence (prompt, sample); its
    prefill the larger of the MLP's and the GDN mixer's intermediates."""
    P, T, sp, rb, att, K, D, nv, kd, vd = s.P, s.T, s.sp, s.rb, s.att, s.K, s.D, s.nv, s.kd, s.vd
    Pp = sp * -(-P // sp)  # a prompt's columns (SP: padded)
    # a GDN layer's state of a sequence: fp32 recurrent state, the convolution's last inputs
    state = s.gdn * (4 * nv * kd * vd + rb * (2 * s.t.linear_num_key_heads * kd + nv * vd)
                     * s.t.linear_conv_kernel_dim) if s.gdn else 0
    # a prompt's KV cache, this rank's columns of it; GDN states whole on every rank
    kv1 = rb * Pp // sp * att * 2 * K * D + state
    work = max(rb * (3 * s.I + 4 * s.d), s.mixer)  # a token's layer intermediates: MLP or GDN mixer
    nb = 1 if P > ROLLOUT_TOKENS else max(1, min(prompts, ROLLOUT_TOKENS // P))  # a decode batch
    n = s.G // sp if s.G % sp == 0 else s.G  # samples of a prompt this rank decodes
    C = min(prefill_chunk or P, P)
    pre = s.rr * Pp // sp * s.wide + (  # its spliced embeddings (SP: this rank's columns)
        Pp // sp * work + 2 * rb * Pp * s.a2a_width // sp
        if sp > 1 else C * work + (5 * C * P if C < P else 0))
    dec = nb * (n * T * att * 2 * K * D * rb + n * state + 3 * 4 * n * s.H * Pp + 3 * 4 * n * s.V)
    return max(nb * kv1 + pre, (2 * nb if nb > 1 else 1) * kv1, nb * kv1 + dec) + s.cast


def _pass_bytes(s, ckpt, chunk):
    """(grpo.py's no-grad pass, the training pass), beside the weights. No-grad (the old and
    reference log-probs): a micro-batch of one prompt's rows (right padding, no mask; `packed`: one
    sequence of the prompt and the rows' responses, and a response's copy of the prompt's keys and
    values): a layer's intermediates (Qwen3.5: the MLP's or the GDN mixer's, the larger), the input
    embeddings, a logits chunk. Training: autograd's saved values per token and layer
    (`saved_bytes`); `ckpt` (activation checkpointing) keeps each layer's input, the residual stream
    (fp32 unless FSDP gathers the embeddings in bf16), and one layer's values in its recompute. Then
    the larger of the backward's two stages: the lm_head chunk recomputed (chunk x vocab logits,
    about 6 fp32 copies) or one layer's backward intermediates. Plus the input embeddings of this
    rank's columns beyond the first layer's input (DeepStack's); with fsdp the root and a unit
    gathered (and their unsharded gradients); without fsdp, in bf16, autocast's weight copies each
    layer saves; sft.py with a micro-batch of several samples (left padding): a (B, L, L) bool mask
    and the float copy each layer's SDPA saves (measured: 13 B an element with 3 layers); training
    the towers, their values saved until the backward."""
    b, d, I, B, l, T, V, D, r, sp, fs = s.b, s.d, s.I, s.B, s.l, s.T, s.V, s.D, s.r, s.sp, s.fs
    # bytes a token; checkpointed: each layer's input kept, one layer's values alive in recompute
    kept = ((r * d * s.layers if ckpt else s.saved * s.att + s.saved_gdn * s.gdn)
            + b * (2 * D + 2 * d))
    logits = 6 * 4 * min(chunk, s.rows * T) * V
    mask = B * s.L * s.L * (1 + 4 * (1 if ckpt else s.att)) if s.sft and B > 1 else 0
    # checkpointed: autocast's copies of the recomputed layer only
    saved_casts = b * (s.c["layer"] if ckpt else s.c["layers"]) if b == 2 and s.W == 1 else 0
    tower = (B * b * s.groups * s.per_group * s.merge * s.depth
             * (s.dv if ckpt else 4 * s.Iv + 8 * s.dv)) if s.sft and s.train_vision else 0
    if tower and s.mel:  # the audio tower's, at 50 tokens a second
        da, Fa = s.ac.d_model, s.ac.encoder_ffn_dim
        tower += B * b * (s.mel // 2) * s.ac.encoder_layers * (da if ckpt else 4 * Fa + 8 * da)
    emb = r * B * l * s.wide  # input embeddings of this rank's columns (kept by layer 0's input)
    a2a = 2 * b * B * l * s.a2a_width if sp > 1 else 0  # Ulysses' all-to-all buffers
    # packed: a response's attention copies the prompt's keys and values (M.packed_attention)
    blk = 2 * b * (s.P + T) * (s.kv // sp if sp > 1 else s.K) * D if s.rows > B else 0
    no_grad = (B * l * max(b * (3 * I + 4 * d), s.mixer) + a2a + emb + s.cast
               + 3 * 4 * min(chunk, s.rows * T) * V + fs["root"] + max(fs["layer"], fs["embed"])
               + blk)
    back = max(logits + s.cast, B * l * ((max(s.saved, s.saved_gdn) if ckpt else 0)
                                         + b * (3 * I + 2 * d)) + 2 * fs["layer"] + blk)
    train = (B * l * kept + back + mask + 2 * fs["root"] + saved_casts + tower
             + emb - r * B * l * d  # beyond layer 0's input, counted in kept
             + (b * B * (s.video * s.wide + s.audio * d) if s.sft else 0))  # sft: encoded samples
    return no_grad, train


def _validation_bytes(s, val, chunk, rollout):
    """sft.py's validation (`val` rows a batch) beside the weights: in `unsharded` (with fsdp the
    whole model gathered), the batch's video embeddings (this rank's shares), then the largest of a
    sample's encode, the batch's greedy `rollout` (G 1, every SP peer decoding it) and a row's
    teacher-forced no-grad pass (grpo.py's collect at G 1: one row, not a micro-batch)."""
    b, sp, s1, l1 = s.b, s.sp, -(-s.groups // s.sp), -(-s.L // s.sp)
    row = (l1 * max(b * (3 * s.I + 4 * s.d), s.mixer) + (2 * b * l1 * s.a2a_width if sp > 1 else 0)
           + s.r * l1 * s.wide + s.cast + 3 * 4 * min(chunk, s.T) * s.V)
    return (b * (s.lm + s.vis) * (s.W > 1) + val * b * (s1 * s.per_group * s.wide + s.a_tok * s.d)
            + max(_encode_bytes(s, False)[0], rollout, row))


COMPONENTS = ("weights", "ref", "grads", "adam", "state", "video_embeds", "audio_embeds", "encode",
              "rollout", "no_grad_pass", "training_pass", "optimizer", "validation", "peak",
              "allowance", "total", "host", "load")


def check_layout(world, sp, n=None, flag="--prompts"):
    """Why world ranks at --sp cannot run a step of n prompts (or samples: `flag`), or None."""
    if sp < 1 or world % sp:
        return (f"world size {world} is not divisible by --sp {sp}: world = dp x sp needs a whole "
                f"number of data-parallel groups, dp = {world}/{sp}")
    if n is not None and n % (world // sp):
        return f"{flag} {n} must be divisible by the data-parallel size ({world // sp})"
    return None


def _plan_args(a, config, world, capacity):
    """plan() of the run `a` describes, every flag set; on a GPU (capacity) ALLOWANCE added."""
    sft = hasattr(a, "batch")  # sft.py's flags; grpo.py's and `mr_sp.py plan`'s have --prompts
    m = plan(config, a.frames, a.sp, a.max_pixels, getattr(a, "text", TEXT), 1 if sft else a.G,
             SFT_TARGET if sft else a.max_new, a.micro_batch, a.dtype, not sft and a.kl_coef != 0,
             world, a.fsdp and world > 1, a.activation_checkpointing,
             prefill_chunk=1024 if sft else a.prefill_chunk,  # sft.py's: validation's rollout
             prompts=(a.batch if sft else a.prompts) // (world // a.sp),
             mini_batches=1 if sft else a.mini_batches, sft=sft,
             train_vision=sft and (a.vision == "train" or (a.vision == "auto" and a.init in M.TINY)),
             rollout_dtype=getattr(a, "rollout_dtype", None),
             vllm=int(a.vllm_mem * capacity) if not sft and a.engine == "vllm" and capacity else 0,
             packed=getattr(a, "shared_prefix", False), val=min(a.val, VAL_BATCH) if sft else 0,
             audio_seconds=getattr(a, "audio_seconds", None))
    comms = (world > 1) + (a.sp > 1)  # NCCL communicators
    m["allowance"] = (ALLOWANCE["context"] + comms * ALLOWANCE["communicator"]
                      + ALLOWANCE["fragmentation"] * m["peak"] if capacity else 0)
    m["total"] = m["peak"] + m["allowance"]
    return m


def _resolve(args, config, world, capacity, **change):
    """(args with `change` and unset flags resolved, its plan): an unset --activation-checkpointing
    off and an unset --micro-batch the largest of MICRO_BATCHES (up to MICRO_TOKENS; CPU: the first)
    where that fits (a GPU: the whole step in capacity; CPU: the training pass under CPU_PASS), else
    the most frugal."""
    import argparse
    import itertools
    a = argparse.Namespace(**{**vars(args), **change})
    auto = a.micro_batch is None
    ckpts = [a.activation_checkpointing] if a.activation_checkpointing is not None else (False, True)
    mbs = [a.micro_batch] if not auto else MICRO_BATCHES if capacity else MICRO_BATCHES[:1]
    tries = itertools.product(ckpts, mbs)
    for a.activation_checkpointing, a.micro_batch in tries:
        m = _plan_args(a, config, world, capacity)
        if auto and capacity and m["rows"] > 1 and m["rows"] * m["tokens_per_rank"] > MICRO_TOKENS:
            continue
        if m["total"] <= capacity if capacity else m["training_pass"] <= CPU_PASS:
            break
    return a, m


def _max_frames(args, config, world, capacity, **change):
    """The largest even frame count whose run fits capacity (0: none)."""
    def fits(f):
        return _resolve(args, config, world, capacity, frames=f, **change)[1]["total"] <= capacity

    lo, hi = 0, 2
    while fits(hi) and hi < 2**22:
        lo, hi = hi, 2 * hi
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _advice(args, a, config, world, capacity):
    """The nearest flags that fit a run over capacity (`a`: its args resolved): each flag that alone
    fits (the least --sp; the most --frames), else the fewest that fit together (all of them with
    fewer frames if none do), else more ranks."""
    import itertools
    n, flag = (args.batch, "--batch") if hasattr(args, "batch") else (args.prompts, "--prompts")

    def fit(w=world, **change):
        return _resolve(args, config, w, capacity, **change)[1]["total"] <= capacity

    def both(flags):  # [(flag, change)] -> (the flags, all changes)
        return " ".join(f for f, _ in flags), {k: v for _, c in flags for k, v in c.items()}

    saves = [("--micro-batch 1", dict(micro_batch=1))] * (a.micro_batch > 1)
    saves += [("--activation-checkpointing", dict(activation_checkpointing=True))] * (
        not a.activation_checkpointing)
    saves += [("--val 0", dict(val=0))] * bool(getattr(a, "val", 0))  # sft.py's gathered validation
    fsdp = [("--fsdp", dict(fsdp=True))] * (not a.fsdp)
    sps = [k for k in range(a.sp + 1, world + 1) if not check_layout(world, k, n, flag)]
    opts = saves + fsdp * (world > 1)
    out = [f for f, ch in opts if fit(**ch)] + [f"--sp {k}" for k in sps if fit(sp=k)][:1]
    if f := _max_frames(args, config, world, capacity):
        out.append(f"--frames {f}")
    if all(f.startswith("--frames") for f in out):  # no one flag but fewer frames: the fewest together
        combos = sorted((c + s for r in range(len(opts) + 1) for c in itertools.combinations(opts, r)
                         for s in [()] + [((f"--sp {k}", dict(sp=k)),) for k in sps]), key=len)
        flags = next((f for f, ch in map(both, combos[1:]) if " --" in f and fit(**ch)), None)
        if flags:
            out.append(flags)
        elif len(combos) > 1:  # all of them (the largest sp), with fewer frames
            flags, ch = both(combos[-1])
            if f := _max_frames(args, config, world, capacity, **ch):
                out.append(f"{flags} --frames {f}")
    for w in [] if out else [2 ** i for i in range(1, 7) if 2 ** i > world]:  # more ranks, sharded
        flags, ch = both(saves + fsdp)
        ks = [k for k in range(1, w + 1) if not check_layout(w, k, n, flag) and fit(w, sp=k, **ch)]
        if ks:
            out.append(f"{w} ranks: {flags} --sp {ks[0]}")
            break
    return out


def plan_run(args, config, world, capacity=None):
    """The plan of the run that `args` describe, grpo.py's parsed flags (or sft.py's, which have
    --batch; `mr_sp.py plan` parses grpo.py's), on `world` ranks of `capacity` bytes each (a GPU's;
    None: CPU): a JSON-ready dict of the layout, the flags resolved (unset --micro-batch and
    --activation-checkpointing: `_resolve`), tokens, the components per rank in GiB (`plan`, with
    ALLOWANCE and the total on a GPU) and on a GPU whether it fits, the most frames that fit, and,
    when over, the nearest flags that fit. A layout the scripts cannot run is refused (SystemExit,
    one line), as the scripts refuse it."""
    sft = hasattr(args, "batch")
    n, flag = (args.batch, "--batch") if sft else (args.prompts, "--prompts")
    if err := check_layout(world, args.sp, n, flag):
        raise SystemExit(err)
    a, m = _resolve(args, config, world, capacity)
    fits = m["total"] <= capacity if capacity else None
    return dict(script="sft" if sft else "grpo",
                model=f"{config.model_type} {model_costs(config)['params'] / 1e6:,.0f}M parameters",
                world=world, dp=world // a.sp, sp=a.sp, fsdp=bool(a.fsdp and world > 1), frames=a.frames,
                micro_batch=a.micro_batch, activation_checkpointing=a.activation_checkpointing,
                **{k: m[k] for k in ("tokens", "video_tokens", "audio_tokens", "tokens_per_rank", "rows")},
                gib={k: round(m[k] / 2**30, 3) for k in COMPONENTS},
                capacity_gib=capacity and round(capacity / 2**30, 3), fits=fits,
                max_frames=capacity and _max_frames(args, config, world, capacity),
                advice=_advice(args, a, config, world, capacity) if fits is False else [])


def plan_line(p):
    """A plan (`plan_run`) in one line."""
    g = {k: f"{x:.2f}" for k, x in p["gib"].items()}
    fsdp, ckpt = " fsdp" if p["fsdp"] else "", "on" if p["activation_checkpointing"] else "off"
    peak = (f"peak {g['peak']} + allowance {g['allowance']} = {g['total']} GiB a rank of "
            f"{p['capacity_gib']:.2f}: {'fits' if p['fits'] else 'OVER'}" if p["capacity_gib"]
            else f"peak {g['peak']} GiB a rank (CPU)")
    return (f"plan | {p['model']}, {p['frames']} frames: {p['tokens']:,} tokens a row, "
            f"{p['tokens_per_rank']:,} a pass a rank | dp {p['dp']} x sp {p['sp']}{fsdp}, "
            f"micro-batch {p['micro_batch']}, checkpointing {ckpt} | GiB a rank: state {g['state']} "
            f"ref {g['ref']} embeds {p['gib']['video_embeds'] + p['gib']['audio_embeds']:.2f}; "
            f"encode {g['encode']} rollout {g['rollout']} "
            f"no-grad {g['no_grad_pass']} train {g['training_pass']} val {g['validation']} "
            f"| {peak} | host {g['host']}, "
            f"load {g['load']}")


def plan_start(args, config, par):
    """At a script's start, before loading weights: its run planned (`plan_run`) on this device,
    unset flags resolved into args (args.json records them), the plan in one line and in
    --out/plan.json (rank 0). A plan over the GPU's memory stops the run with the flags that fit;
    on CPU a plan over the host's memory is noted, not stopped (it swaps, or another job leaves).
    Takes the baseline of peak_memory, which grpo.py logs per phase to compare with this plan."""
    cuda = par.device.type == "cuda"
    runtime_baseline(config)
    p = plan_run(args, config, par.world, torch.cuda.get_device_properties(par.device).total_memory
                 if cuda else None)
    args.micro_batch, args.activation_checkpointing = p["micro_batch"], p["activation_checkpointing"]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", par.world))  # the ranks on this host
    g = p["gib"]
    host = ranks * (max(g["host"], g["load"]) if cuda else g["peak"] + g["host"])
    if par.rank == 0:
        print(plan_line(p) + (f" | {ranks} rank(s) need {host:.1f} GiB of this host's {ram:.1f}"
                              if host > ram else ""))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "plan.json"), "w") as f:
            json.dump(p, f, indent=1)
    if p["fits"] is False:
        fit = " | ".join(p["advice"]) or "none found"
        raise SystemExit(f"the plan needs {g['total']:.1f} GiB a rank, over this GPU's "
                         f"{p['capacity_gib']:.1f}; runs that fit: {fit}")
    return p


def plan_parser():
    """`mr_sp.py plan`'s flags: grpo.py's that shape memory, by its names and with its defaults but
    --dtype and --max-new, a long-video run's (bfloat16, 1,024; tests/test_plan.py checks the
    rest)."""
    import argparse
    ap = argparse.ArgumentParser(prog="mr_sp.py plan", description=plan.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["plan"], help="the planner (the only command)")
    ap.add_argument("--config", default="qwen2.5-vl-7b", help="tiny | small | a model.TINY name | "
                    "qwen2.5-vl-7b | qwen2.5-vl-3b | qwen3-vl-8b | qwen3.5-9b | HF folder; default qwen2.5-vl-7b")
    ap.add_argument("--world", type=int, default=0, help="ranks, dp x sp; without --sp the layout is "
                    "chosen: the most data parallel that fits --gpu-gb; default --sp (dp 1)")
    ap.add_argument("--gpu-gb", type=float, default=79.0,
                    help="GiB a rank has; default 79 (an 80 GB H100's total_memory is 79.2 GiB)")
    ap.add_argument("--text", type=int, default=TEXT,
                    help=f"prompt tokens besides the video; default {TEXT}")
    ap.add_argument("--audio-seconds", type=float, default=None, help="a model that hears (Qwen2.5-Omni): "
                    "seconds of each video's sound; default --frames (a frame a second)")
    g = ap.add_argument_group("grpo.py's flags, its defaults but --dtype bfloat16 and --max-new 1024")
    g.add_argument("--frames", type=int, required=True, help="frames per video")
    g.add_argument("--max-pixels", type=int, default=128 * 28 * 28,
                   help="pixels per frame; default 128*28*28 (Qwen2.5-VL: 64 tokens a frame)")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="compute dtype, as grpo.py's (bfloat16: autocast over fp32 weights); "
                   "default bfloat16")
    g.add_argument("--G", type=int, default=8, help="rollouts per prompt; default 8")
    g.add_argument("--max-new", type=int, default=1024, help="response tokens; default 1024")
    g.add_argument("--prompts", type=int, default=8, help="prompts per step over all ranks; default 8")
    g.add_argument("--prefill-chunk", type=int, default=1024, help="rollout prefill tokens a forward")
    g.add_argument("--engine", default="own", choices=["own", "vllm"], help="rollout engine")
    g.add_argument("--vllm-mem", type=float, default=0.5, help="vllm: GPU share; default 0.5")
    g.add_argument("--rollout-dtype", default=None, choices=["float32", "bfloat16"],
                   help="default --dtype")
    g.add_argument("--kl-coef", type=float, default=1e-2, help="0: no reference model; default 1e-2")
    g.add_argument("--mini-batches", type=int, default=2, help="optimizer updates a pass; default 2")
    g.add_argument("--micro-batch", type=int, default=None, help="rows per forward; default: the "
                   f"largest of {', '.join(map(str, MICRO_BATCHES))} that fits")
    g.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="a micro-batch's rows run their prompt once; default on")
    g.add_argument("--sp", type=int, default=None, help="sequence-parallel degree; default 1, or chosen "
                   "with --world")
    g.add_argument("--fsdp", action="store_true", help="policy and reference sharded over --world ranks")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="decoder layers recomputed in backward; default: on where it must be to fit")
    return ap


def pick_layout(a, cfg, world, cap):
    """The layout for `world` ranks of `cap` bytes: the most data-parallel (least sp) that fits,
    else the smallest plan. Returns {sp: plan} of the layouts tried, the one picked first."""
    tried = {}
    for k in (k for k in range(1, world + 1) if not check_layout(world, k, a.prompts)):
        a.sp = k
        tried[k] = plan_run(a, cfg, world, cap)
        if tried[k]["fits"]:
            break
    best = a.sp if tried[a.sp]["fits"] else min(tried, key=lambda k: tried[k]["gib"]["total"])
    return {best: tried[best], **tried}


def plan_main(argv=None):
    """`python mr_sp.py plan`: prints `plan_run`'s plan (a table, then the plan as JSON); with
    --world and no --sp, of the layout with the least sp (the most data parallel) that fits
    --gpu-gb."""
    a = plan_parser().parse_args(argv)
    cfg, cap = plan_config(a.config), a.gpu_gb * 2**30
    world, tried = a.world or a.sp or 1, {}
    if a.sp is None and a.world:
        tried = pick_layout(a, cfg, world, cap)
        a.sp = next(iter(tried))
    a.sp = a.sp or 1
    p = tried.get(a.sp) or plan_run(a, cfg, world, cap)
    tried = ", ".join(f"sp {k}: {q['gib']['total']:.1f} GiB" for k, q in tried.items())
    audio = f" and {p['audio_tokens']:,} audio tokens" if p["audio_tokens"] else ""
    print(f"{a.config}, {p['frames']} frames = {p['video_tokens']:,} video tokens{audio}, {p['tokens']:,} per "
          f"row, {p['tokens_per_rank']:,} a pass per rank at dp {p['dp']} x sp {p['sp']} (world {world})"
          + (f"; layouts tried: {tried}" if tried else ""))
    for k in COMPONENTS:
        print(f"{k:>14} | {p['gib'][k]:9.2f} GiB")
    print(f"{'fits' if p['fits'] else 'OVER'} {a.gpu_gb:g} GiB; most frames that fit: "
          f"{p['max_frames']:,}"
          + (f"; runs that fit: {' | '.join(p['advice'])}" if p["advice"] else ""))
    print(json.dumps(p))


# -----------------------------------------------------------------------------
# The vLLM rollout engine (--engine vllm), the paper's: fed the same cached video embeddings, it
# never runs the vision tower. vLLM is optional and imported only here; tests/test_vllm.py checks
# it against `rollout` and `logprobs` (in the environment .ci/vllm_env builds on CPU).

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
    if model.config.model_type == M.OMNI:  # (vLLM 0.32, checked on its CPU build)
        raise SystemExit("--engine vllm does not run Qwen2.5-Omni: vLLM takes its sound only as log-mel "
                         "features that it encodes itself, no cached audio embeddings (the rollouts would "
                         "not hear what the trainer's passes splice), and registers the thinker for whole "
                         "Qwen2.5-Omni checkpoints only; use --engine own")
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
        first = not dist.is_initialized() or dist.get_rank() == 0
        path = [tempfile.mkdtemp(prefix="longrl-engine-") if first else None]
        if world > 1:
            dist.broadcast_object_list(path, 0)
        path = path[0]
        sd = full_state(model)[0] if sharded(model) else None  # collective: every rank
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
            if kind == "video" and family in M.QWEN3:
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
