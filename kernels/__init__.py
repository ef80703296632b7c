"""Triton kernels, shipped as pyengine.kernels; importable from other stacks.
Nothing here is imported by `import pyengine`: each op module imports triton itself."""
