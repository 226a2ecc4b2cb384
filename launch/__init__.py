"""submitit launchers: train, eval, sweep, tokenize and the whole pipeline, on SLURM or locally.

Run them as scripts (`python launch/train.py ...`); `jobs.py` holds what runs on the nodes and
`submit.py` the executors, dependencies and submission records they share.
"""
