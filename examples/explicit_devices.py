"""The design's "Explicit Device Configuration" snippet, with our import path.

Constructing a backend starts nothing (the server and trainer start at `model.register(backend)`), so this runs
on any machine and prints where each backend would put the server and the trainer.
"""

from art_sglang import DeviceConfig, SGLangBackend, SGLangConfig  # the design: from art.sglang_backend import ...

# 2-GPU setup
backend = SGLangBackend(
    inference_device=0,  # SGLang on GPU 0
    training_devices=[1],  # Training on GPU 1
)
print("2-GPU setup:", backend.placement)

# 4-GPU setup with multi-GPU training
backend = SGLangBackend(
    inference_device=0,
    training_devices=[1, 2, 3],
)
print("4-GPU setup:", backend.placement)

# The same with a DeviceConfig
backend = SGLangBackend(device_config=DeviceConfig(inference_device=0, training_devices=[1, 2, 3], auto_detect=False))
print("DeviceConfig:", backend.placement)
assert isinstance(backend.sglang_config, SGLangConfig)
