"""Images -> features: the CNNs (cnn/), the Full-Network Embedding's maths (fne), recipes
(which layers, which post-processing), the feature store format (store: one reader,
assembly: one writer), extraction (local, Ray) and encoding new images like a store's."""
