"""Evaluation: recall@K and ranks from embeddings (metrics), the paper's protocols over a
split (protocols), and the compiled order-similarity kernel."""

# The evaluation protocols (fnemm.eval.protocols): named here, where the CLI's parsers can
# read them without loading torch.
PROTOCOLS = ("auto", "all", "1k", "5fold", "5k")
