"""ExpertLens: what expert sets say about concepts (Fedzechkina et al. 2025), and SemanticLens-style queries.

* :mod:`.similarity` -- concept similarity from expert overlap (Jaccard at tau, AP cosine) and the
  agreement of two similarity structures.
* :mod:`.ratings` -- human word-pair ratings (MEN) and a similarity's alignment with them.
* :mod:`.baselines` -- the similarities experts are compared with (word, contextual, sentence embeddings).
* :mod:`.queries` -- label a neuron, search a concept's experts, audit concepts declared unrelated.
* :mod:`.organisation` -- clustering of concepts and where their experts sit.

Their concept data can be written by a local model: :mod:`steer_experts.writing`.
"""
