"""Training on the device: what it trains with and how cheaply.

    plan.py           the plan for the device's memory: base precision, batch, threads, prefix cache
    device_model.py   the model built, planned and quantized once per process
    prefix_cache.py   each clip's frozen-prefix states on disk, bounded (LoRA on the last N layers)
"""
