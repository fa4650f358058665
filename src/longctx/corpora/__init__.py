"""Builders of corpora: raw sources in, documents (``{"id", "text", "structure"}``) out.

- ``arxiv`` + ``latex`` + ``cli``: ``longctx corpus arxiv``, arXiv LaTeX sources -> structure-aware and
  text-only JSONL corpora (untrusted archives read in memory, conversion in capped worker processes);
- ``default_corpus``: the built-in corpus, the standard library's documentation rendered by pydoc.

``longctx.data`` reads what these write (``load_documents``); nothing here imports from it.
"""
