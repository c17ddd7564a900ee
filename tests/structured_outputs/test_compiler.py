from __future__ import annotations

import threading

import pytest

from kvmem import StructuredOutputsParams
from kvmem.structured_outputs.compiler import GrammarCompiler, new_matcher
from kvmem.tokenizer import Tokenizer
from tests.conftest import tiny_bpe_json


@pytest.fixture
def compiler():
    from tokenizers import Tokenizer as RustTokenizer

    tok = Tokenizer(RustTokenizer.from_str(tiny_bpe_json()), bos_token="<|im_start|>", eos_token="<|im_end|>")
    # A model vocabulary wider than the tokenizer's (padded embedding rows), as real checkpoints have.
    compiler = GrammarCompiler(tok, tok.vocab_size + 13, tok.eos_token_ids)
    yield compiler
    compiler.close()


def walk(compiler: GrammarCompiler, params: StructuredOutputsParams, text: str) -> bool:
    """Whether the grammar accepts `text` (as the tokenizer encodes it) and then the end token."""
    matcher = new_matcher(compiler.compile(params))
    ids = compiler.tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.accept_token(t) for t in ids) and matcher.accept_token(compiler.tokenizer.eos_token_id) \
        and matcher.is_terminated()


def test_each_kind_compiles_and_accepts_what_it_should(compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert walk(compiler, StructuredOutputsParams(json=schema), '{"n": 12}')
    assert not walk(compiler, StructuredOutputsParams(json=schema), '{"m": 12}')
    assert walk(compiler, StructuredOutputsParams(json_object=True), '{"any": [1, "x"]}')
    assert not walk(compiler, StructuredOutputsParams(json_object=True), '[1]')
    assert walk(compiler, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]+"), "123-fox")
    assert not walk(compiler, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]+"), "12-fox")
    assert walk(compiler, StructuredOutputsParams(choice=['say "hi"', "café"]), 'say "hi"')
    assert walk(compiler, StructuredOutputsParams(choice=['say "hi"', "café"]), "café")
    assert not walk(compiler, StructuredOutputsParams(choice=['say "hi"', "café"]), "cafe")
    assert walk(compiler, StructuredOutputsParams(grammar='root ::= "yes" | "no"'), "no")
    assert walk(compiler, StructuredOutputsParams(grammar='start: "yes" | "no"'), "yes")  # Lark syntax
    assert not walk(compiler, StructuredOutputsParams(disable_any_whitespace=True, json_object=True), '{ "a": 1}')


@pytest.mark.parametrize("params, match", [
    (dict(regex="[a-"), r"^structured_outputs\.regex: cannot compile: .*Unclosed"),
    (dict(grammar="root ::= "), r"^structured_outputs\.grammar: cannot compile: .*EBNF"),
    (dict(json={"type": 5}), r"^structured_outputs\.json: cannot compile: .*Type should be a string"),
])
def test_what_does_not_compile_is_a_value_error_naming_the_field(compiler, params, match):
    with pytest.raises(ValueError, match=match):
        compiler.compile(StructuredOutputsParams(**params))


def test_futures_are_cached_and_compiled_off_the_caller_thread(compiler):
    params = StructuredOutputsParams(regex="a+")
    first = compiler.submit(params)
    assert compiler.submit(StructuredOutputsParams(regex="a+")) is first
    threads = []
    original = compiler._compile

    def spy(key):
        threads.append(threading.current_thread().name)
        return original(key)

    compiler._compile = spy
    compiler.compile(StructuredOutputsParams(regex="b+"))
    assert threads and threads[0].startswith("kvmem-grammar")


def test_close_stops_the_worker_and_refuses_more(compiler):
    compiler.compile(StructuredOutputsParams(regex="a+"))
    compiler.close()
    assert not any(t.name.startswith("kvmem-grammar") and t.is_alive() for t in threading.enumerate()
                   if t.name.startswith("kvmem-grammar"))
    with pytest.raises(RuntimeError, match="closed"):
        compiler.submit(StructuredOutputsParams(regex="a+"))
    compiler.close()  # idempotent
