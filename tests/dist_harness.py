"""Runs training jobs inside one (multi-)process launch and writes what the tests assert on.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_harness.py JOBS.json OUT.json

JOBS.json: [{"name", "overrides": [...], "stop_at": int|null, "expect_error": bool}] run in order
in the same process group. OUT.json (rank 0): per job the train losses by step, EMA/online
checksums, ZeRO-3 partition fraction, skipped steps, the wandb run id, and any error text.
"""

import json
import sys
import traceback


def main(jobs_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from enat.config import load_config
    from enat.train.trainer import Trainer

    jobs = json.loads(open(jobs_path).read())
    results = {}
    for job in jobs:
        cfg = load_config(job["config"], job["overrides"])
        res = {}
        trainer = None
        try:
            trainer = Trainer(cfg, log=lambda *_: None)
            model = trainer.module
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
            res["local_param_fraction"] = local / trainer.n_params
            res["start_step"] = trainer.step
            trainer.fit(job.get("stop_at"))
            ema = trainer.ema.state_dict()["model"]  # a collective under ZeRO-3 (the EMA is sharded)
            res["ema"] = {k: v.double().sum().item() for k, v in ema.items()}
            res["ema_first"] = ema["head.fc.weight"].flatten()[:64].tolist()
            res["skipped"] = trainer.skipped
            res["run_id"] = trainer.run_id
            res["step"] = trainer.step
            res["data_state"] = trainer.loader.state_dict()
        except Exception as e:  # the test decides whether an error was expected
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()
        finally:
            if trainer is not None:
                trainer.close()
        results[job["name"]] = res
        if dist.is_initialized():
            dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    import os

    os._exit(0)  # avoid rare aborts at interpreter exit after all work (see the platform notes)
