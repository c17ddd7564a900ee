"""Tensor parallelism: one model split over several ranks (CPU core groups or GPUs, on one machine or
several), each holding its share of every layer's heads and MLP columns and the KV of its heads.

- `shard`: which heads and columns a rank holds, and the checkpoint's tensors cut to them;
- `parallel_model`: a rank's model (the same Llama code, row-parallel projections all-reduced);
- `group`: the torch.distributed groups (gloo / NCCL for activations, gloo for rank 0's plans);
- `mirror`: rank 0's manager decisions, logged and replayed on every rank's own manager;
- `executor`: rank 0's side (start the ranks, send plans, notice a dead rank);
- `worker`: every other rank's loop; `launch`: placing a machine's ranks, and `run_node` for
  machines other than rank 0's.
"""
