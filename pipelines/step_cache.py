"""Step caching (DeepCache): reuse the UNet's deep features between sampling steps, opt-in per request.

Every `cache_interval`-th step runs the whole UNet; the steps between run only its shallowest down and up
blocks and take the deeper blocks' output from the last full step (Ma et al., "DeepCache", CVPR 2024; the
`DeepCache` package's helper, which wraps the UNet's block forwards). The wrapping lasts for one sampling call
and is undone after it, so the cached model is never left changed.
"""

from __future__ import annotations

import logging

from .toolbox import PipelineWrapper

log = logging.getLogger(__name__)


class StepCachePipeline(PipelineWrapper):
    """A pipeline whose call runs with DeepCache on its UNet; everything else is the wrapped pipeline's."""

    def __call__(self, *args, **kwargs):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=self._pipe)
        # Branch 0: only the first down block's first layer and the matching up layer run on cached steps
        # (the setting the paper's speed-ups are quoted for).
        helper.set_params(cache_interval=self._cache_interval, cache_branch_id=0)
        helper.enable()
        try:
            return self._pipe(*args, **kwargs)
        finally:
            helper.disable()


def with_step_cache(pipe, cache_interval: int | None):
    """`pipe`, or `pipe` whose call reuses deep UNet features every `cache_interval` steps (None or 1: off).
    A UNet that is not diffusers' UNet2DConditionModel layout (down/mid/up blocks) runs uncached."""
    if not cache_interval or cache_interval <= 1:
        return pipe
    unet = getattr(pipe, "unet", None)
    if not all(hasattr(unet, name) for name in ("down_blocks", "mid_block", "up_blocks")):
        log.warning("step caching needs a UNet with down, mid and up blocks; this one runs uncached")
        return pipe
    return StepCachePipeline(pipe, cache_interval=cache_interval)
