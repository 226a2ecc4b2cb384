"""Training: the ENAT objective, EMA, checkpoints, metrics, and the trainer that composes them
over a DeepSpeed engine (ZeRO 0-3; gloo on CPU, NCCL on GPUs)."""
