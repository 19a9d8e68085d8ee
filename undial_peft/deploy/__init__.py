"""Deploying adapters: manifest, storage, model card, stacks, exports (peft, SVD, GGUF, vLLM rules)."""
