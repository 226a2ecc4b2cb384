"""Scaling studies over the files runs leave behind: collect them, fit L(N, D), report, plan the next.

Each module imports only modules listed above it (no circles, module or function level):

    collect.py     runs / a sweep manifest -> one table (CSV + JSON), failed runs listed with reasons; per run
                   D in images / tokens / [MASK] tokens, tokens/s, MFU, device-hours, sampling img/s
    search.py      the robust search for L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, profile scan,
                   L-BFGS-B to tight tolerances) and the bootstrap over runs, a global search per resample
    points.py      which validation points a law is fitted to; the loss columns' names
    fit.py         the law with bootstrap CIs, compute-optimal N*(C), D*(C), FID vs compute, hold-out prediction
    approaches.py  Chinchilla's three approaches to N*(C) ~ C^a, side by side
    baselines.py   the regime gate: frequency-table baselines of the sweep's own token shards
    frontier.py    compute-optimal frontiers with each size's own training and sampling costs
    holdout.py     the pre-registered hold-out and the leave-one-out table: python -m scaling.holdout
    tables.py      the report's rows: runs table, residuals, sensitivity of the law to the loss key, EMA vs
                   online, Huber delta and the smallest size, FID laws and protocol, the three approaches
    plots.py       the report's figures (matplotlib)
    sections.py    the report's Markdown sections
    publish.py     the report as a wandb run
    report.py      python -m scaling.report --sweep DIR --out DIR: the above put together, fit.json + report.md
    plan.py        the next sweeps as YAML for launch/sweep.py: a study's LR sweep, isoFLOP levels (a second round
                   from the first's fit), hold-out; a study's families
    compare.py     two families as laws: loss at equal training compute, inference-aware frontiers, the
                   crossover number of generated images: python -m scaling.compare
    study.py       a study end to end: python -m scaling.study --study configs/studies/NAME.yaml
"""
