"""The corpus pipeline: raw text to a content-addressed, tokenised dataset —
cleaning, exact and near dedup, quality filters, BPE tokenizer training,
tokenising, sharding to Parquet, publishing to storage, and the training reader.
"""
