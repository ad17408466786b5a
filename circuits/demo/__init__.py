"""The demo world: real facts, a template corpus, a word-level tokenizer, the demo model and its shipped CLT."""
