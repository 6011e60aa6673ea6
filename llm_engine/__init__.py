"""llm_engine: a small, fast, kernel-centric LLM engine.

``from llm_engine import LLM, SamplingParams`` is the generation API;
``llm_engine.kernels`` holds the Triton kernels with their references.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelConfig",
           "EngineConfig", "__version__"]

if TYPE_CHECKING:
    from llm_engine.config import ModelConfig
    from llm_engine.engine.config import EngineConfig
    from llm_engine.engine.llm import LLM
    from llm_engine.engine.sequence import CompletionOutput, RequestOutput
    from llm_engine.sampling_params import SamplingParams


def __getattr__(name: str):  # lazy: `import llm_engine.kernels` must not pull in the engine
    if name == "LLM":
        from llm_engine.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from llm_engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from llm_engine.engine import sequence

        return getattr(sequence, name)
    if name == "ModelConfig":
        from llm_engine.config import ModelConfig

        return ModelConfig
    if name == "EngineConfig":
        from llm_engine.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'llm_engine' has no attribute {name!r}")
