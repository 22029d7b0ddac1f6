"""Experimental: working, tested ops that nothing in the library calls yet (issue 16: unwired kernels leave the
kernels/ layer and the README's capability list until they are wired).

- `masked_sgd`: the CGE mask's coordinates as one flat index list, the finite differences scattered into `.grad`,
  and torch.optim.SGD's update restricted to the mask or dense (cuda, triton, cpu, torch backends; kernels in
  kernels/triton/cge_sparse.py and csrc/). Meant for `zokernels train resnet20`; not wired there yet.
- `cuda_graph`: CUDA-graph capture of a fixed-shape query loop (`query_runner`, `GraphedQuery`); never run on a GPU.

Nothing in the library imports this package (tests/test_architecture.py gives it the programs' layer, so only
apps/, cli.py and info.py could); wiring an op means moving it into kernels/ and calling it from its layer.
Import the modules explicitly (`from zokernels.experimental.masked_sgd import MaskedSGD`): `import zokernels`
does not load them."""
