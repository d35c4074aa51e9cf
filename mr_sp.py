"""MR-SP: Multi-modal Reinforcement Sequence Parallelism, the system side of long-video RL.

What every stage calls for its videos and its long sequences:
- `init_distributed`: rank, world size and device, the same under `python` and `torchrun`.
- `encode`: a video's embeddings through the (frozen) vision tower, computed once per prompt;
  rollouts and every prefill pass of that step reuse the tensor instead of re-encoding.
- `rollout`: the engine. Each prompt (video + question) is prefilled once and its KV cache copied
  into G rows that decode together (model.generate); tokens and their log-probs come back.
- `prefill_logprobs`: the training-side pass over [prompt | response] rows (old policy,
  reference, policy), log-probs of the response tokens only.

This is the single-process form: sequence parallelism (frames split across ranks for encoding,
Ulysses attention for prefill) slots into `encode` and `prefill_logprobs` without changing callers.
"""
import os
import zlib

import torch
import torch.distributed as dist

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


def shutdown():
    """Leave the process group together: a rank that tears gloo down while another still works
    (rank 0 writing the checkpoint) can abort the job."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x, op="sum"):
    """Reduce a tensor over ranks in place ("sum" or "max"); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def sync_grads(params):
    """Data parallel: sum every rank's gradients (each rank's loss is its share of the global mean).
    One all-reduce per tensor, like DDP without its buckets; parameters without a gradient join with zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)


def generator(*key):
    """A torch.Generator seeded by a key such as (seed, step, sample id): the same in every process
    and every run (Python's hash() of strings is not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def encode(model, sample):
    """Video embeddings (n_tokens, hidden) of one sample, detached: the vision tower is frozen in RL."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        return M.encode_video(model, sample["pixel_values"].to(dev), sample["grid_thw"].to(dev))


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


def prefill_logprobs(model, tok, rows, temperature=1.0):
    """Log-probs and entropies (N, T) of each row's response, and the response mask (N, T).

    rows: dicts with prompt (ids), pos (3, P), video (embeddings), response (ids)."""
    dev = rows[0]["video"].device
    ids, pos, mask, P = M.layout([r["prompt"] for r in rows], [r["pos"] for r in rows],
                                 [r["response"] for r in rows], pad_id=tok.pad_token_id)
    ids, pos, mask = ids.to(dev), pos.to(dev), mask.to(dev)
    embeds = M.splice(model, ids, torch.cat([r["video"] for r in rows]))
    lp, ent = M.response_logprobs(model, embeds, pos, mask, P, ids[:, P:], temperature=temperature,
                                  banned=M.banned_ids(tok))
    return lp, ent, mask[:, P:].to(lp.dtype)
