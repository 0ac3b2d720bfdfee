"""tinker: a local drop-in engine for the Tinker training API.

The public clients (ServiceClient, TrainingClient, SamplingClient) arrive with
the API layer; this package currently provides the engine underneath them:
model resolution and loading (tinker._models), tokenizers (tinker._tokenizer)
and the C extension (tinker._C).
"""

__title__ = "tinker"
__version__ = "0.1.0"
