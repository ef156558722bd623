"""The pieces model files are composed of, one concept per file: weights a checkpoint fills
(weight.py), linear layers and how their weights are applied (linear.py), norms, rotary embeddings,
paged attention, activations, and the vocabulary embedding / LM head."""
