"""Training: the trainer (stages, clipping, best-on-validation, exact resume), DDP,
fine-tuning the CNN, and run folders (seeds, resume, evaluate-and-save)."""
