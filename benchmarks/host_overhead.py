"""Host overhead of one batch-norm call on a tiny CPU tensor: fastbn.batch_norm
against torch.nn.functional.batch_norm, measured alternately (torch.utils.benchmark,
median of several rounds) so that both see the same machine state."""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import fastbn


def median_us(fn, args, rounds, min_run_time):
    times = []
    for _ in range(rounds):
        t = Timer("fn(*args)", globals={"fn": fn, "args": args}).blocked_autorange(min_run_time=min_run_time)
        times.append(t.median * 1e6)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(prog="python benchmarks/host_overhead.py", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(2, 3)
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    print(f"threads={torch.get_num_threads()}  input (2, 3) float32, weight/bias requiring grad")
    print(f"{'case':<26}{'torch us':>10}{'fastbn us':>11}{'ratio':>8}")
    for training in (True, False):
        for grad in (True, False):
            results = {}
            with torch.set_grad_enabled(grad):
                for _ in range(args.rounds):
                    for name, fn in (("torch", F.batch_norm), ("fastbn", fastbn.batch_norm)):
                        call_args = (x, torch.zeros(3), torch.ones(3), w, b, training, 0.1, 1e-5)
                        results.setdefault(name, []).append(median_us(fn, call_args, 1, args.min_run_time))
            t, f = statistics.median(results["torch"]), statistics.median(results["fastbn"])
            case = f"{'train' if training else 'eval'}{'' if grad else ' (no_grad)'}"
            print(f"{case:<26}{t:>10.2f}{f:>11.2f}{f / t:>8.2f}")


if __name__ == "__main__":
    main()
