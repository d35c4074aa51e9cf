"""MR-SP: Multi-modal Reinforcement Sequence Parallelism, the system side of long-video RL.

What every stage calls for its videos and its long sequences:
- `init_distributed`: rank, world size and device, the same under `python` and `torchrun`;
  `init_parallel(sp)` adds the sequence-parallel group (world = dp x sp).
- `encode`: a video's embeddings through the (frozen) vision tower, computed once per prompt;
  rollouts and every prefill pass of that step reuse the tensor instead of re-encoding.
- `rollout`: the engine. Each prompt (video + question) is prefilled once and its KV cache copied
  into G rows that decode together (model.generate); tokens and their log-probs come back.
- `prefill_logprobs`: the training-side pass over [prompt | response] rows (old policy,
  reference, policy), log-probs of the response tokens only.

With an SP group (`group=`), the two MR-SP stages (paper section 4; tests/test_mr_sp.py checks both
against the single-process path):
1. `encode` splits a video's temporal patch groups over the ranks and all-gathers the embeddings.
2. `prefill_logprobs` splits the sequence over the ranks; text attention is Ulysses
   (`ulysses_attention`, entered through transformers' attention registry): an all-to-all trades
   the sequence split for a head split, attention runs over the full sequence, and back.
"""
import math
import os
import zlib

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

import model as M


def init_distributed():
    """(rank, world, device). Under torchrun: a gloo (CPU) or NCCL (CUDA) process group."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")


def init_parallel(sp=1):
    """(rank, world, device, sp_group), world = dp x sp: ranks [k*sp, (k+1)*sp) form sequence-parallel
    group k (they share their rows; data splits by rank // sp). sp_group is None when sp is 1: the
    plain data-parallel path, no extra group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if sp < 1 or world % sp:
        raise ValueError(f"world size {world} is not divisible by --sp {sp} (dp x sp = world)")
    rank, world, device = init_distributed()
    if sp == 1:
        return rank, world, device, None
    groups = [dist.new_group(list(range(k * sp, (k + 1) * sp))) for k in range(world // sp)]  # all ranks create all
    return rank, world, device, groups[rank // sp]


def shutdown():
    """Leave the process group together: a rank that tears gloo down while another still works
    (rank 0 writing the checkpoint) can abort the job. Only the group init_distributed made: an
    in-process vLLM engine makes its own, and tears it down itself."""
    if dist.is_initialized() and "RANK" in os.environ:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x, op="sum"):
    """Reduce a tensor over ranks in place ("sum" or "max"); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def dp_sum(x, sp_group=None):
    """Sum a count or metric over data-parallel ranks, in place. SP peers hold the same rows and
    compute the same values, so only the first rank of each SP group contributes (the others add
    zeros): exact, unlike dividing the sum over all ranks by sp, and no data-parallel group needed."""
    if sp_group is not None and dist.get_rank(sp_group):
        x.zero_()
    return all_reduce(x)


def sync_grads(params):
    """Data parallel: sum every rank's gradients (each rank's loss is its share of the global mean).
    One all-reduce per tensor, like DDP without its buckets; parameters without a gradient join with zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)


def seed_of(*key):
    """An integer seed from a key such as (seed, step, sample id): the same in every process and every
    run (Python's hash() of strings is not)."""
    return zlib.crc32(repr(key).encode())


def generator(*key):
    """A torch.Generator seeded by seed_of(*key)."""
    return torch.Generator().manual_seed(seed_of(*key))


def encode(model, sample, group=None):
    """Video embeddings (n_tokens, hidden) of one sample, detached: the vision tower is frozen in RL.

    With a sequence-parallel group (MR-SP stage 1) each rank encodes a contiguous share of the
    video's temporal patch groups and the shares are all-gathered. Qwen2.5-VL's vision attention
    (window and full blocks alike) never crosses a temporal group, so this equals one rank encoding
    the whole video."""
    dev = next(model.parameters()).device
    pixels, grid = sample["pixel_values"].to(dev), sample["grid_thw"].to(dev)
    with torch.no_grad():
        if group is None:
            return M.encode_video(model, pixels, grid)
        if len(grid) != 1:
            raise ValueError(f"sharded encode takes one video per sample, got grid_thw {grid.tolist()}")
        sp, r = dist.get_world_size(group), dist.get_rank(group)
        t, h, w = grid[0].tolist()
        counts = [t // sp + (i < t % sp) for i in range(sp)]  # temporal groups per rank, as even as possible
        per = h * w // model.config.vision_config.spatial_merge_size ** 2  # tokens per temporal group
        start = sum(counts[:r]) * h * w  # pixel rows are group-major: h*w rows per temporal group
        # all_gather takes equal sizes: every share is padded to the largest, and trimmed after
        buf = torch.zeros(max(counts) * per, model.config.vision_config.out_hidden_size,
                          dtype=model.model.visual.dtype, device=dev)
        if counts[r]:
            buf[:counts[r] * per] = M.encode_video(model, pixels[start:start + counts[r] * h * w],
                                                   grid.new_tensor([[counts[r], h, w]]))
        shares = [torch.empty_like(buf) for _ in range(sp)]
        dist.all_gather(shares, buf, group=group)
        return torch.cat([x[:c * per] for x, c in zip(shares, counts)])


def prompt_of(model, tok, sample, text):
    """Prompt ids and their (3, P) positions for one sample."""
    ids = M.build_prompt(tok, text, M.n_video_tokens(sample["grid_thw"]))
    return ids, M.positions(ids, sample["grid_thw"], [sample["second_per_grid"]], model.config)


def rollout(model, tok, prompts, prompt_pos, videos, G, **gen):
    """G samples per prompt from cached video embeddings: tokens (B*G, T), log-probs, lengths."""
    dev = videos[0].device
    ids, pos, mask, _ = M.layout(prompts, prompt_pos, pad_id=tok.pad_token_id)
    with torch.no_grad():
        embeds = M.splice(model, ids.to(dev), torch.cat(videos))
    return M.generate(model, embeds, pos.to(dev), mask.to(dev), n=G, eos_ids=eos_ids(tok),
                      banned=M.banned_ids(tok), pad_id=tok.pad_token_id, **gen)


def eos_ids(tok):
    return [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def prefill_logprobs(model, tok, rows, temperature=1.0, group=None):
    """Log-probs and entropies (N, T) of each row's response, and the response mask (N, T).

    rows: dicts with prompt (ids), pos (3, P), video (embeddings), response (ids). With an SP group
    every rank of it passes the same rows and gets the same tensors back (MR-SP stage 2)."""
    dev = rows[0]["video"].device
    ids, pos, mask, P = M.layout([r["prompt"] for r in rows], [r["pos"] for r in rows],
                                 [r["response"] for r in rows], pad_id=tok.pad_token_id)
    ids, pos, mask = ids.to(dev), pos.to(dev), mask.to(dev)
    embeds = M.splice(model, ids, torch.cat([r["video"] for r in rows]))
    kw = dict(temperature=temperature, banned=M.banned_ids(tok))
    if group is None:
        lp, ent = M.response_logprobs(model, embeds, pos, mask, P, ids[:, P:], **kw)
    else:
        lp, ent = sp_response_logprobs(model, embeds, pos, mask, P, ids[:, P:], group, **kw)
    return lp, ent, mask[:, P:].to(lp.dtype)


# -----------------------------------------------------------------------------
# MR-SP stage 2: Ulysses sequence parallelism for the prefill.

def _all_to_all(x, group):
    """Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j. Differentiable."""
    x = x.contiguous()
    return dist_nn.all_to_all_single(torch.empty_like(x), x, group=group)


def ulysses_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, sp_group=None, sp_mask=None,
                      **kw):
    """Text attention for transformers' registry (name "ulysses"). q (B, H, l, D) after rotary,
    k, v (B, Hkv, l, D): this rank's block of l = L/sp tokens. Returns (B, l, H, D).

    Without sp_group (rollout, or sp=1) it is transformers' SDPA. With it: an all-to-all scatters
    heads and gathers the sequence, so each rank attends with H/sp heads over all L tokens, and the
    inverse all-to-all brings this rank's tokens back with all heads. The mask is built here from
    sp_mask (B, L), the padding mask of the full sequence: the one transformers hands each layer
    covers only the local block."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if sp_group is None:
        return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kw)
    sp = dist.get_world_size(sp_group)
    H, l = q.shape[1], q.shape[2]
    rep = sp // math.gcd(k.shape[1], sp)  # KV heads repeated until sp divides them: each rank gets whole groups
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    hq, hk = H // sp, k.shape[1] // sp
    x = torch.cat([t.unflatten(1, (sp, -1)) for t in (q, k, v)], 2).transpose(0, 1)  # (sp, B, hq+2hk, l, D)
    x = _all_to_all(x, sp_group).permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, hq+2hk, L, D)
    q, k, v = x.split([hq, hk, hk], 1)
    L = x.shape[2]
    if bool((sp_mask[:, 1:] <= sp_mask[:, :-1]).all()):  # padding only at the ends of rows: causal alone is exact
        mask = None
    else:  # left padding: causal and real keys; a padding query sees itself (a fully masked row gives NaN)
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        mask = (causal & sp_mask.bool()[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                         scale=scaling, enable_gqa=hk != hq)  # (B, hq, L, D); mask (B, 1, L, L)
    y = out.unflatten(2, (sp, l)).permute(2, 0, 1, 3, 4)  # (sp, B, hq, l, D)
    return _all_to_all(y, sp_group).permute(1, 3, 0, 2, 4).flatten(2, 3), None  # (B, l, H, D)


def use_ulysses(model, sp):
    """Switch the text attention to `ulysses_attention` (vision attention unchanged). Without an SP
    group it is SDPA with transformers' own masks, so rollouts on the same model are unaffected."""
    heads = model.config.text_config.num_attention_heads
    if heads % sp:
        raise ValueError(f"num_attention_heads {heads} is not divisible by --sp {sp}: "
                         "Ulysses gives each rank heads/sp heads")
    if model.config.text_config._attn_implementation != "ulysses":
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
        AttentionInterface.register("ulysses", ulysses_attention)
        AttentionMaskInterface.register("ulysses", sdpa_mask)
        model.set_attn_implementation({"text_config": "ulysses"})


def sp_response_logprobs(model, embeds, pos, mask, P, targets, group, **kw):
    """M.response_logprobs with the sequence split over the ranks of group; the same (B, T) results
    on every rank.

    Gradients: callers compute the same loss from these gathered tensors on every rank. The
    gather's backward sums those sp identical gradients, a hook divides by sp, so each rank's
    parameter gradients are its share and their sum over the group is exactly the sp=1 gradient
    (sync_grads sums them, over dp too)."""
    sp, r = dist.get_world_size(group), dist.get_rank(group)
    use_ulysses(model, sp)
    B, T = targets.shape
    n = P + T - 1  # columns run through the model: the last token predicts nothing
    l = -(-n // sp)  # tokens per rank; the sequence is padded to sp*l with masked columns
    embeds, pos, mask = (F.pad(embeds[:, :n], (0, 0, 0, sp * l - n)), F.pad(pos[..., :n], (0, sp * l - n)),
                         F.pad(mask[:, :n], (0, sp * l - n)))
    mine = slice(r * l, (r + 1) * l)
    hidden = model.model.language_model(inputs_embeds=embeds[:, mine], position_ids=pos[..., mine],
                                        sp_group=group, sp_mask=mask).last_hidden_state  # (B, l, hidden)
    a, b = max(P - 1, r * l), min(P - 1 + T, (r + 1) * l)  # this rank's columns that predict response tokens
    if b > a:  # column P-1+j predicts response token j
        lp, ent = M.token_logprobs(model, hidden[:, a - r * l:b - r * l], targets[:, a - P + 1:b - P + 1], **kw)
        local = F.pad(torch.stack([lp, ent]), (a - r * l, (r + 1) * l - b))  # (2, B, l)
    else:  # still tied to hidden: every rank must run the backward of every all-to-all (collectives)
        local = hidden.new_zeros(2, B, l, dtype=torch.float32) + 0.0 * hidden.sum()
    if local.requires_grad:
        local.register_hook(lambda g: g / sp)
    full = torch.cat(dist_nn.all_gather(local, group=group), -1)  # (2, B, sp*l)
    return full[0, :, P - 1:P - 1 + T], full[1, :, P - 1:P - 1 + T]


# -----------------------------------------------------------------------------
# The vLLM rollout engine (--engine vllm), the paper's: fed the same cached video embeddings, it never
# runs the vision tower. vLLM is optional and imported only here; tests/test_vllm.py checks it
# against `rollout` and `prefill_logprobs` (in the environment .ci/vllm_env builds on CPU).

def vllm_engine(path, dtype="float32", mem=0.7, tp=1, seed=0):
    """A vLLM engine on the Hugging Face folder `path` (written by model.save), in this process (the
    engine core is not a subprocess, so a weight sync is a call, not a copy through a socket).
    mem: fraction of GPU memory for weights and KV cache (gpu_memory_utilization); tp: tensor-parallel
    GPUs. On CPU the KV cache takes VLLM_CPU_KVCACHE_SPACE GiB (1 unless set)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM drops torch to 1 thread in this process unless OMP_NUM_THREADS is set: keep training's count
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    try:
        from vllm import LLM
    except ImportError as e:
        raise ImportError("--engine vllm needs vLLM: `pip install vllm` on GPU; on CPU run with the python that "
                          "`bash .ci/vllm_env` prints (its own environment with the CPU build of vLLM)") from e
    cuda = torch.cuda.is_available()
    return LLM(model=path, dtype=dtype, seed=seed, enforce_eager=not cuda, enable_mm_embeds=True,
               limit_mm_per_prompt={"image": 0, "video": 1}, gpu_memory_utilization=mem,
               tensor_parallel_size=tp, enable_sleep_mode=cuda,
               logprobs_mode="processed_logprobs")  # after the ban and temperature: what our sampler reports


def vllm_rollout(llm, tok, prompts, videos, grids, second_per_grid, G, max_new=64, temperature=1.0, top_p=1.0,
                 seeds=None):
    """`rollout` on a vLLM engine, the same return: tokens (B*G, T) padded after EOS, log-probs, lengths.

    Each prompt is sent once with n = G, its video as cached embeddings with its grid and seconds per
    temporal group: vLLM then computes model.positions' M-RoPE positions (without second_per_grid_ts it
    assumes 1 s per group). Vision special tokens are excluded through allowed_token_ids (exact -inf).
    The log-probs are of the distribution vLLM samples from: ours (temperature applied; greedy: at
    temperature 1) when top_p is 1; below 1 vLLM renormalizes over the nucleus, we do not.
    seeds: one per prompt (vLLM seeds sample j with seed + j), or None."""
    from vllm import SamplingParams
    pad, banned = tok.convert_tokens_to_ids("<|video_pad|>"), set(M.banned_ids(tok).tolist())
    allowed = [i for i in range(llm.llm_engine.model_config.get_vocab_size()) if i not in banned]
    greedy = temperature == 0  # vLLM takes n = 1 only: the G identical answers are copies
    reqs, params = [], []
    for b, (ids, video) in enumerate(zip(prompts, videos)):
        ids = [t for j, t in enumerate(ids) if not (t == pad and j and ids[j - 1] == pad)]  # vLLM expands the one pad
        reqs.append(dict(prompt_token_ids=ids, multi_modal_data={"video": dict(
            video_embeds=video.detach().cpu(), video_grid_thw=torch.as_tensor(grids[b]).view(-1, 3),
            second_per_grid_ts=torch.tensor([float(second_per_grid[b])], dtype=torch.float64))}))
        params.append(SamplingParams(n=1 if greedy else G, max_tokens=max_new, temperature=temperature, top_p=top_p,
                                     logprobs=0, seed=None if seeds is None else seeds[b], allowed_token_ids=allowed,
                                     stop_token_ids=eos_ids(tok)))
    outs = [c for o in llm.generate(reqs, params, use_tqdm=False)
            for c in (o.outputs * G if greedy else sorted(o.outputs, key=lambda c: c.index))]
    lens = torch.tensor([len(c.token_ids) for c in outs])  # vLLM keeps the stop token, as `rollout` does
    toks = torch.full((len(outs), int(lens.max())), tok.pad_token_id, dtype=torch.long)
    lps = torch.zeros(toks.shape)
    for i, c in enumerate(outs):
        toks[i, :lens[i]] = torch.tensor(c.token_ids)
        lps[i, :lens[i]] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
    return toks, lps, lens


def vllm_sync(llm, model):
    """Load the policy's current language-model weights into the engine in place (Hugging Face names,
    as in the saved folder), then drop what was computed with the old ones: prefix-cache KV blocks
    and encoder outputs (vLLM otherwise fails with "Encoder cache miss"). The vision tower is frozen
    and never run by the engine: not sent."""
    weights = [(k, v.detach()) for k, v in model.state_dict().items() if not k.startswith("model.visual.")]
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


def vllm_sleep(llm, asleep):
    """GPU: free the engine's memory for training (weights offloaded to CPU, KV cache dropped), and take
    it back before the next rollouts. CPU: vLLM has no sleep mode, nothing to do."""
    if not torch.cuda.is_available():
        return
    if asleep:
        llm.sleep(level=1)
    else:
        llm.wake_up()
