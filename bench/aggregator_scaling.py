"""Forward time and peak memory of the slide aggregator (1024 -> 512 TransMIL, fp32, CPU) vs N patches.

Each N runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own; the peak
reported is the forward's, above the resident size once the model and the input exist.
Prints T(64k)/T(4k) (goal <= 17; linear scaling is 16), the forward peak at 100k (goal <= 3 GB) and
the whole process's peak at 200k (goal <= 4 GB: model, input features and forward together).

    python bench/aggregator_scaling.py [--sizes 1000 4000 16000 64000 100000 200000] [--repeats 2]
"""

import argparse
import json
import subprocess
import sys


def _one(n: int, repeats: int) -> dict:
    import resource
    import time

    import torch

    from mstar_hf import MStarSlideAggregator, MStarSlideAggregatorConfig

    torch.manual_seed(0)
    model = MStarSlideAggregator(MStarSlideAggregatorConfig()).eval()
    features = torch.randn(1, n, 1024)
    with torch.inference_mode():
        model(features[:, :256])  # warm-up of kernels, not of this size
    rss_kb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
    times, cpu = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            start, cpu0 = time.perf_counter(), time.process_time()
            out = model(features)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.patch_embeds.shape == (1, n, 512)
    return {"n": n, "seconds": min(times), "cpu_seconds": min(cpu), "peak_forward_gb": max(0, peak_kb - rss_kb) / 1024**2,
            "peak_total_gb": peak_kb / 1024**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000, 100000, 200000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.repeats)))
        return
    rows = {}
    print(f"{'N':>8} {'seconds':>9} {'forward peak GB':>16} {'process peak GB':>16}")
    for n in args.sizes:
        result = subprocess.run([sys.executable, __file__, "--one", str(n), "--repeats", str(args.repeats)],
                                capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows[n] = row
        print(f"{n:>8} {row['seconds']:>9.3f} {row['peak_forward_gb']:>16.2f} {row['peak_total_gb']:>16.2f}", flush=True)
    if 4000 in rows and 64000 in rows:
        ratio = rows[64000]["seconds"] / rows[4000]["seconds"]
        # CPU time too: on a machine shared with other jobs the wall-clock ratio carries their load
        cpu_ratio = rows[64000]["cpu_seconds"] / rows[4000]["cpu_seconds"]
        print(f"CPU-time T(64k)/T(4k) = {cpu_ratio:.1f}")
        print(f"T(64k)/T(4k) = {ratio:.1f} (goal <= 17; linear = 16) -> {'MET' if ratio <= 17 else 'MISSED'}")
    if 100000 in rows:
        peak = rows[100000]["peak_forward_gb"]
        print(f"peak forward memory at 100k = {peak:.2f} GB (goal <= 3 GB) -> {'MET' if peak <= 3 else 'MISSED'}")
    if 200000 in rows:
        peak = rows[200000]["peak_total_gb"]
        print(f"process peak memory at 200k = {peak:.2f} GB (forward {rows[200000]['peak_forward_gb']:.2f}; goal <= 4 GB) "
              f"-> {'MET' if peak <= 4 else 'MISSED'}")


if __name__ == "__main__":
    main()
