"""Tool calling, as OpenAI clients use it and vLLM serves it.

- `parsers`: find tool calls in generated text, in the formats of the model families kvmem loads
  (`hermes`: Qwen2.5's `<tool_call>{json}</tool_call>`; `llama3_json`: Llama 3's bare JSON), plus
  the formats kvmem itself forces with structured outputs for `tool_choice` "required" (a JSON array
  of calls) and a named function (its arguments only). Complete text or a growing prefix of it.
- `streaming`: turns the growing text of one choice into OpenAI's deltas (`content` pieces, and
  `tool_calls[i]` with the id and name first, then `function.arguments` pieces).
- `choice`: what `tool_choice` asks of generation (the structured outputs that enforce it).
"""
