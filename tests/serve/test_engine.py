"""The engine's waiting requests: `max_queue` bounds all of them (also those set aside for a later batch),
cancelled ones never run, and a stopped engine answers every waiting request."""

import asyncio

import pytest
from tiny_server import tiny_parts

from eve_vlm.serve.engine import (
    Engine,
    EngineBusy,
    EngineConfig,
    EngineStopped,
    Failed,
    Request,
    Sampling,
    Sink,
)

GREEDY = Sampling(max_new_tokens=2, temperature=0.0)
SAMPLED = Sampling(max_new_tokens=2, temperature=0.7)


@pytest.fixture(scope="module")
def parts():
    model, processor, _ = tiny_parts()
    return model, processor


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def engine_of(parts, **config) -> Engine:
    model, processor = parts
    return Engine(model, processor.tokenizer, EngineConfig(**config))


def request(loop, sampling=GREEDY) -> Request:
    return Request([5, 6, 7], None, sampling, Sink(loop))


def test_requests_set_aside_count_toward_max_queue(parts, loop):
    engine = engine_of(parts, max_batch_size=4, batch_wait_ms=0, max_queue=2)
    engine.submit(request(loop))
    engine.submit(request(loop, SAMPLED))
    assert len(engine._next_batch()) == 1  # the sampled request does not fit the greedy batch
    assert engine.queued == 1
    engine.submit(request(loop, SAMPLED))
    with pytest.raises(EngineBusy):
        engine.submit(request(loop))
    assert engine.queued == 2


def test_seeded_requests_set_aside_count_toward_max_queue(parts, loop):
    engine = engine_of(parts, max_batch_size=4, batch_wait_ms=0, max_queue=3)
    seeded = Sampling(max_new_tokens=2, temperature=0.7, seed=1)
    engine.submit(request(loop))
    engine.submit(request(loop, seeded))
    engine.submit(request(loop, seeded))
    assert len(engine._next_batch()) == 1  # a seeded request runs alone: both are set aside
    engine.submit(request(loop, seeded))
    with pytest.raises(EngineBusy):
        engine.submit(request(loop, seeded))


def test_reserve_and_release(parts, loop):
    engine = engine_of(parts, max_queue=2)
    engine.reserve()
    engine.reserve()
    with pytest.raises(EngineBusy):
        engine.reserve()
    engine.release()
    engine.submit(request(loop), reserved=True)
    assert engine.queued == 1
    engine.submit(request(loop))
    with pytest.raises(EngineBusy):
        engine.submit(request(loop))


def test_a_cancelled_request_set_aside_never_runs(parts, loop):
    engine = engine_of(parts, max_batch_size=4, batch_wait_ms=0, max_queue=8)
    first, second, third, fourth = (request(loop, s) for s in (GREEDY, SAMPLED, SAMPLED, GREEDY))
    for r in (first, second, third, fourth):
        engine.submit(r)
    assert engine._next_batch() == [first, fourth]
    third.sink.cancel()
    assert engine._next_batch() == [second]
    assert engine.stats.cancelled == 1 and engine.queued == 0


class FailingEngine(Engine):
    """An engine whose thread fails outside a batch's generation."""

    def _run(self, batch):
        raise RuntimeError("a failure outside generation")


def next_event(loop, sink, timeout=10):
    return loop.run_until_complete(asyncio.wait_for(sink.events.get(), timeout))


def test_a_failed_engine_answers_every_waiting_request_and_refuses_new_ones(parts, loop):
    model, processor = parts
    engine = FailingEngine(model, processor.tokenizer, EngineConfig(max_batch_size=1))
    waiting = [request(loop) for _ in range(3)]
    for r in waiting:
        engine.submit(r)
    engine.start()
    for r in waiting:
        assert isinstance(next_event(loop, r.sink), Failed)
    assert not engine.alive and engine.ended
    with pytest.raises(EngineStopped):
        engine.submit(request(loop))
    with pytest.raises(EngineStopped):
        engine.reserve()


def test_stop_answers_the_requests_still_waiting(parts, loop):
    engine = engine_of(parts).start()
    engine.stop()
    assert engine.ended
    with pytest.raises(EngineStopped):
        engine.submit(request(loop))


def test_stop_cut():
    from eve_vlm.serve.engine import stop_cut

    assert stop_cut("red blue w1", ("blue", " w1")) == "red "
    assert stop_cut("red", ("blue",)) is None
    assert stop_cut("red", ()) is None
