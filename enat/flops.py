"""Analytic FLOPs of ENAT, ENAT without reuse and the vanilla NAT, from the config.

Counted: every matrix multiply (linears, attention scores and weighted sums, the tied logit
matmul), 2 FLOPs per multiply-add, per sample. Not counted: embeddings lookups, norms,
activations, softmax (a few % at most). This is what torch.utils.flop_counter counts, which the
tests check these numbers against.

Text conditioning (model.condition=text) adds L context tokens: in full mode the encoder runs
over them with the visible tokens, in reuse mode they are carried through f with the old visible
tokens; the decoder always attends to them; their projection C -> D runs in full mode only, the
pooled caption's (one row) in every forward. The NAT baseline runs them through every block.

Backward = 2x forward for every matmul, except the logit matmul against the token table, whose
gradient is stopped (only the activation gradient is computed), and the caption embedder's two
Linears, whose input (the text encoder's states, data) takes no gradient (only the weight
gradient is computed): 1x forward for each of those.
"""

from __future__ import annotations

from dataclasses import dataclass

from enat.config import ModelConfig
from enat.sampling import mask_schedule


def _linear(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def block_flops(cfg: ModelConfig, n: int, m: int = 0, two_way: bool = True, own_kv: bool = True) -> int:
    """One block, one sample: n own tokens, m context tokens. A block with no own tokens is skipped;
    without own_kv (cross-attention) the keys are the m context tokens only."""
    if n == 0:
        return 0
    D = cfg.width
    hidden = int(D * cfg.mlp_ratio)
    keys = (n if own_kv else 0) + m
    return (_linear(n, D, D) * (keys > 0) + (_linear(n, D, 2 * D) if own_kv else 0) + _linear(m, D, 2 * D)  # q, kv own, kv ctx
            + 4 * n * keys * D  # scores and weighted sum
            + _linear(n, D, D)  # out projection
            + _linear(n, D, hidden) + _linear(n, hidden, D)  # MLP
            + _linear(1, D, (8 if two_way else 6) * D))  # adaLN, once per sample


def logit_flops(cfg: ModelConfig, positions: int) -> int:
    """The tied logit matmul alone."""
    return _linear(positions, cfg.width, cfg.codebook_size)


def head_flops(cfg: ModelConfig, positions: int) -> int:
    return _linear(positions, cfg.width, cfg.width) + logit_flops(cfg, positions)


def reuse_proj_flops(cfg: ModelConfig, n: int) -> int:
    return _linear(n, cfg.width, 4 * cfg.width) + _linear(n, 4 * cfg.width, cfg.width)


def text_flops(cfg: ModelConfig, tokens: bool) -> int:
    """The caption embedder: the pooled row's Linear (every forward) and, with `tokens`, the
    L context tokens' Linear (full mode; reuse mode carries their features instead)."""
    if cfg.condition != "text":
        return 0
    return _linear(1, cfg.text_dim, cfg.width) + (_linear(cfg.text_len, cfg.text_dim, cfg.width) if tokens else 0)


def head_positions(seq_len: int, masked: int, logits: str) -> int:
    return {"all": seq_len, "masked": masked, "none": 0}[logits]


def enat_forward_flops(cfg: ModelConfig, masked: int, prev_visible: int | None = None,
                       logits: str = "all") -> int:
    """One ENAT forward, one sample, with `masked` [MASK] tokens. prev_visible=None: full mode;
    otherwise reuse mode with that many tokens carried over from the previous call."""
    N, L = cfg.seq_len, cfg.context_len
    visible = N - masked
    if prev_visible is None:
        enc = cfg.enc_depth * block_flops(cfg, L + visible)
        extra = text_flops(cfg, tokens=True)
    else:
        new = visible - prev_visible
        enc = cfg.enc_depth * block_flops(cfg, new, L + prev_visible)
        extra = reuse_proj_flops(cfg, L + prev_visible) + text_flops(cfg, tokens=False)
    return extra + enc + decoder_flops(cfg, masked, L + visible) + head_flops(cfg, head_positions(N, masked, logits))


def decoder_flops(cfg: ModelConfig, masked: int, context: int) -> int:
    """ENAT's decoder over `masked` [MASK] tokens with `context` visible (and text) tokens, by
    model.decoder_attention: sc (SC-attention), self (one sequence of both, one-way blocks),
    cross ([MASK] queries, context keys only)."""
    if masked == 0:
        return 0
    if cfg.decoder_attention == "self":
        return cfg.dec_depth * block_flops(cfg, context + masked, two_way=False)
    if cfg.decoder_attention == "cross":  # with no context yet, the attention adds nothing (proj still runs)
        return cfg.dec_depth * block_flops(cfg, masked, context, own_kv=False)
    return cfg.dec_depth * block_flops(cfg, masked, context)


def nat_forward_flops(cfg: ModelConfig, masked: int, logits: str = "all") -> int:
    N = cfg.seq_len
    return (text_flops(cfg, tokens=True) + cfg.depth * block_flops(cfg, cfg.context_len + N, two_way=False)
            + head_flops(cfg, head_positions(N, masked, logits)))


def forward_flops(cfg: ModelConfig, masked: int, prev_visible: int | None = None, logits: str = "all") -> int:
    if cfg.arch == "nat":
        if prev_visible is not None:
            raise ValueError("the NAT baseline has no reuse mode")
        return nat_forward_flops(cfg, masked, logits)
    return enat_forward_flops(cfg, masked, prev_visible, logits)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingFlops:
    per_step: list[int]  # FLOPs of each step, one image (both CFG branches when guided)
    guided: bool

    @property
    def total(self) -> int:
        return sum(self.per_step)


def sampling_flops(cfg: ModelConfig, steps: int = 8, reuse: bool = True, guided: bool = True,
                   logits: str = "masked") -> SamplingFlops:
    """FLOPs per image of a whole sampling run. logits="masked" is what enat.sampling runs;
    "all" is what the released sampler computes."""
    if reuse and cfg.arch == "nat":
        raise ValueError("the NAT baseline has no reuse mode")
    N = cfg.seq_len
    sched = mask_schedule(N, steps)
    per_step = []
    for s, masked in enumerate(sched):
        prev_visible = N - sched[s - 1] if (reuse and s > 0) else None
        per_step.append((2 if guided else 1) * forward_flops(cfg, masked, prev_visible, logits))
    return SamplingFlops(per_step, guided)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_step_flops(cfg: ModelConfig, masked: int, reuse: bool = False, remasked: int = 0) -> int:
    """FLOPs of one training sample: the online forward and backward with logits at [MASK]
    positions only; in a reuse-mode step also the no-grad EMA forward (features only) on the input
    with `remasked` of the visible tokens masked again. The logit matmul and the caption
    embedder's Linears run backward once (activation, resp. weight gradient only), the rest twice."""
    N = cfg.seq_len
    if not reuse:
        fwd = forward_flops(cfg, masked, logits="masked")
        return 3 * fwd - logit_flops(cfg, masked) - text_flops(cfg, tokens=True)
    if cfg.arch == "nat":
        raise ValueError("the NAT baseline has no reuse mode")
    prev_visible = N - masked - remasked
    prev = forward_flops(cfg, masked + remasked, logits="none")
    fwd = forward_flops(cfg, masked, prev_visible=prev_visible, logits="masked")
    return prev + 3 * fwd - logit_flops(cfg, masked) - text_flops(cfg, tokens=False)


def masked_count(seq_len: int, ratio: float) -> int:
    """Training's [MASK] count for a mask ratio: round(N r) clamped to [1, N-1]."""
    return min(max(round(seq_len * ratio), 1), seq_len - 1)


def expected_train_flops(cfg: ModelConfig, beta: tuple[float, float] = (12.0, 3.0), reuse_prob: float = 0.5,
                         remask_mean: float = 0.5) -> float:
    """Mean training FLOPs per sample: mask ratio ~ Beta(a, b), integrated exactly over the
    resulting [MASK] counts; reuse-mode steps with probability reuse_prob, re-masking
    remask_mean of the visible tokens on average."""
    # scipy.stats: about 1 s to import, for this estimate only (`enat models`, the sampling benchmark
    # and the Pareto analysis import this module without needing it)
    from scipy.stats import beta as beta_dist

    N = cfg.seq_len
    a, b = beta
    # P(count = k) from the Beta CDF between rounding boundaries (round-half-even is measure zero).
    edges = [min(max((k + 0.5) / N, 0.0), 1.0) for k in range(-1, N + 1)]
    cdf = beta_dist.cdf(edges, a, b)
    probs: dict[int, float] = {}
    for k in range(0, N + 1):
        p = cdf[k + 1] - cdf[k]
        if p > 0:
            kk = min(max(k, 1), N - 1)
            probs[kk] = probs.get(kk, 0.0) + p
    total = 0.0
    for k, p in probs.items():
        plain = train_step_flops(cfg, k)
        if cfg.arch == "nat" or reuse_prob == 0:
            total += p * plain
            continue
        remasked = round((N - k) * remask_mean)
        total += p * ((1 - reuse_prob) * plain + reuse_prob * train_step_flops(cfg, k, True, remasked))
    return total
