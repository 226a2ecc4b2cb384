import argparse
import contextlib
import json
import os
import sys

from enat.bench import data, eval, gpu, sample, tokenizer, train

BENCHES = {"sample": sample, "data": data, "train": train, "eval": eval, "tokenizer": tokenizer, "gpu": gpu}


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything written to stdout inside goes to stderr. At the file descriptor, not just
    sys.stdout: DeepSpeed's logger holds its own reference to stdout, and C code and child
    processes write to fd 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m enat.bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    bench = BENCHES[argv[0]]
    parser = argparse.ArgumentParser(prog=f"python -m enat.bench {argv[0]}", description=bench.__doc__)
    bench.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    if not getattr(args, "json", False):
        bench.run(args)
        return 0
    # --json: the result alone on stdout, so that `--json > FILE` holds JSON (`enat cost --bench FILE`);
    # the table and whatever the libraries print go to stderr
    with stdout_to_stderr():
        result = bench.run(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
