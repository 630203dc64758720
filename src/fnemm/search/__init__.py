"""Search with a trained model: galleries (exact, or an index folder), vector indexes,
index folders, the HTTP service and its page (web/), embeddings written to files."""
