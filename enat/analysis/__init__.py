"""The paper's analyses as commands, on any checkpoint (ENAT or the vanilla NAT baseline):

    enat analyze attention --run RUN --checkpoint W [--baseline W2] [--ratios 0.25,0.5,0.75]
    enat analyze temporal  --run RUN --checkpoint W [--baseline W2]
    enat analyze one-step  --run RUN --checkpoint W [--ratios 0.2,0.4,0.6,0.8]
    enat analyze pareto    --run RUN --checkpoint W [--baseline W2] [--steps 4,8,12,16] [--cfg-scales 0,2]

  attention  spatial: the share of attention mass [MASK] queries and visible queries put on [MASK],
             visible (and caption) keys, per layer, averaged over held-out token maps masked at
             several ratios; next to it the share uniform attention would give (the key counts).
  temporal   temporal: while sampling, the cosine similarity of a token's features between
             consecutive steps, per layer and step: for tokens visible at both steps, and for
             tokens decoded in between. Features come from full forwards on the sampler's
             trajectory (reuse only shapes the trajectory), so they are the network's true ones.
  one-step   held-out token maps masked at each ratio, every [MASK] predicted in one forward
             (argmax, conditional logits), decoded and scored by the FID job's machinery (same
             extractor, reference, metrics); ratio 0 is the tokenizer's reconstruction score.
  pareto     FID against analytic sampling TFLOPs per image and measured img/s over steps x CFG
             scales, with and without reuse (and the NAT baseline): the paper's efficiency figure.

Each writes NAME.json (numbers and protocol), NAME.md (the table) and NAME.png into RUN/analysis/
(or --out) and logs table and figure to the run's wandb run when it has one. --baseline is a
weights file or a run directory (its latest checkpoint) of a model on the same tokens and
conditions; a checkpoint that does not match the config is refused with the differing fields.

Modules: one per analysis (attention.py, temporal.py, one_step.py, pareto.py), what they share
(subjects.py: the checkpoints and held-out token maps; recorder.py: attention capture; scorer.py:
the FID job's scoring of images) and the command (run.py, writing through output.py).
"""
