"""The joint image-text embedding: config and presets (the paper's Table 1 as its authors
ran it), captions to token ids (text), the model (GRU text side, linear image side), the
hinge losses, the model's inputs per split (inputs) and trained checkpoints on disk."""
