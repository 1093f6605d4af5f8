"""The engine: continuous batching over KV slots (scheduler), stateless sampling, executors,
the static-batch `generate` and the asynchronous front end the HTTP server drives."""
from .generate import GenerationResult, Request, generate, random_prompts, validate_request
from .sampling import SampleSpec, mask_top_k_top_p, sample

__all__ = ["GenerationResult", "Request", "generate", "random_prompts", "validate_request", "SampleSpec",
           "mask_top_k_top_p", "sample"]
