"""An OpenAI-compatible HTTP server over continuous batching with per-request LoRA adapters
(`python -m pyengine.serve`; needs the `serve` extra: fastapi, uvicorn, prometheus_client).

    app = create_app(BatchDecoder(model, slots=8, max_len=2048), tokenizer,
                     model_name="my-model", max_len=2048, max_batch=8)
"""

__all__ = ["create_app"]


def __getattr__(name):
    """create_app on first use, so that the CLI can report a missing `serve` extra itself."""
    if name == "create_app":
        from pyengine.serve.app import create_app
        return create_app
    raise AttributeError(f"module 'pyengine.serve' has no attribute '{name}'")
