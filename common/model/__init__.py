"""The shared model: the classifier on its two encoders (classifier.py), what it takes per clip (inputs.py),
and LoRA with the adapter state that travels (lora.py)."""
