"""Serve a PI0 checkpoint to openpi's clients (openpi_client.WebsocketClientPolicy, examples/libero/main.py).

    python launch/serve.py --checkpoint runs/x/export --port 8000
    python launch/serve.py --checkpoint pi0_libero_pt --tokenizer paligemma/tokenizer.model --device cuda

--checkpoint: a canonical / converted openpi / lerobot / openpi-PyTorch checkpoint directory. Concurrent
clients are micro-batched: requests arriving within --batch-window-ms of each other (up to --max-batch)
run as one forward. `GET /healthz` answers 200 "OK". "serving ... on ws://host:port" is logged only once
the socket listens (openpi-client 0.1.2 does not retry its first connection). --port 0: any free port.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

log = logging.getLogger("serve")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # bad input is one line, like every other entry point's
        print(f"serve error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (see above)")
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json when the checkpoint holds none")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000, openpi's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the first GPU when there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model precision")
    p.add_argument(
        "--guidance",
        default="1.0",
        help="CFG weight w, or 'none' for the plain model (default 1.0, as training and launch/eval.py)",
    )
    p.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=8, help="requests per forward (1: no batching)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a request waits for company")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a port (0..65535)")
    if args.max_batch < 1 or args.batch_window_ms < 0:
        p.error("--max-batch must be >= 1 and --batch-window-ms >= 0")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        p.error("--num-inference-steps must be >= 1")
    args.guidance = _guidance(p, args.guidance)
    return args


def _guidance(p: _Parser, text: str) -> float | None:
    from ript_ds.eval.checkpoint import EvalError, parse_guidance  # launch/eval.py's rule, one place

    try:
        return parse_guidance(text)
    except EvalError as err:
        p.error(str(err))


def _check_port(host: str, port: int) -> None:
    """Fail before loading a multi-GB model when the address cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server binds
            probe.bind((host, port))
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch

    from ript_ds.serving import load_policy
    from ript_ds.serving.server import ServerOptions, serve

    try:
        if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} but no CUDA GPU is visible")
        _check_port(args.host, args.port)
        # PolicyLoadError and ConventionError are ValueErrors, each one line naming the fix.
        policy = load_policy(
            args.checkpoint,
            args.tokenizer,
            args.device,
            dtype=args.dtype,
            guidance=args.guidance,
            num_steps=args.num_inference_steps,
        )
    except ValueError as err:
        print(f"serve error: {err}", file=sys.stderr)
        return 2
    # Configured only now, so a bad checkpoint stays one line (loading logs at INFO on success).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # our server logs each connection once
    log.info(
        "loaded %s on %s (%s, horizon %d, guidance %s)",
        args.checkpoint,
        policy.device,
        args.dtype,
        policy.horizon,
        args.guidance,
    )
    options = ServerOptions(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)

    def ready(server) -> None:
        log.info("serving %s on ws://%s:%d", args.checkpoint, args.host, server.port)

    try:
        serve(policy, args.host, args.port, options, on_ready=ready)
    except OSError as err:  # lost the port between the probe and the bind
        print(
            f"serve error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
