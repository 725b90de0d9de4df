"""cosserve's benchmark suite: workloads W1-W4 against two bare-grpcio floors (threaded and aio)
and in-process torch.

Run `python -m bench [w1 w2 w3 w4] [--quick] [--device cpu] [--json out.json]`; docs/performance.md
has results, bench/gpu.sh runs the GPU checks.
"""

__all__: list[str] = []
