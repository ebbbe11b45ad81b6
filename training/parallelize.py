"""Activation checkpointing, compilation and FSDP2 for a model's blocks (CLIP's transformer layers, the
UNet's stages): the one place that knows.

The order matters (torchtitan's): checkpointing wraps each block first, so `compile` sees the block and
its recomputation as one graph; `fully_shard` comes last, so its hooks (all-gather before a block,
reduce-scatter after its backward) sit outside the compiled code, and the root is sharded after its blocks
so that it owns only what is left (embeddings, projections, the temperature).
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(model: nn.Module, block_names: list[str]) -> list[nn.Module]:
    """Modules whose class name is one of `block_names` (a model's `_no_split_modules` layer)."""
    return [m for m in model.modules() if type(m).__name__ in block_names]


def parallelize(
    model: nn.Module,
    block_names: list[str],
    *,
    checkpointing: bool = False,
    compile: bool = False,
    mesh=None,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    blocks = transformer_blocks(model, block_names)
    if checkpointing:
        # The libraries' own switches: each block recomputes its forward in backward.
        if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
            model.enable_gradient_checkpointing()
        else:  # transformers' GradientCheckpointingLayer
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        for block in blocks:
            block.compile()  # in place: parameter names, hence checkpoints and exports, stay the same
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            if param_dtype
            else MixedPrecisionPolicy()
        )
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The root stays unsharded after forward: backward needs its parameters (projections, embeddings)
        # first thing, so freeing them only to gather them again would cost an all-gather per step.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model
