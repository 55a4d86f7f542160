"""Text: tokenized Arrow shards (``text.prepare``), an LSTM classifier (``text.classifier``)
and GPT / LSTM language models (``text.lm``) on Ray Train."""
