"""The `jaxinfer` command: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from jaxinfer import bench_serve, router
from jaxinfer import eval as evaluation
from jaxinfer.config import (CONTROL_FLOWS, DTYPES, HF_OVERRIDES_HELP, KV_CACHE_DTYPES, QUANTIZATION_FLAGS,
                             ConfigError, EngineConfig, json_object_arg)
from jaxinfer.engine.request import MAX_LOGPROBS
from jaxinfer.model.safetensors_io import CheckpointError
from jaxinfer.planner import cli as planner_cli
from jaxinfer.server.reasoning import PARSERS as REASONING_PARSERS
from jaxinfer.server.tool_calls import PARSERS as TOOL_CALL_PARSERS
from jaxinfer.tokenizer import load_chat_template

BASELINES = ("static", "hf", "bare")  # of `bench offline`
MODEL_HELP = "a Hugging Face checkpoint directory, a `jaxinfer convert` output, or a config .json " \
             "(random weights); default: the embedded model"
HYBRID_HELP = "as vLLM's: the sliding-window layers of models that mix them with global ones (Gemma 2/3, OLMo 3) " \
              "keep the whole context's KV too, instead of their window's alone"
PACK_HELP = "prompts whose prefill chunks one step may pack into its token budget (default: 8 with the Pallas " \
            "kernels, else 1; above 1 every chunk runs at the whole budget)"
CONTROL_HELP = "static: decode rounds and sampler passes fixed per compiled step, so a GPU step runs without " \
               "host syncs (more step shapes); dynamic: chosen on device. Default: static on GPU"
KV_DTYPE_HELP = "the KV cache's dtype: auto (the model's), or narrower to hold more tokens: bfloat16, fp8 (= " \
                "fp8_e4m3: twice bfloat16's tokens, unscaled as vLLM's default) or fp8_e5m2"
QUANTIZATION_HELP = "fp8: hold a 16/32-bit checkpoint's projections as float8_e4m3fn with float32 scales (one per " \
                    "output and 128 inputs), about half their memory; an fp8 checkpoint is served as fp8 without it"
BUCKETS_HELP = "row counts a decode-only step may shrink to when fewer slots decode, per data shard (each a " \
               "compiled shape). Default: on CPU 8, 16, ... below the slots (up to 32 slots), elsewhere none"


def _generate(args) -> None:
    from jaxinfer.llm import LLM, SamplingParams
    engine = EngineConfig(max_slots=min(len(args.prompts), 64), dtype=args.dtype, hf_overrides=args.hf_overrides)
    llm = LLM(args.model, engine)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    start, compiling = time.perf_counter(), llm.runner.compile_seconds
    outputs = llm.generate(args.prompts, params)
    compiling = llm.runner.compile_seconds - compiling
    running = time.perf_counter() - start - compiling
    for out in outputs:
        print(out.prompt + out.outputs[0].text)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"[{generated} tokens in {running:.2f}s ({generated / running:.1f} tokens/s) after "
          f"{llm.runner.num_compiles} compiles in {compiling:.1f}s]", file=sys.stderr)


def _convert(args) -> None:
    import jax

    from jaxinfer.model.checkpoint import find_model, load_config, load_params, save_orbax
    from jaxinfer.model.weights import online_fp8, quantized_params
    from jaxinfer.sharding import make_mesh
    source = find_model(args.model)
    if source.weights is None:
        raise CheckpointError("convert needs a checkpoint directory with weights (--model PATH)")
    cfg = load_config(source)
    dtype = EngineConfig(dtype=args.dtype).resolve(cfg, jax.default_backend()).dtype
    start = time.perf_counter()
    mesh = make_mesh()
    params = load_params(source, cfg, dtype, mesh)
    quantization = None  # a quantization_config for the output's config.json (an fp8 checkpoint's has one)
    if args.quantization == "fp8" and cfg.weight_quant is None:
        cfg = online_fp8(cfg)
        params = quantized_params(params, cfg, mesh)
        quantization = cfg.to_hf()["quantization_config"]
    loaded = time.perf_counter()
    save_orbax(params, dtype, source.directory, Path(args.output), quantization)
    fp8 = " with fp8 projections" if cfg.weight_quant else ""
    print(f"read {source.weights} in {loaded - start:.2f}s; wrote orbax checkpoint ({dtype}{fp8}) to "
          f"{args.output} in {time.perf_counter() - loaded:.2f}s")


def _buckets(args) -> tuple[int, ...] | None:
    return None if args.decode_buckets is None else tuple(args.decode_buckets)


def _bench_offline(args) -> None:
    from jaxinfer.bench import OfflineOptions, offline
    engine = EngineConfig(max_slots=args.max_slots, prefill_chunk=args.prefill_chunk,
                          decode_steps=args.decode_steps, page_size=args.page_size, dtype=args.dtype,
                          kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len, seed=args.seed,
                          hf_overrides=args.hf_overrides, quantization=args.quantization,
                          disable_hybrid_kv_cache_manager=args.disable_hybrid_kv_cache_manager,
                          max_prefill_seqs=args.max_prefill_seqs,
                          control_flow=args.control_flow, decode_buckets=_buckets(args))
    offline(OfflineOptions(args.model, engine, args.num_requests, tuple(args.input_len_range),
                           tuple(args.output_len_range), args.seed, tuple(args.baselines),
                           tuple(args.hf_batch_sizes), args.repeats, args.json))


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="throughput benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    off = kinds.add_parser("offline", help="a batch of random-token requests through the engine and baselines",
                           description="Random token-id prompts with ignore_eos, all submitted at once, through "
                                       "the engine; then (a) static batching on the same engine, (b) Hugging Face "
                                       "transformers generate on the same weights, (c) the bare jitted step "
                                       "(the ceiling). Compile time is reported apart and excluded.")
    off.add_argument("--model", default="configs/smollm2-135m.json", help=MODEL_HELP.replace(
        "default: the embedded model", "default: configs/smollm2-135m.json (random weights)"))
    off.add_argument("--num-requests", type=int, default=128)
    off.add_argument("--input-len-range", type=int, nargs=2, default=[32, 512], metavar=("LOW", "HIGH"),
                     help="prompt lengths, uniform, inclusive")
    off.add_argument("--output-len-range", type=int, nargs=2, default=[32, 256], metavar=("LOW", "HIGH"),
                     help="output lengths, uniform, inclusive")
    off.add_argument("--max-slots", type=int, default=32,
                     help="engine slots (default 32: on CPU a 32-slot decode step costs less per token than 8)")
    off.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    off.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps)
    off.add_argument("--max-prefill-seqs", type=int, default=None, help=PACK_HELP)
    off.add_argument("--control-flow", choices=CONTROL_FLOWS, default="auto", help=CONTROL_HELP)
    off.add_argument("--decode-buckets", type=int, nargs="+", default=None, metavar="ROWS", help=BUCKETS_HELP)
    off.add_argument("--page-size", type=int, default=EngineConfig.page_size)
    off.add_argument("--max-model-len", type=int, default=None,
                     help="default: the longest prompt plus the longest output")
    off.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    off.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_DTYPE_HELP)
    off.add_argument("--quantization", "-q", choices=QUANTIZATION_FLAGS, default=None, help=QUANTIZATION_HELP)
    off.add_argument("--disable-hybrid-kv-cache-manager", action="store_true", help=HYBRID_HELP)
    off.add_argument("--hf-overrides", type=json_object_arg, default=None, help=HF_OVERRIDES_HELP)
    off.add_argument("--seed", type=int, default=0, help="the workload's seed")
    off.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                     help="static: static batching on the same engine; hf: transformers generate; bare: the "
                          "bare jitted step (the ceiling). Default: all; none: the engine alone")
    off.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 16, 32],
                     help="transformers batch sizes to try; the full run uses the fastest")
    off.add_argument("--repeats", type=int, default=10,
                     help="timed runs per bare step shape, in each of the two ceiling measurements")
    off.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    off.set_defaults(run=_bench_offline)
    bench_serve.add_parser(kinds)
    planner_cli.add_profile_parser(kinds)


def _tool_call_parser(args) -> str | None:
    """The parser for tool_choice "auto", checked as vLLM checks its flags (before anything loads)."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (one of: "
                         f"{', '.join(TOOL_CALL_PARSERS)}), as in vLLM")
    if args.tool_call_parser is not None and not args.enable_auto_tool_choice:
        logging.getLogger("jaxinfer.serve").warning(
            "--tool-call-parser %s is unused without --enable-auto-tool-choice: tool_choice 'auto' stays 400",
            args.tool_call_parser)
    return args.tool_call_parser if args.enable_auto_tool_choice else None


def _sampling_defaults(args) -> dict:
    from jaxinfer.model.checkpoint import generation_defaults
    defaults = generation_defaults(args.generation_config, args.model)
    if defaults:
        logging.getLogger("jaxinfer.serve").warning(
            "default sampling parameters come from the model's generation config (a request's own win): %s; "
            "--generation-config vllm leaves them out", defaults)
    return defaults


def serve_engine(args) -> EngineConfig:
    """The engine `jaxinfer serve`'s flags ask for."""
    return EngineConfig(max_slots=args.max_num_seqs, max_model_len=args.max_model_len, dtype=args.dtype,
                        kv_cache_dtype=args.kv_cache_dtype, page_size=args.page_size, hf_overrides=args.hf_overrides,
                        quantization=args.quantization, prefill_chunk=args.prefill_chunk, num_pages=args.num_pages,
                        kv_cache_memory=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
                        decode_steps=args.decode_steps, enable_prefix_caching=args.enable_prefix_caching,
                        disable_hybrid_kv_cache_manager=args.disable_hybrid_kv_cache_manager,
                        max_prefill_seqs=args.max_prefill_seqs, control_flow=args.control_flow, seed=args.seed,
                        mesh_shape=(args.data_parallel_size, args.tensor_parallel_size),
                        decode_buckets=_buckets(args))


def serve_config(args, tool_call_parser: str | None = None):
    """The server `jaxinfer serve`'s flags ask for (a ServerConfig)."""
    from jaxinfer.server.app import ServerConfig
    from jaxinfer.server.run import DEFAULT_MODEL_NAME
    names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
    return ServerConfig(served_model_name=names[0], model_aliases=tuple(names[1:]), model_path=args.model,
                        api_key=args.api_key, max_queue=args.max_queue, max_n=args.max_n,
                        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                        trust_request_chat_template=args.trust_request_chat_template,
                        chat_template=load_chat_template(args.chat_template) if args.chat_template else None,
                        tool_call_parser=tool_call_parser, reasoning_parser=args.reasoning_parser,
                        structured_outputs_config=args.structured_outputs_config,
                        sampling_defaults=_sampling_defaults(args), max_logprobs=args.max_logprobs)


def _serve(args) -> int:
    from jaxinfer.server.run import serve
    tool_call_parser = _tool_call_parser(args)
    logging.getLogger("jaxinfer.serve").setLevel(logging.INFO)  # the start-up phases and their times
    engine = serve_engine(args)
    if args.num_processes > 1:
        from jaxinfer import distributed
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        if args.process_id != 0:  # process 0 serves HTTP and schedules; the others repeat its device calls
            from jaxinfer.llm import load_engine
            distributed.follow(load_engine(args.model, engine, warmup=not args.skip_warmup).executor.runner)
            return 0
    return serve(args.model, engine, serve_config(args, tool_call_parser), args.host, args.port,
                 warmup=not args.skip_warmup,
                 log_level=args.uvicorn_log_level or ("info" if args.verbose else "warning"),
                 step_log=args.step_log)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server",
                           description="Serves /v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
                                       "/detokenize, /health, /metrics and /version. /health is 503 until the model "
                                       "is loaded and warmed up. SIGTERM drains in-flight requests, then exits 0.")
    serve.add_argument("--model", default=None, help=MODEL_HELP)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="the name(s) clients may send (default: --model); answers carry the first, as vLLM's")
    serve.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $JAXINFER_API_KEY)")
    serve.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_slots, help="decode slots")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="sequences that may wait beyond the running ones; more are answered 429")
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--max-n", type=int, default=16, help="the largest n a request may ask for")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    serve.add_argument("--page-size", "--block-size", type=int, default=EngineConfig.page_size,
                       help="tokens per KV page (--block-size: vLLM's name)")
    serve.add_argument("--num-pages", "--num-gpu-blocks-override", type=int, default=None,
                       help="KV pages (default: from the memory budget; --num-gpu-blocks-override: vLLM's name)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization,
                       help="on a GPU, the share of device memory the weights and the KV cache may take")
    serve.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                       help="bytes for the KV cache, whatever the device has (vLLM's; default: measured on a GPU, "
                            "1 GiB on a CPU)")
    serve.add_argument("--prefill-chunk", "--max-num-batched-tokens", type=int, default=EngineConfig.prefill_chunk,
                       help="prompt tokens prefilled per step (--max-num-batched-tokens: vLLM's name, whose budget "
                            "also counts decode tokens; here every running slot decodes beside it)")
    serve.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps)
    serve.add_argument("--max-prefill-seqs", type=int, default=None, help=PACK_HELP)
    serve.add_argument("--control-flow", choices=CONTROL_FLOWS, default="auto", help=CONTROL_HELP)
    serve.add_argument("--decode-buckets", type=int, nargs="+", default=None, metavar="ROWS", help=BUCKETS_HELP)
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    serve.add_argument("--disable-hybrid-kv-cache-manager", action="store_true", help=HYBRID_HELP)
    serve.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    serve.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_DTYPE_HELP)
    serve.add_argument("--quantization", "-q", choices=QUANTIZATION_FLAGS, default=None, help=QUANTIZATION_HELP)
    serve.add_argument("--hf-overrides", type=json_object_arg, default=None, help=HF_OVERRIDES_HELP)
    serve.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                       help="where default sampling parameters (temperature, top_p, top_k, min_p, "
                            "repetition_penalty; max_new_tokens, the default max_tokens of chat requests) come from, "
                            "as vLLM's: auto, the model's generation_config.json; "
                            "vllm, none (OpenAI's defaults); or a folder holding a generation_config.json")
    serve.add_argument("--seed", type=int, default=0, help="seeds requests that send none")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may take to finish after SIGTERM")
    serve.add_argument("--chat-template", default=None, metavar="PATH|TEMPLATE",
                       help="the chat template every chat request renders with unless it sends its own, instead of "
                            "the checkpoint's: a file, or the template on one line (as vLLM's)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="render a chat_template sent with a request (it runs code nobody here reviewed); "
                            "without this such requests are 400")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="answer tool_choice 'auto' (the default when tools are sent) by parsing the model's "
                            "tool calls out of its output; needs --tool-call-parser. Without it such requests are "
                            "400, as in vLLM")
    serve.add_argument("--tool-call-parser", choices=list(TOOL_CALL_PARSERS), default=None,
                       help="the model's tool-call format: hermes (Qwen 2.5/3, Hermes: <tool_call>...</tool_call>), "
                            "llama3_json (Llama 3.1/3.2 JSON calls), mistral ([TOOL_CALLS][...]), pythonic "
                            "(Llama 3.2, ToolACE: [name(key=value), ...]), llama4_pythonic (the same, Llama 4's tags), "
                            "qwen3_coder (Qwen3-Coder: <function=NAME><parameter=P>...), seed_oss (the same, "
                            "Seed-OSS's <seed:tool_call> tags), glm45 and glm47 (GLM-4.5 to 4.7: <tool_call>NAME "
                            "<arg_key>K</arg_key><arg_value>V</arg_value>...), ernie45 (ERNIE 4.5: JSON in "
                            "<tool_call> tags), deepseek_v3, deepseek_v31 (DeepSeek-V3/R1 and V3.1's "
                            "<｜tool▁call▁begin｜> calls), kimi_k2 (Kimi K2's, their ids kept), openai (gpt-oss's "
                            "harmony calls)")
    serve.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS), default=None,
                       help="return a reasoning model's thinking (<think>...</think>) as the chat message's "
                            "reasoning (and reasoning_content), apart from its content: deepseek_r1 (the template "
                            "opens the block: DeepSeek-R1, QwQ), qwen3 (an answer that starts with <think>), glm45 "
                            "(GLM-4.5 to 4.7, as qwen3), seed_oss (Seed-OSS's <seed:think>...</seed:think>, as "
                            "deepseek_r1), ernie45 (ERNIE 4.5 thinking: as deepseek_r1, the content inside "
                            "<response>), openai_gptoss (gpt-oss's harmony channels)")
    serve.add_argument("--structured-outputs-config", type=json_object_arg, default={}, metavar="JSON",
                       help='defaults for every structured request, as vLLM\'s: {"disable_any_whitespace": true} '
                            '(compact JSON: a small model may otherwise write whitespace until max_tokens), '
                            '"disable_additional_properties" (objects take only the properties they name)')
    serve.add_argument("--skip-warmup", action="store_true", help="compile step shapes on first use instead")
    serve.add_argument("--step-log", default=None, metavar="PATH",
                       help="write each step's shape and timings here (JSON lines) for `bench profile --from-log`")
    serve.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS,
                       help=f"the most logprobs / top_logprobs / prompt_logprobs a request may ask for (at most "
                            f"{MAX_LOGPROBS}, the default)")
    serve.add_argument("--uvicorn-log-level", choices=("critical", "error", "warning", "info", "debug", "trace"),
                       default=None, help="uvicorn's log level (default: warning; info with -v)")
    vllm = serve.add_argument_group("vLLM's flags that change nothing here (accepted so its command lines run)")
    vllm.add_argument("--trust-remote-code", action="store_true",
                      help="jaxinfer runs no code from a checkpoint: every architecture is its own")
    vllm.add_argument("--enforce-eager", action="store_true",
                      help="there is no eager mode to force: every step shape is compiled by XLA")
    mesh = serve.add_argument_group("devices and processes (scripts/launch_mesh.py sets the process flags)")
    mesh.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                      help="data shards: slots and KV pages split between them, each request on one")
    mesh.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                      help="devices each model is split over (heads, KV heads, MLP, vocabulary)")
    mesh.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0's JAX coordinator")
    mesh.add_argument("--num-processes", type=int, default=1)
    mesh.add_argument("--process-id", type=int, default=0)
    serve.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference on JAX")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and compiling")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the text")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    gen.add_argument("--hf-overrides", type=json_object_arg, default=None, help=HF_OVERRIDES_HELP)
    gen.set_defaults(run=_generate)

    conv = sub.add_parser("convert", help="write a Hugging Face checkpoint as an orbax checkpoint")
    conv.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    conv.add_argument("--output", required=True, help="directory to write")
    conv.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto")
    conv.add_argument("--quantization", "-q", choices=QUANTIZATION_FLAGS, default=None,
                      help="write the projections in fp8 (as serve's --quantization fp8 makes them at load): the "
                           "output restores without the unquantized weights' memory peak")
    conv.set_defaults(run=_convert)

    _add_serve(sub)
    router.add_parser(sub)
    evaluation.add_parser(sub)
    _add_bench(sub)
    planner_cli.add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except (ConfigError, CheckpointError, ValueError, MemoryError) as e:
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
