"""Grammar compile time for structured output and tool calling (no model, no HTTP).

    .venv/bin/python benchmarks/grammar_compile.py [--model smollm2-135m] [--repeats 5]

With the model's tokenizer (its llguidance view built once first, and timed),
compiles, each cold (a new manager, so no cache):

- each of the 10 tools of a typical agent alone, as a forced call (tool_choice named);
- all 10 at once, as tool_choice "required" (one grammar with ten %json alternatives);
- the bench serve JSON schema (tokenloom bench serve --response-format json-schema);

then the same specs again on the warm manager (a cache hit). Printed: the median of
--repeats runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenloom.bench.serve import BENCH_JSON_SCHEMA
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.engine.tool_prompt import FunctionSpec
from tokenloom.entrypoints.openai.tool_parsers import get_tool_parser
from tokenloom.model_files import resolve_model
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured import StructuredOutputManager

STRING = {"type": "string"}


def _obj(required: list[str], **properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": required}


AGENT_TOOLS = [
    FunctionSpec("get_weather", "Current weather", _obj(["city"], city=STRING, unit={"enum": ["c", "f"]})),
    FunctionSpec("search_web", "Web search", _obj(["query"], query=STRING,
                                                  max_results={"type": "integer", "minimum": 1, "maximum": 20})),
    FunctionSpec("read_file", "Read a file", _obj(["path"], path=STRING, offset={"type": "integer", "minimum": 0})),
    FunctionSpec("write_file", "Write a file", _obj(["path", "content"], path=STRING, content=STRING)),
    FunctionSpec("run_shell", "Run a command", _obj(["command"], command=STRING, timeout_s={"type": "number"})),
    FunctionSpec("send_email", "Send an email", _obj(["to", "subject", "body"], to={"type": "array", "items": STRING,
                                                     "minItems": 1}, subject=STRING, body=STRING)),
    FunctionSpec("create_event", "Calendar event", _obj(["title", "start"], title=STRING,
                                                        start={"type": "string", "format": "date-time"},
                                                        attendees={"type": "array", "items": STRING})),
    FunctionSpec("query_db", "SQL query", _obj(["sql"], sql=STRING, params={"type": "array"})),
    FunctionSpec("translate", "Translate text", _obj(["text", "target"], text=STRING,
                                                     target={"enum": ["en", "fr", "de", "es", "ja"]})),
    FunctionSpec("get_stock", "Stock quote", _obj(["symbol"], symbol={"type": "string", "pattern": "^[A-Z]{1,5}$"})),
]


def specs() -> dict[str, list[StructuredOutputsParams]]:
    parser = get_tool_parser("hermes")
    return {
        "one tool (named), each of 10": [StructuredOutputsParams(grammar=parser.call_grammar([t], parallel=False))
                                         for t in AGENT_TOOLS],
        "10 tools (required)": [StructuredOutputsParams(grammar=parser.call_grammar(AGENT_TOOLS, parallel=True))],
        "bench json-schema": [StructuredOutputsParams(json=BENCH_JSON_SCHEMA)],
    }


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_path(resolve_model(args.model))
    vocab = tokenizer.vocab_size
    first = StructuredOutputManager(tokenizer, vocab, tokenizer.eos_token_ids)
    print(f"llguidance tokenizer view: {_time_ms(first.ll_tokenizer):.0f} ms (once per engine)")
    shared = first.ll_tokenizer()
    for name, group in specs().items():
        cold, warm = [], []
        for _ in range(args.repeats):
            manager = StructuredOutputManager(tokenizer, vocab, tokenizer.eos_token_ids)
            manager._ll_tokenizer = shared  # time the compiles, not the tokenizer view
            cold.append(statistics.median(_time_ms(lambda s=s: manager.compile(s).result()) for s in group))
            warm.append(statistics.median(_time_ms(lambda s=s: manager.compile(s).result()) for s in group))
        print(f"{name:32s} cold {statistics.median(cold):7.2f} ms   cached {statistics.median(warm):6.3f} ms")


if __name__ == "__main__":
    main()
