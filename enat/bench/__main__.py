import argparse
import sys

from enat.bench import data, eval, gpu, sample, tokenizer, train

BENCHES = {"sample": sample, "data": data, "train": train, "eval": eval, "tokenizer": tokenizer, "gpu": gpu}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m enat.bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    bench = BENCHES[argv[0]]
    parser = argparse.ArgumentParser(prog=f"python -m enat.bench {argv[0]}", description=bench.__doc__)
    bench.add_arguments(parser)
    bench.run(parser.parse_args(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
