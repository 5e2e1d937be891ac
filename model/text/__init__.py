"""Text conditioning: a tokenizer and a T5 or CLIP text encoder loaded from local directories
(``encoder``), an LRU of prompt embeddings with the empty prompt pinned (``cache``), and the
builders of the small jointly trained encoder (``build``)."""
