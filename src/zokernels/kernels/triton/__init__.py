"""Triton kernels and their launchers (`name_triton`). Importing a module here needs the triton package; the
dispatching launchers in zokernels/kernels import them lazily so that `import zokernels` never needs triton."""
