"""Tools and tool messages reach the chat template exactly as transformers passes them."""

from __future__ import annotations

import json

from kvmem.server.protocol import ChatCompletionRequest
from kvmem.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_tool_conversation_renders_as_transformers_does(qwen_tools_dir):
    from transformers import AutoTokenizer

    openai_messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    body = ChatCompletionRequest.model_validate_json(json.dumps({"messages": openai_messages, "tools": TOOLS}))
    ours = Tokenizer.from_hf_dir(qwen_tools_dir).apply_chat_template(body.conversation(), True,
                                                                     tools=body.template_tools())
    # transformers gets the arguments as an object, which is what templates expect.
    hf_messages = json.loads(json.dumps(openai_messages))
    hf_messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    del hf_messages[1]["content"]
    expected = AutoTokenizer.from_pretrained(qwen_tools_dir).apply_chat_template(
        hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert ours == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in ours
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in ours and '"name": "get_weather"' in ours
