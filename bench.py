"""Benchmarks: simulator steps/s, loader clips/s, training samples/s and FLOP/s, seconds per CEM plan.

Run: python bench.py            (everything)
     python bench.py --only envs (one area: envs, data, train, plan)
"""

import argparse

# --- simulators


def bench_envs() -> list[dict]:
    return []


# --- data loading


def bench_data() -> list[dict]:
    return []


# --- training


def bench_train() -> list[dict]:
    return []


# --- planning


def bench_plan() -> list[dict]:
    return []


# --- main

BENCHES = {"envs": bench_envs, "data": bench_data, "train": bench_train, "plan": bench_plan}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHES), default=None, help="run one benchmark area")
    args = parser.parse_args()
    for name, fn in BENCHES.items():
        if args.only in (None, name):
            fn()
