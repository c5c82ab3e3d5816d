"""`jaxinfer serve` takes the engine flags vLLM users type, under vLLM's names as well as ours."""

import pytest

from jaxinfer import cli
from jaxinfer.config import ConfigError, EngineConfig
from jaxinfer.server.run import DEFAULT_MODEL_NAME


def engine_of(*flags: str) -> EngineConfig:
    return cli.serve_engine(cli.build_parser().parse_args(["serve", *flags]))


def test_vllms_names_set_the_same_fields_as_ours():
    ours = engine_of("--page-size", "32", "--num-pages", "500", "--prefill-chunk", "512")
    theirs = engine_of("--block-size", "32", "--num-gpu-blocks-override", "500", "--max-num-batched-tokens", "512")
    assert ours == theirs
    assert (ours.page_size, ours.num_pages, ours.prefill_chunk) == (32, 500, 512)


def test_kv_cache_memory_flags_reach_the_engine():
    engine = engine_of("--gpu-memory-utilization", "0.6", "--kv-cache-memory-bytes", str(3 << 30),
                       "--disable-hybrid-kv-cache-manager")
    assert (engine.gpu_memory_utilization, engine.kv_cache_memory) == (0.6, 3 << 30)
    assert engine.disable_hybrid_kv_cache_manager
    defaults = engine_of()
    assert (defaults.gpu_memory_utilization, defaults.kv_cache_memory) == (0.9, None)
    assert not defaults.disable_hybrid_kv_cache_manager


def test_a_utilization_out_of_range_is_refused_by_name():
    with pytest.raises(ConfigError, match="gpu_memory_utilization must be in"):
        engine_of("--gpu-memory-utilization", "1.5")


def test_bench_offline_takes_the_hybrid_flag(monkeypatch):
    from jaxinfer import bench
    seen = []
    monkeypatch.setattr(bench, "offline", lambda options: seen.append(options.engine))
    for flags in (["--disable-hybrid-kv-cache-manager"], []):
        assert cli.main(["bench", "offline", "--baselines", *flags]) in (0, None)
    assert [engine.disable_hybrid_kv_cache_manager for engine in seen] == [True, False]


def test_several_served_model_names_as_vllm_takes_them():
    """vLLM's `--served-model-name A B`: requests may name either; answers carry the first."""
    config = cli.serve_config(cli.build_parser().parse_args(["serve", "--served-model-name", "tiny", "alias"]))
    assert (config.served_model_name, config.model_aliases) == ("tiny", ("alias",))
    one = cli.serve_config(cli.build_parser().parse_args(["serve"]))
    assert (one.served_model_name, one.model_aliases) == (DEFAULT_MODEL_NAME, ())


def test_quantization_flags_reach_the_engine(monkeypatch):
    """vLLM's `--quantization fp8` / `-q fp8`, on serve, bench offline and bench profile."""
    assert engine_of("--quantization", "fp8").quantization == engine_of("-q", "fp8").quantization == "fp8"
    assert engine_of().quantization is None
    from jaxinfer import bench
    from jaxinfer.planner import profile
    seen = []
    monkeypatch.setattr(bench, "offline", lambda options: seen.append(options.engine))
    assert cli.main(["bench", "offline", "--baselines", "-q", "fp8"]) in (0, None)
    monkeypatch.setattr(profile, "profile", lambda model, engine, slots, repeats: seen.append(engine) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["bench", "profile", "--output", "/dev/null", "-q", "fp8"])
    assert [engine.quantization for engine in seen] == ["fp8", "fp8"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--quantization", "awq"])


def test_vllms_other_serving_flags():
    """--max-logprobs caps what a request may ask for (the sampler's 20 at most); --trust-remote-code and
    --enforce-eager are accepted and change nothing (no checkpoint code runs; every step is compiled)."""
    args = cli.build_parser().parse_args(["serve", "--max-logprobs", "5", "--trust-remote-code", "--enforce-eager",
                                          "--uvicorn-log-level", "error"])
    assert cli.serve_config(args).max_logprobs == 5 and args.uvicorn_log_level == "error"
    assert cli.serve_engine(args) == engine_of()
    assert cli.serve_config(cli.build_parser().parse_args(["serve"])).max_logprobs == 20
    with pytest.raises(ValueError, match=r"max_logprobs must be in \[0, 20\]"):
        cli.serve_config(cli.build_parser().parse_args(["serve", "--max-logprobs", "21"]))


def test_a_server_with_max_logprobs_refuses_more():
    import httpx

    from jaxinfer.server.app import ServerConfig
    from live_server import LiveServer
    live = LiveServer(ServerConfig(max_logprobs=2))
    try:
        body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
        ok = httpx.post(f"{live.url}/v1/completions", json={**body, "logprobs": 2}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
        refused = httpx.post(f"{live.url}/v1/completions", json={**body, "logprobs": 3}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
        assert "[0, 2]" in refused.json()["error"]["message"]
    finally:
        live.close()
