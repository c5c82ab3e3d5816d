"""The planner: cost model, simulated engine, recommendation (host only, no JAX), and its two commands."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.planner.costmodel import FEATURES, CostModel, StepShape, fit, relative_errors, shape_of
from jaxinfer.planner.plan import Candidate, Outcome, engine_grid, parse_slo, recommend, search
from jaxinfer.planner.simulator import Trace, simulate

CONSTANT = CostModel({**dict.fromkeys(FEATURES, 0.0), "dispatch": 0.1}, "reference")  # every dispatch 100 ms


def _engine(**kw) -> EngineConfig:
    return EngineConfig(**{**dict(max_slots=2, page_size=4, prefill_chunk=16, max_model_len=64, num_pages=64,
                                  decode_steps=1), **kw})


def _trace(arrivals, prompts, outputs) -> Trace:
    return Trace(np.array(arrivals, float), np.array(prompts), np.array(outputs))


@pytest.mark.parametrize("k, tpot, e2el", [(1, 0.1, 0.3), (4, 0.05, 0.2)])
def test_constant_step_time_alone(k, tpot, e2el):
    """One request, 3 tokens: its prefill dispatch ends at 0.1 (first token); with k=1 one decode dispatch
    per token (0.2, 0.3); with k=4 both remaining tokens come from one dispatch ending at 0.2."""
    result = simulate(CONSTANT, _engine(decode_steps=k), _trace([0.0], [8], [3]))
    np.testing.assert_allclose(result.ttft, [0.1])
    np.testing.assert_allclose(result.tpot_all, [tpot])
    np.testing.assert_allclose(result.e2el, [e2el])


def test_constant_step_time_queueing():
    """One slot, two requests (0 s and 0.05 s), 2 tokens each. The second is taken when the loop next
    drains arrivals (0.1, after reading the prefill), waits for the slot until the first finishes (read
    at 0.2), then prefills (0.2-0.3) and decodes (0.3-0.4)."""
    result = simulate(CONSTANT, _engine(max_slots=1), _trace([0.0, 0.05], [8, 8], [2, 2]))
    np.testing.assert_allclose(result.ttft, [0.1, 0.25])
    np.testing.assert_allclose(result.tpot_all, [0.1, 0.1])
    np.testing.assert_allclose(result.e2el, [0.2, 0.35])
    assert result.steps == 4 and result.preemptions == 0


def test_packed_prompts_share_a_prefill_dispatch():
    """Two 6-token prompts arriving together in two slots: one per step, the second's first token waits a
    dispatch; packed (as a GPU engine does by default), both come from the first."""
    trace = _trace([0.0, 0.0], [6, 6], [2, 2])
    np.testing.assert_allclose(simulate(CONSTANT, _engine(), trace).ttft, [0.1, 0.2])
    np.testing.assert_allclose(simulate(CONSTANT, _engine(max_prefill_seqs=2), trace).ttft, [0.1, 0.1])


def test_host_time_is_paid_per_dispatch():
    model = CostModel(CONSTANT.coefficients, "reference", host_seconds=0.01, host_seconds_per_slot=0.005)
    result = simulate(model, _engine(), _trace([0.0], [8], [1]))
    np.testing.assert_allclose(result.ttft, [0.01 + 2 * 0.005 + 0.1])


def test_simulation_is_deterministic():
    model = CostModel({**dict.fromkeys(FEATURES, 0.0), "dispatch": 0.003, "chunk_token": 1e-4, "round": 0.01,
                       "round_slot": 1e-3, "round_attention": 1e-7}, "reference", host_seconds=0.002)
    trace = Trace.generate(6.0, 300, 36, 20, 0.5, seed=3)  # prompts of 18-54 tokens: all fit in 64
    engine = _engine(max_slots=8, num_pages=40, decode_steps=4)  # few pages: preemptions happen
    first, second = simulate(model, engine, trace), simulate(model, engine, trace)
    assert first.preemptions > 0
    for name in ("ttft", "tpot_all", "e2el", "kv_usage"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.simulated == len(trace)
    assert (first.output_lens == np.minimum(trace.output_lens, 64 - trace.prompt_lens)).all()  # capped as the engine
    assert first.refused == 0


def test_long_stationary_trace_stops_once_settled():
    model = CostModel({**dict.fromkeys(FEATURES, 0.0), "dispatch": 0.01, "round": 0.01}, "reference")
    trace = Trace.generate(20.0, 200_000, 16, 8, 0.5, seed=0)
    result = simulate(model, _engine(max_slots=8, num_pages=200, decode_steps=2), trace)
    assert 4000 <= result.simulated < len(trace)
    assert result.trace_requests == len(trace)
    assert (result.output_lens == trace.output_lens[:result.simulated]).all()


def test_fit_recovers_known_constants():
    truth = {"dispatch": 2e-3, "chunk": 1e-3, "chunk_token": 3e-4, "chunk_attention": 0.0, "chunk_alone": 0.02,
             "chunk_alone_token": 1e-4, "round": 0.05,
             "round_slot": 2e-3, "round_attention": 4e-7, "round_table": 0.0}
    model = CostModel(truth, "reference")
    shapes = [StepShape(B, C, S, R, 0) for B in (8, 16, 32) for C, S in ((0, 64), (0, 256), (16, 64), (128, 256))
              for R in ((1, 4) if C == 0 else (0, 1))]
    seconds = [model.step_seconds(s) for s in shapes]
    fitted = fit(shapes, seconds, "reference")
    for name in FEATURES:
        assert fitted[name] == pytest.approx(truth[name], rel=1e-6, abs=1e-12), name
    assert np.abs(relative_errors(CostModel(fitted, "reference"), shapes, seconds)).max() < 1e-9


def test_page_loop_fit_tells_the_kv_read_from_the_table_width():
    """The page loop (xla) pays per token of context and per slot of table width: the profile's shapes
    (full rounds at two widths, one round a quarter busy) separate the two, and a sparse round is priced
    by both."""
    from jaxinfer.planner.profile import _plans
    truth = {**dict.fromkeys(FEATURES, 0.0), "dispatch": 1e-3, "chunk_token": 2e-4, "round": 0.02,
             "round_slot": 1e-3, "round_attention": 3e-6, "round_table": 5e-7}
    model = CostModel(truth, "xla")
    engine = _engine(max_slots=8, max_model_len=128, num_pages=300, decode_steps=2)
    shapes = [shape_of(plan, engine) for _, plan in _plans(engine)]
    fitted = CostModel(fit(shapes, [model.step_seconds(s) for s in shapes], "xla"), "xla")
    sparse = StepShape(slots=8, chunk=0, width=128, rounds=1, context=40)
    assert fitted.step_seconds(sparse) == pytest.approx(model.step_seconds(sparse), rel=1e-6)
    assert fitted.coefficients["round_table"] == pytest.approx(5e-7, rel=1e-6)


def test_a_chunk_is_priced_by_the_keys_it_attends_to():
    """A chunk at the start of its prompt beside a slot that reaches far: the reference attention pays the
    whole table width, the page loop and the Pallas kernel only the chunk's own keys."""
    from jaxinfer.planner.profile import mixed_plan
    engine = _engine(max_slots=4, max_model_len=128, num_pages=300, prefill_chunk=32)
    plan = mixed_plan(engine, np.arange(16), 0)
    plan.positions[0], plan.steps[0] = 100, 1  # a decoding slot at position 100: the table spans 7 pages
    plan.block_tables[0, 0, :7] = np.arange(200, 207)
    shape = shape_of(plan, engine)
    assert (shape.chunk, shape.width, shape.chunk_keys) == (16, 128, 16)
    coefficients = {**dict.fromkeys(FEATURES, 0.0), "chunk_attention": 1e-6}
    assert CostModel(coefficients, "reference").step_seconds(shape) == pytest.approx(16 * 128 * 1e-6)
    for backend in ("xla", "pallas"):
        assert CostModel(coefficients, backend).step_seconds(shape) == pytest.approx(16 * 16 * 1e-6)


def test_step_log_gives_back_the_step_times_the_engine_saw(tmp_path):
    """The real engine loop over a simulated device (known step times, 2 ms of host work per dispatch):
    the log yields each step's device time and the host time, and the fit reproduces the step times."""
    from jaxinfer.engine.engine import Engine
    from jaxinfer.engine.request import SamplingParams
    from jaxinfer.planner.simulator import SimClock, SimulatedExecutor
    from jaxinfer.planner.steplog import StepLog, fit_from_logs, read_log
    truth = CostModel({**dict.fromkeys(FEATURES, 0.0), "dispatch": 0.004, "chunk_token": 2e-4, "round": 0.02,
                       "round_slot": 1e-3, "round_attention": 1e-6}, "xla")
    engine_cfg = _engine(max_slots=4, max_model_len=128, prefill_chunk=32, decode_steps=2, attention_backend="xla")
    clock = SimClock()
    device = SimulatedExecutor(truth, engine_cfg, clock)

    class HostWork:  # the host's share of a dispatch, on the simulated clock
        def dispatch(self, plan):
            clock.now += 0.002
            return device.dispatch(plan)

        def collect(self, handle):
            return device.collect(handle)

    header = {"layers": 2, "hidden": 64, "dtype_bytes": 4, "kv_bytes_per_token": 512, "device": "simulated"}
    log = StepLog(HostWork(), engine_cfg, tmp_path / "steps.jsonl", header, clock=lambda: clock.now)
    engine = Engine(engine_cfg, log, vocab_size=100)
    rng = np.random.default_rng(0)
    for _ in range(12):
        engine.add_request([1] * int(rng.integers(1, 80)), SamplingParams(max_tokens=int(rng.integers(1, 30)),
                                                                          ignore_eos=True), stream=False)
    while engine.has_work():
        engine.step()
    log.close()
    logged = read_log(tmp_path / "steps.jsonl")
    assert logged.records == engine.scheduler.counters.steps == len(logged.shapes)  # every collect waited
    np.testing.assert_allclose(logged.seconds, [truth.step_seconds(s) for s in logged.shapes], rtol=1e-9)
    assert np.median(logged.host) == pytest.approx(0.002)
    fitted = fit_from_logs([tmp_path / "steps.jsonl"])
    assert np.abs(relative_errors(fitted, logged.shapes, logged.seconds)).max() < 1e-6
    assert fitted.host_seconds == pytest.approx(0.002) and fitted.notes["source"] == "step log"
    cli = [sys.executable, "-m", "jaxinfer.cli", "bench", "profile", "--from-log", str(tmp_path / "steps.jsonl"),
           "--output", str(tmp_path / "profile.json")]
    assert "fit: median relative error" in subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert CostModel.load(tmp_path / "profile.json").coefficients == fitted.coefficients


def test_attention_work_follows_the_backend():
    """A decode round's attention term: the table width for every row (reference), each row's own context
    (the page loop and Pallas)."""
    from jaxinfer.planner.costmodel import features
    shape = StepShape(slots=4, chunk=0, width=64, rounds=1, context=10)
    work = {backend: features(shape, backend)[FEATURES.index("round_attention")] for backend in ("reference", "xla", "pallas")}
    assert work == {"reference": 4 * 64, "xla": 10, "pallas": 10}
    from jaxinfer.bench import decode_plan
    from jaxinfer.planner.costmodel import shape_of
    engine = _engine(max_slots=3)
    measured = shape_of(decode_plan(engine, batch=2, context=9, k=1), engine)  # 2 rows at position 9: 10 tokens
    assert (measured.context, measured.width) == (20, engine.pages_per_seq * 4)


@pytest.mark.parametrize("control_flow, rounds", [("dynamic", [2, 1, 0, 1]), ("static", [4, 4, 0, 1])])
def test_static_control_flow_costs_the_rounds_it_compiles(control_flow, rounds):
    """Static control flow runs every decode-only dispatch at `decode_steps` rounds, a chunk that samples
    nothing with none and one beside a chunk: the cost model counts what runs, not what the plan asked."""
    from jaxinfer.bench import decode_plan, prefill_plan
    engine = _engine(max_slots=3, decode_steps=4, control_flow=control_flow)
    sampled = prefill_plan(engine, [1, 2, 3])
    sampled.num_steps = 1
    plans = [decode_plan(engine, batch=2, context=9, k=2), decode_plan(engine, batch=2, context=9, k=1),
             prefill_plan(engine, [1, 2, 3]), sampled]
    assert [shape_of(plan, engine).rounds for plan in plans] == rounds


def test_tensor_parallel_bandwidth_model():
    """T devices: device terms / T, the fixed dispatch cost once, plus 2 ring all-reduces per layer."""
    from jaxinfer.planner.costmodel import ALLREDUCE_LATENCY, LINK_BANDWIDTH
    model = CostModel({**dict.fromkeys(FEATURES, 0.0), "dispatch": 1e-3, "round": 8e-3}, "pallas", layers=2,
                      hidden=1024, dtype_bytes=2)
    shape = StepShape(slots=4, chunk=0, width=64, rounds=1, context=10)
    comm = 2 * 2 * (ALLREDUCE_LATENCY + 4 * 1024 * 2 * 2 * (2 - 1) / 2 / LINK_BANDWIDTH)
    assert model.step_seconds(shape, 2) == pytest.approx(1e-3 + 8e-3 / 2 + comm)
    assert model.step_seconds(shape, 1) == pytest.approx(9e-3)


def _outcome(cost: float, meets: bool, ttft: float = 100.0) -> Outcome:
    summary = {"latency_ms": {"ttft": {50: ttft, 90: ttft, 99: ttft}}}
    return Outcome(Candidate(_engine()), summary, meets, cost, cost, np.zeros((0, 2)))


def test_recommend_is_the_cheapest_that_meets_the_slo():
    outcomes = [_outcome(1.0, False), _outcome(3.0, True), _outcome(2.0, True, ttft=300), _outcome(2.0, True, 200)]
    assert recommend(outcomes, 90) is outcomes[3]  # 1.0 misses; of the two at 2.0 the lower TTFT
    assert recommend([_outcome(1.0, False)], 90) is None


def test_search_adds_replicas_until_the_slo_holds_and_recommends_the_cheapest():
    model = CostModel({**dict.fromkeys(FEATURES, 0.0), "dispatch": 0.004, "chunk_token": 2e-4, "round": 0.02,
                       "round_slot": 1e-3}, "reference", host_seconds=0.001)
    trace = Trace.generate(20.0, 400, 48, 12, 0.5, seed=1)
    engines = engine_grid(_engine(max_model_len=128, prefill_chunk=64), [4, 16], [16], [64], [1, 4], [None])
    slo = {"ttft": 400.0, "tpot": 120.0}
    outcomes = search(model, engines, [1], trace, slo, 90, 2.0, 6, progress=lambda line: None)
    best = recommend(outcomes, 90)
    meeting = [o for o in outcomes if o.meets_slo]
    assert best is not None and best.cost_per_million_tokens == min(o.cost_per_million_tokens for o in meeting)
    assert any(not o.meets_slo for o in outcomes)  # the search had to add replicas somewhere
    for o in outcomes:  # the verdict is the simulated percentiles against the limits
        lat = o.summary["latency_ms"]
        assert o.meets_slo == (lat["ttft"][90] <= 400 and lat["tpot"][90] <= 120)


@pytest.mark.parametrize("text, error", [("ttft", "KEY:MILLISECONDS"), ("itl:5", "KEY:MILLISECONDS"),
                                         ("ttft:-1", "positive"), ("", "at least one")])
def test_bad_slo_is_refused(text, error):
    with pytest.raises(ValueError, match=error):
        parse_slo(text)


def test_trace_from_bench_serve_results_and_jsonl(tmp_path):
    result = {"requests": [{"send_time": 2.5, "prompt_tokens": 30, "output_tokens": 4, "error": None},
                           {"send_time": 1.0, "prompt_tokens": 10, "output_tokens": 2, "error": None},
                           {"send_time": 3.0, "prompt_tokens": 10, "output_tokens": 0, "error": "HTTP 500"}]}
    (tmp_path / "r.json").write_text(json.dumps(result))
    trace = Trace.load(tmp_path / "r.json")
    assert trace.arrivals.tolist() == [0.0, 1.5] and trace.prompt_lens.tolist() == [10, 30]
    (tmp_path / "t.jsonl").write_text('{"arrival": 0, "prompt_len": 5, "output_len": 3}\n\n'
                                      '{"arrival": 0.5, "prompt_len": 7}\n')
    with pytest.raises(ValueError, match="line 3: need a JSON object with arrival"):
        Trace.load(tmp_path / "t.jsonl")


def _cli(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "jaxinfer.cli", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_profile_then_plan_commands(tmp_path):
    """The two commands end to end on the embedded model: a profile with every coefficient fitted from
    measurements, then a plan over a generated trace that names its recommendation."""
    profile = tmp_path / "profile.json"
    out = _cli("bench", "profile", "--model", "jaxinfer/assets/default", "--slots", "4", "--prefill-chunk", "16",
               "--max-model-len", "128", "--repeats", "1", "--output", str(profile))
    assert "fit: median relative error" in out
    saved = json.loads(profile.read_text())
    # decode at 2 widths x (2 round counts + once a quarter busy), the chunk bucket mixed at 2 widths and alone
    assert len(saved["notes"]["samples"]) == 9 and all(c >= 0 for c in saved["coefficients"].values())
    out = _cli("plan", "--profile", str(profile), "--slo", "ttft:60000,tpot:60000", "--request-rate", "2",
               "--num-requests", "40", "--input-len", "20", "--output-len", "6", "--decode-steps", "1", "4",
               "--json", str(tmp_path / "plan.json"))
    assert "recommended: slots" in out and "1 device(s)" in out  # a loose SLO: one device suffices
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["recommended"] and all("kv_usage_over_time" in o for o in plan["outcomes"])


def test_overload_is_detected_and_misses_the_slo():
    """Ten times more traffic than the replica serves: the queue grows at every look, the run stops early,
    and the candidate misses any SLO (its latencies are lower bounds)."""
    from jaxinfer.planner.plan import evaluate
    trace = Trace.generate(100.0, 1_000_000, 8, 4, seed=2)
    outcome = evaluate(CONSTANT, Candidate(_engine(max_slots=4, num_pages=64)), trace, {"ttft": 1e9}, 90, 1.0)
    assert outcome.summary["overloaded"] and not outcome.meets_slo
    assert outcome.summary["simulated_requests"] < 20_000


@pytest.mark.parametrize("content, error", [(None, "cannot read"), ("dir", "cannot read"),
                                            ('{"arrival": 0, "prompt_len": null, "output_len": 3}', "line 1"),
                                            ('{"arrival": "x", "prompt_len": 5, "output_len": 3}', "line 1"),
                                            ('{"arrival": 0, "prompt_len": 5.5, "output_len": 3}', "line 1")])
def test_unreadable_trace_is_a_clear_error(tmp_path, content, error):
    path = tmp_path / "trace.jsonl"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content + "\n")
    with pytest.raises(ValueError, match=error) as caught:
        Trace.load(path)
    assert str(path) in str(caught.value)


def test_bench_serve_result_without_token_counts_is_a_clear_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"requests": [{"send_time": 1.0, "prompt_tokens": None, "output_tokens": 3,
                                              "error": None}]}))
    with pytest.raises(ValueError, match="request 0"):
        Trace.load(path)


def test_generated_trace_is_the_one_bench_serve_sends():
    """Same seed, same requests: bench serve's schedule (a gap before the first, the last at n / rate) and its
    random dataset's lengths (token-id prompts)."""
    from jaxinfer.bench_serve import TokenSpace, arrival_times, random_dataset
    n, rate = 50, 4.0
    trace = Trace.generate(rate, n, 32, 8, 0.5, burstiness=0.7, seed=5)
    np.testing.assert_array_equal(trace.arrivals, arrival_times(n, rate, 0.7, np.random.default_rng([5, 1])))
    assert trace.arrivals[0] > 0 and trace.arrivals[-1] == pytest.approx(n / rate)
    requests = random_dataset(n, 32, 8, 0.5, TokenSpace(0, 1000), np.random.default_rng([5, 0]))
    assert trace.prompt_lens.tolist() == [r.prompt_len for r in requests]
    assert trace.output_lens.tolist() == [r.output_len for r in requests]
    for burstiness in (0.0, -1.0):
        with pytest.raises(ValueError, match="burstiness"):
            Trace.generate(rate, n, 32, 8, burstiness=burstiness)


def test_a_repeated_slo_key_is_refused():
    with pytest.raises(ValueError, match="once"):
        parse_slo("ttft:1000,ttft:5")


@pytest.mark.parametrize("tp, replicas, price, error", [([0], 4, 1.0, "tensor-parallel"),
                                                        ([1, -2], 4, 1.0, "tensor-parallel"),
                                                        ([1], 0, 1.0, "max-replicas"),
                                                        ([1], 4, 0.0, "price"), ([1], 4, -1.0, "price")])
def test_search_refuses_a_meaningless_grid(tp, replicas, price, error):
    with pytest.raises(ValueError, match=error):
        search(CONSTANT, [_engine()], tp, _trace([0.0], [8], [2]), {"ttft": 1e3}, 90, price, replicas,
               progress=lambda line: None)


def test_one_token_outputs_meet_a_tpot_limit():
    """No request has a TPOT (bench serve counts a one-token request's as 0): a TPOT limit is met, not
    missed for ever up to --max-replicas."""
    from jaxinfer.planner.plan import evaluate
    outcome = evaluate(CONSTANT, Candidate(_engine()), _trace([0.0, 1.0], [8, 8], [1, 1]), {"tpot": 50.0}, 90, 1.0)
    assert outcome.meets_slo


def test_equal_cost_candidates_tie_on_ttft():
    """Candidates on as many devices cost the same per hour; their cost per million output tokens differs only
    by when the simulation's last request drained, which must not outrank the lower TTFT."""
    slower, faster = _outcome(1.0, True, ttft=300), _outcome(1.0, True, ttft=100)
    slower.cost_per_million_tokens, faster.cost_per_million_tokens = 2.00, 2.01
    assert recommend([slower, faster], 90) is faster
    assert recommend([_outcome(2.0, True, ttft=10), slower], 90) is slower  # fewer devices first


def test_replica_throughput_when_the_trace_does_not_split_evenly():
    """4 requests over 3 replicas: the simulated replica takes requests 0 and 3, half the trace, not a third."""
    from jaxinfer.planner.plan import evaluate, replica_share
    trace = _trace([0.0, 1.0, 2.0, 3.0], [8] * 4, [3] * 4)
    outcome = evaluate(CONSTANT, Candidate(_engine(), replicas=3), trace, {"ttft": 1e3}, 90, 1.0)
    share = simulate(CONSTANT, _engine(), replica_share(trace, 3))
    tokens_per_hour = outcome.cost_per_hour / outcome.cost_per_million_tokens * 1e6
    assert tokens_per_hour == pytest.approx(share.output_throughput * 2 * 3600)


def test_plan_warns_outside_the_profile_and_refuses_a_trace_it_cannot_serve():
    from jaxinfer.planner.plan import check
    model = CostModel(CONSTANT.coefficients, "reference", notes={"slots": [2, 4],
                                                                 "engine": dict(max_model_len=64, prefill_chunk=16)})
    trace = _trace([0.0, 1.0], [8, 100], [2, 2])
    assert check(model, [_engine(max_slots=4)], _trace([0.0], [8], [2])) == []
    notes = check(model, [_engine(max_slots=16, max_model_len=256, prefill_chunk=64)], trace)
    assert any("16 slots" in n for n in notes) and any("256" in n for n in notes) and any("64" in n for n in notes)
    assert any("1 of 2 requests" in n for n in check(model, [_engine()], trace))  # 100 tokens: no room in 64
    with pytest.raises(ValueError, match="every request"):
        check(model, [_engine()], _trace([0.0], [100], [2]))


@pytest.mark.parametrize("device, platform", [("1 cpu device(s) (cpu); host x, 2 cores", "cpu"),
                                              ("8 gpu device(s) (NVIDIA H200); host x", "gpu"),
                                              ("4 tpu device(s) (TPU v5 lite); host x", "tpu")])
def test_profile_platform(device, platform):
    from jaxinfer.planner.plan import profile_platform
    assert profile_platform(CostModel(CONSTANT.coefficients, "xla", device=device)) == platform


def test_profile_without_a_platform_is_a_clear_error():
    from jaxinfer.planner.plan import profile_platform
    with pytest.raises(ValueError, match="platform"):
        profile_platform(CostModel(CONSTANT.coefficients, "xla", device="simulated"))


def test_plan_command_errors_are_messages_not_tracebacks(tmp_path, capsys):
    from jaxinfer.cli import main
    profile = tmp_path / "profile.json"
    CostModel(CONSTANT.coefficients, "reference", device="1 cpu device(s) (cpu); host x").save(profile)
    base = ["plan", "--profile", str(profile), "--slo", "ttft:1000", "--num-requests", "4"]
    for extra in (["--trace", str(tmp_path / "missing.jsonl")], ["--burstiness", "0"], ["--tensor-parallel", "0"]):
        assert main(base + extra) == 2
        assert "jaxinfer plan: error:" in capsys.readouterr().err


def test_a_profile_of_a_model_with_kv_cache_groups_plans_with_them(tmp_path):
    """A profile of a hybrid model (12 layers, pages of 2: one global group and five sliding ones) plans with the
    same groups: the simulated engines page each group apart, and the CPU's KV budget buys pages of 2 layers,
    6 times as many as of 12."""
    from jaxinfer.cli import main
    per_token = 2 * 12 * 8 * 128 * 4  # K and V, 12 layers, 8 KV heads of 128, float32: the CPU's 1 GiB binds
    grouped = CostModel(CONSTANT.coefficients, "reference", layers=12, kv_bytes_per_token=per_token,
                        kv_layers_per_page=2, device="1 cpu device(s) (cpu); host x",
                        notes={"engine": {"kv_windows": [None, 8, 8, 8, 8, 8], "max_model_len": 4096}})
    ungrouped = CostModel({}, "xla", layers=12, kv_bytes_per_token=per_token)
    assert grouped.kv_page_bytes_per_token * 6 == per_token == ungrouped.kv_page_bytes_per_token
    grouped.save(tmp_path / "profile.json")
    assert main(["plan", "--profile", str(tmp_path / "profile.json"), "--slo", "ttft:100000", "--num-requests", "4",
                 "--input-len", "20", "--output-len", "30", "--json", str(tmp_path / "plan.json")]) == 0
    (outcome, *_) = json.loads((tmp_path / "plan.json").read_text())["outcomes"]
    engine = outcome["engine"]
    assert engine["kv_windows"] == [None, 8, 8, 8, 8, 8]
    full = 4 * engine["max_slots"] * EngineConfig(**{**engine, "kv_windows": (None, 8, 8, 8, 8, 8),
                                                      "mesh_shape": (1, 1)}).sequence_pages(4096) + 1
    assert engine["num_pages"] == (1 << 30) // (per_token // 6 * engine["page_size"]) < full
