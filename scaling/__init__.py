"""Scaling analysis over the files runs leave behind (never the trainer):

    collect.py   runs / a sweep manifest -> one table (CSV + JSON), failed runs listed with reasons; per run
                 D in images / tokens / [MASK] tokens, tokens/s, MFU, device-hours, sampling img/s
    fit.py       L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, L-BFGS, bootstrap CIs),
                 compute-optimal N*(C), D*(C), FID vs compute, hold-out prediction
    report.py    plots + a Markdown report: python -m scaling.report --sweep DIR --out DIR; the runs
                 table, residuals against N and D, sensitivity of the law to the loss key, EMA vs
                 online, Huber delta and the smallest size, and the FID protocol
    plan.py      the next isoFLOP sweep as a YAML for launch/sweep.py
"""
