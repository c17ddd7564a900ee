"""The request path: sequences, scheduler, model runner, sampler, detokenizer and the engine."""
