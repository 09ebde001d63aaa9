"""``tessera serve``: an OpenAI-compatible HTTP service for a job's model, on Ray Serve, until SIGTERM/SIGINT.

Ray is embedded unless ``--address``/``--cluster`` or ``$RAY_ADDRESS`` names
a cluster (as under ``ray job submit -- tessera serve job.yaml`` and in the
scripts of ``tessera slurm render --serve``). The API key comes from
``$TESSERA_API_KEY`` or ``--api-key-file`` (never a flag: ``ps`` shows
flags to every user); it is required when ``--host`` is not a loopback
address. On SIGTERM or SIGINT the server stops gracefully: the application
is deleted (engine, workers, placement group), Serve stopped if it was
started here, and an embedded Ray shut down with all its processes.
Exit codes: 0 after a clean stop, 2 for a job or option that cannot work
(checked before anything starts), 1 when starting failed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    from tessera.launch.commands.run import add_job_flags

    parser = subparsers.add_parser(
        "serve",
        help="serve a job's model over an OpenAI-compatible HTTP API (Ray Serve) until stopped",
        description="Start an OpenAI-compatible HTTP service (/v1/completions, /v1/chat/completions, "
        "/v1/images/generations, /v1/models, /health, /metrics) for the job's model and run until "
        "SIGTERM or Ctrl-C. Binds 127.0.0.1 unless --host says otherwise; any other address needs an API key "
        "($TESSERA_API_KEY or --api-key-file).",
        epilog="examples:\n"
        "  tessera serve --model tiny-moe:qwen3_moe --plan ep=2\n"
        "  tessera serve job.yaml --port 8000\n"
        "  TESSERA_API_KEY=$(cat key) tessera serve job.yaml --host 0.0.0.0\n"
        "  ray job submit --address http://HEAD:8265 -- tessera serve job.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", nargs="?", help="YAML job file (its model, plan and engine options)")
    add_job_flags(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--address", dest="cluster", help="a running Ray cluster's GCS address HOST:PORT (as --cluster)")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    group.add_argument("--api-key-file", help="file whose first line is the API key (mode 0600); default "
                       "$TESSERA_API_KEY")
    group.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint folder)")
    group.add_argument("--max-waiting", type=int, default=256,
                       help="requests that may wait to start before new ones get 429 (default 256)")
    group.add_argument("--retry-after", type=float, default=1.0, help="seconds a 429 asks clients to wait (default 1)")
    group.add_argument("--max-image-batch", type=int, default=8,
                       help="images one denoising loop may hold: concurrent image requests of one size, step count, "
                       "mode and guidance share it (default 8; 1 runs each request alone)")
    group.add_argument("--image-batching", choices=("exact", "fast"), default="exact",
                       help="exact (default): a batched image has the bits it has alone (one forward per image in "
                       "the shared loop); fast: one forward per batch, equal to fp32 rounding (faster on GPUs)")
    group.add_argument("--app-name", default="tessera", help="the Ray Serve application name (default tessera)")
    group.add_argument("--ready-timeout", type=float, default=900.0,
                       help="seconds starting (loading the model included) may take (default 900)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from tessera.launch.commands.run import jobfile_from_args
    from tessera.launch.serve.options import ServeOptions, read_api_key
    from tessera.launch.serve.server import start

    jobfile = jobfile_from_args(args)
    options = ServeOptions(host=args.host, port=args.port, api_key=read_api_key(args.api_key_file),
                           served_model_name=args.served_model_name, max_waiting=args.max_waiting,
                           retry_after_s=args.retry_after, app_name=args.app_name, ready_timeout_s=args.ready_timeout,
                           max_image_batch=args.max_image_batch, image_batching=args.image_batching)
    stop = threading.Event()
    handle = start(jobfile, options)  # a SIGTERM meanwhile ends it through Ray's own handler (SystemExit, cleaned up)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        auth = " (API key required)" if options.api_key else ""
        where = "" if options.host in ("127.0.0.1", "localhost") else f", listening on {options.host}:{options.port}"
        print(f"tessera serve: {handle.model} ({handle.kind}) ready at {handle.url}{where}{auth}", flush=True)
        print(f"tessera serve: try `curl {handle.url}/v1/models`; stop with Ctrl-C or SIGTERM", flush=True)
        while not stop.wait(1.0):
            pass
        print("tessera serve: stopping", flush=True)
    finally:
        handle.shutdown()
    print("tessera serve: stopped", file=sys.stderr, flush=True)
    return 0
