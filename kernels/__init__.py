"""Hand-written Triton kernels, each beside its plain-PyTorch reference.

Imported as ``llm_engine.kernels``. Nothing here knows about models, configs or
engines: only torch and triton. Choosing between a kernel and its reference is
``llm_engine.ops``'s job; the names here always run the Triton kernel.
"""
