"""Host cost of PyTorch's cuDNN SDPA at a new shape, against the key count (GPU machine).

    python bench/cudnn_build.py > bench/results/cudnn_build.txt
    python bench/cudnn_build.py --queries 1,16,48,256,1024 > OUT.txt   # against queries too

`paged|sdpa` calls `scaled_dot_product_attention` with a float mask; where PyTorch picks its
cuDNN backend, every new (queries, keys) shape builds a cuDNN graph on the host before the
kernel runs, and a continuous-batching step almost always meets a new key count. The
`shape_build` unit prices that build from calls at about T + 1024 keys; this script checks
that the build does not depend on the key count: 8 calls at each of 9 key counts, shuffled
(32 heads of 128, 48 queries, bfloat16), each a shape not seen before, then the same shape
twice in a row (a cache hit). `--queries` repeats the sweep at other query counts (a
continuous-batching step has T queries: one per decoding sequence, a prefill chunk's
tokens), shuffled together, to see whether the build depends on them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, QUERIES = 32, 128, 48
KEYS = (1100, 2000, 3000, 4000, 6000, 10000, 20000, 40000, 80000)


def host_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", default=str(QUERIES),
                        help=f"comma-separated query counts (default {QUERIES})")
    queries = [int(x) for x in parser.parse_args().queries.split(",")]
    dtype, device = torch.bfloat16, "cuda"
    mask = torch.zeros(1, 1, max(queries), max(KEYS) + 128, dtype=dtype, device=device)
    qs = {n: torch.randn(1, HEADS, n, HEAD_DIM, dtype=dtype, device=device) for n in queries}

    def call(n: int, keys: int):
        k = torch.randn(1, HEADS, keys, HEAD_DIM, dtype=dtype, device=device)
        v = torch.randn_like(k)
        return F.scaled_dot_product_attention(qs[n], k, v, attn_mask=mask[:, :, :n, :keys],
                                              scale=HEAD_DIM**-0.5)

    call(queries[0], 1000)
    torch.cuda.synchronize()
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · "
          f"cuDNN {torch.backends.cudnn.version()}")
    plan = [(n, k) for n in queries for k in KEYS for _ in range(8)]
    random.Random(0).shuffle(plan)
    got: dict[tuple[int, int], list[float]] = {(n, k): [] for n in queries for k in KEYS}
    for i, (n, keys) in enumerate(plan):
        got[n, keys].append(host_ms(lambda n=n, k=keys + i: call(n, k)))
    several = len(queries) > 1
    print(("queries " if several else "") + "keys  median_ms  calls_ms (new shape each call)")
    for n in queries:
        for keys in KEYS:
            print((f"{n:7d} " if several else "") + f"{keys:6d} "
                  f"{statistics.median(got[n, keys]):9.1f}  "
                  f"{sorted(round(x, 1) for x in got[n, keys])}")
    pairs = [(host_ms(lambda k=50000 + j: call(queries[0], k)),
              host_ms(lambda k=50000 + j: call(queries[0], k))) for j in range(4)]
    print("same new shape twice (first ms, second ms):",
          [(round(a, 1), round(b, 2)) for a, b in pairs])


if __name__ == "__main__":
    main()
