"""A stand-in for the mindformers package: only what
``mindformers/tools/ckpt_transform`` (copied from mindformers' wheel by
ci/mindformers.sh) imports, for a one-process, one-node job."""
