"""cosserve's benchmark suite: workloads W1-W4 against a bare-grpcio floor and in-process torch.

Run `python -m bench [w1 w2 w3 w4] [--quick] [--json out.json]`; docs/performance.md has results.
"""

__all__: list[str] = []
