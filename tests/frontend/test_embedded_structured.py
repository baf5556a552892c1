"""Structured outputs offline (LLM) and the embeddable AsyncLLM in a plain asyncio program."""

from __future__ import annotations

import asyncio
import json
import os
import re

import jsonschema
import pytest

from frontend import AsyncLLM, SamplingParams, StructuredOutputsParams
from tests.frontend.conftest import ipc_leftovers
from tests.procs import pid_alive

# A shared, loaded machine can take minutes per test: the limit is a safety net only.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,4}-[0-9]{2}"


def test_offline_llm_with_structured_outputs():
    from frontend import LLM

    with LLM(max_num_seqs=8) as llm:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=40,
                structured_outputs=StructuredOutputsParams(json=SCHEMA),
            ),
            SamplingParams(
                temperature=0.9,
                seed=5,
                max_tokens=20,
                structured_outputs=StructuredOutputsParams(regex=REGEX),
            ),
            SamplingParams(
                temperature=0,
                max_tokens=10,
                structured_outputs=StructuredOutputsParams(choice=["red", "green"]),
            ),
            SamplingParams(temperature=0, max_tokens=4),
        ]
        outs = llm.generate(["A user as JSON:", "A code:", "A color:", "Hello"], params, False)
        jsonschema.validate(json.loads(outs[0].outputs[0].text), SCHEMA)
        assert re.fullmatch(REGEX, outs[1].outputs[0].text)
        assert outs[2].outputs[0].text in ("red", "green")
        assert all(o.outputs[0].finish_reason == "stop" for o in outs[:3])
        assert outs[3].outputs[0].finish_reason == "length"
        bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
        with pytest.raises(ValueError, match="structured_outputs.regex"):
            llm.generate("x", bad, use_tqdm=False)
        stats = llm.get_stats()
        assert stats.num_free_blocks == stats.num_usable_blocks
        assert stats.num_running_reqs == stats.num_waiting_reqs == 0


def test_async_llm_embedded_with_concurrent_requests_and_aborts():
    async def consume(engine, prompt, params, rid, stop_after=None):
        lengths, last = [], None
        async for out in engine.generate(prompt, params, rid):
            lengths.append(len(out.outputs[0].token_ids))
            last = out
            if stop_after is not None and len(lengths) >= stop_after:
                break  # leaving the loop aborts the request
        assert lengths == sorted(lengths)  # cumulative outputs only grow
        return last

    async def main() -> int:
        async with AsyncLLM(max_num_seqs=8) as engine:
            # Compact JSON: sampled, a model may otherwise write whitespace to max_tokens.
            json_p = SamplingParams(
                temperature=0.5,
                max_tokens=40,
                structured_outputs=StructuredOutputsParams(
                    json=SCHEMA, disable_any_whitespace=True
                ),
            )
            long_p = SamplingParams(temperature=0.8, max_tokens=200, ignore_eos=True)
            tasks = [
                asyncio.create_task(consume(engine, "A user as JSON:", json_p, "json-1")),
                asyncio.create_task(consume(engine, {"prompt": "Hi"}, json_p, "json-2")),
                asyncio.create_task(consume(engine, "Tell a story", long_p, "aborted")),
                asyncio.create_task(consume(engine, "Once upon", long_p, "left", stop_after=2)),
                asyncio.create_task(
                    consume(engine, [1, 2, 3], SamplingParams(max_tokens=3), "ids")
                ),
            ]
            await asyncio.sleep(0)
            while engine._engine.processor._requests.get("aborted") is None:
                await asyncio.sleep(0.05)
            await engine.abort("aborted")
            results = await asyncio.gather(*tasks)
            for r in results[:2]:
                assert r.outputs[0].finish_reason == "stop"
                jsonschema.validate(json.loads(r.outputs[0].text), SCHEMA)
            assert results[2].outputs[0].finish_reason == "abort"
            assert results[4].outputs[0].finish_reason == "length"
            with pytest.raises(ValueError, match="structured_outputs.choice"):
                async for _ in engine.generate(
                    "x",
                    SamplingParams(structured_outputs=StructuredOutputsParams(choice=[1])),
                    "bad",
                ):
                    pass
            inner = engine._engine
            assert (
                not inner.processor._requests and not inner.processor._samples and not inner._active
            )
            assert await engine.check_health()
            # every KV block back in the pool, as the core reports it
            for _ in range(100):
                if inner.stats.num_free_blocks == inner.stats.num_usable_blocks:
                    break
                await engine.check_health()
                await asyncio.sleep(0.05)
            assert inner.stats.num_free_blocks == inner.stats.num_usable_blocks
            assert inner.stats.num_running_reqs == inner.stats.num_waiting_reqs == 0
            return inner.client.proc.pid

    pid = asyncio.run(main())
    assert not pid_alive(pid)
    # Nothing left by this process or its engine core (other tests may run beside us).
    assert ipc_leftovers([os.getpid(), pid]) == []
