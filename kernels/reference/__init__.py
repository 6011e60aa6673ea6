"""The plain-PyTorch half of each kernel family: its references and the input checks
they share with the Triton launchers.

These modules import only torch, never Triton, so the CPU paths of ``llm_engine.ops``
(which run the references) load without Triton. Each ``llm_engine.kernels.<family>``
module re-exports its family's references, so ``norm_kernels.rms_norm_reference`` and
``llm_engine.kernels.reference.layer_norm.rms_norm_reference`` are the same function.
"""
