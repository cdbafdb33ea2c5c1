"""The design's "Custom SGLang configuration" snippet, with our import path."""

from art_sglang import SGLangBackend, SGLangConfig  # the design: from art.sglang_backend import ...

# Custom SGLang configuration
backend = SGLangBackend(
    sglang_config=SGLangConfig(
        mem_fraction_static=0.85,
        weight_sync_method="lora",  # or "disk", "restart"
        flush_cache_on_sync=False,  # Keep cache warm
        tensor_parallel_size=1,
    )
)
print(backend.sglang_config)
print(backend.placement)
