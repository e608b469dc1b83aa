"""The policy server (ript_ds/serving/server.py, launch/serve.py) against openpi's own client.

openpi-client 0.1.2 pins numpy < 2, so it runs from a venv of its own (ROOT/.venv/openpi-client, built by
`make install`) in small client subprocesses (CLIENT below); the server runs in this process on
127.0.0.1 with the OS's choice of port, serving the converted tiny openpi checkpoint of
fixtures/openpi_policy_tiny_a. The client sends no noise, so the served policy draws the fixture's noise
for every request (`Wrapped`), which makes its answers comparable with the in-process `policy.infer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script
from openpi_policy_fixture import SCENES, TOKENIZER, convert, load_io, load_prompts, observation
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ript_ds.serving import Policy, load_policy
from ript_ds.serving.msgpack_numpy import packb, unpackb
from ript_ds.serving.server import CLOSE_REASON, PolicyServer, ServerOptions

CLIENT_PYTHON = ROOT / ".venv" / "openpi-client" / "bin" / "python"

CLIENT = r'''
"""openpi's client against a server. argv: mode url args-json obs.npz... ; prints one JSON line."""
import functools, json, sys, threading, time
import numpy as np
import websockets.sync.client
from openpi_client import action_chunk_broker, websocket_client_policy


def load(path):
    data = np.load(path)
    obs = {k.replace("__", "/"): data[k] for k in data.files}
    obs["prompt"] = str(obs["prompt"])
    return obs


def plain(result):
    return {"actions": result["actions"].tolist(), "policy_timing": result["policy_timing"],
            "server_timing": result["server_timing"]}


def infer(url, paths, args):
    client = websocket_client_policy.WebsocketClientPolicy(url)
    return {"metadata": client.get_server_metadata(), "results": [plain(client.infer(load(p))) for p in paths]}


def broker(url, paths, args):
    chunks = action_chunk_broker.ActionChunkBroker(websocket_client_policy.WebsocketClientPolicy(url), args["horizon"])
    obs = load(paths[0])
    return {"steps": [chunks.infer(obs)["actions"].tolist() for _ in range(args["steps"])]}


def errors(url, paths, args):
    good = load(paths[0])
    bad = {"missing_key": {k: v for k, v in good.items() if k != "observation/state"},
           "wrong_dtype": {**good, "observation/image": good["observation/image"].astype(np.float32)},
           "long_prompt": {**good, "prompt": "pick " * 60}}
    out = {}
    for name, obs in bad.items():
        client = websocket_client_policy.WebsocketClientPolicy(url)
        try:
            client.infer(obs)
            out[name] = None
        except RuntimeError as err:
            out[name] = str(err)
        try:
            client.infer(good)
            out[name + "_closed"] = None
        except websockets.exceptions.ConnectionClosed as err:
            out[name + "_closed"] = [err.rcvd.code, err.rcvd.reason]
    out["new_connection"] = plain(websocket_client_policy.WebsocketClientPolicy(url).infer(good))
    return out


def concurrent(url, paths, args):
    """One client per observation, each on its own thread, after connect_after[i] s; barrier: all connect first."""
    if args.get("ping"):  # short keepalive: a server whose loop stalls longer than this drops the client
        websockets.sync.client.connect = functools.partial(
            websockets.sync.client.connect, ping_interval=args["ping"], ping_timeout=2 * args["ping"])
    n = len(paths)
    out, barrier = [None] * n, threading.Barrier(n)

    def work(i):
        try:
            time.sleep(args.get("connect_after", [0] * n)[i])
            start = time.monotonic()
            client = websocket_client_policy.WebsocketClientPolicy(url)
            connected = time.monotonic()
            if args.get("barrier"):
                barrier.wait(timeout=60)
            result = client.infer(load(paths[i]))
            out[i] = {**plain(result), "connect_s": connected - start, "infer_s": time.monotonic() - connected}
        except Exception as err:
            out[i] = {"error": repr(err)}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": out}


mode, url, args, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
print(json.dumps({"infer": infer, "broker": broker, "errors": errors, "concurrent": concurrent}[mode](url, paths, args)))
'''


class Wrapped:
    """What the server uses of a Policy (metadata, prepare, run) with the fixture's noise for every request,
    each run's batch size recorded, and delays[i] seconds of sleep in the i-th run (a slow inference)."""

    def __init__(self, policy: Policy, noise: np.ndarray, delays: tuple[float, ...] = ()):
        self.policy, self.noise, self.delays = policy, noise, list(delays)
        self.metadata = policy.metadata
        self.batches: list[int] = []
        self.running = threading.Event()

    def prepare(self, obs, noise=None):
        return self.policy.prepare(obs, self.noise if noise is None else noise)

    def run(self, requests):
        self.batches.append(len(requests))
        self.running.set()
        if self.delays:
            time.sleep(self.delays.pop(0))
        return self.policy.run(requests)


@pytest.fixture(scope="module")
def client_python() -> Path:
    if not CLIENT_PYTHON.exists():
        pytest.fail(
            f"{CLIENT_PYTHON.relative_to(ROOT)} is missing: run `make install` (it builds openpi's client venv)"
        )
    return CLIENT_PYTHON


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_io()


@pytest.fixture(scope="module")
def prompts() -> dict[str, str]:
    return load_prompts()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The fixture's orbax checkpoint converted as a user converts it (as in tests/test_policy_openpi.py)."""
    out = tmp_path_factory.mktemp("serve") / "pi0_libero"
    convert("pi0_ckpt", out, "pi0_libero", "--chunk-size", "8")
    return out


@pytest.fixture(scope="module")
def policy(checkpoint) -> Policy:
    return load_policy(checkpoint, tokenizer_path=TOKENIZER, device="cpu")


_obs = observation


@pytest.fixture(scope="module")
def obs_files(tmp_path_factory, io, prompts) -> dict[str, str]:
    """Observations as .npz for the client venv (numpy 1.x reads them; "/" is not a valid npz name)."""
    folder = tmp_path_factory.mktemp("obs")
    files = {}
    for scene in SCENES:
        arrays = {k.replace("/", "__"): v for k, v in _obs(io, prompts, scene).items()}
        np.savez(folder / f"{scene}.npz", **arrays)
        files[scene] = str(folder / f"{scene}.npz")
    return files


@pytest.fixture(scope="module")
def expected(policy, io, prompts) -> dict[str, np.ndarray]:
    return {s: policy.infer(_obs(io, prompts, s), noise=io["noise/pi0"])["actions"] for s in SCENES}


@pytest.fixture(scope="module")
def client(tmp_path_factory, client_python):
    script = tmp_path_factory.mktemp("client") / "openpi_client_run.py"
    script.write_text(CLIENT)

    def command(mode: str, url: str, files: list[str], **args) -> list[str]:
        return [str(client_python), str(script), mode, url, json.dumps(args), *files]

    def run(mode: str, url: str, files: list[str], **args) -> dict:
        proc = subprocess.run(command(mode, url, files, **args), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    run.command = command
    return run


@contextlib.contextmanager
def running(policy, io, delays=(), **options) -> Iterator[tuple[PolicyServer, Wrapped]]:
    wrapped = Wrapped(policy, io["noise/pi0"], tuple(delays))
    server = PolicyServer(wrapped, "127.0.0.1", 0, ServerOptions(**options)).start()
    try:
        yield server, wrapped
    finally:
        server.stop()


def _close(actions, reference, atol=1e-6) -> None:
    np.testing.assert_allclose(np.asarray(actions), reference, rtol=0, atol=atol)


def test_metadata_frame_is_the_policys(policy, io, client, obs_files):
    with running(policy, io) as (server, _):
        out = client("infer", server.url, [obs_files[SCENES[0]]])
    assert out["metadata"] == json.loads(json.dumps(policy.metadata))  # msgpack sends tuples as lists
    assert out["metadata"]["action_horizon"] == 8


def test_openpi_client_gets_the_in_process_actions(policy, io, client, obs_files, expected):
    with running(policy, io) as (server, wrapped):
        out = client("infer", server.url, [obs_files[s] for s in SCENES])
    assert wrapped.batches == [1, 1, 1, 1]
    for scene, result in zip(SCENES, out["results"], strict=True):
        assert np.asarray(result["actions"]).shape == (8, 7)
        _close(result["actions"], expected[scene])
        _close(result["actions"], io[f"pi0_libero/{scene}/actions"], atol=2e-4)  # openpi's own answer
        assert result["policy_timing"]["batch_size"] == 1 and result["policy_timing"]["infer_ms"] > 0
    timings = [r["server_timing"] for r in out["results"]]
    assert "prev_total_ms" not in timings[0] and all(t["prev_total_ms"] > 0 for t in timings[1:])
    assert all(t["infer_ms"] > 0 for t in timings)


def test_action_chunk_broker_asks_again_after_the_horizon(policy, io, client, obs_files, expected):
    with running(policy, io) as (server, wrapped):
        out = client("broker", server.url, [obs_files[SCENES[0]]], horizon=3, steps=7)
    assert len(wrapped.batches) == 3  # steps 0, 3 and 6 asked the server
    for step, action in enumerate(out["steps"]):
        _close(action, expected[SCENES[0]][step % 3])


def test_bad_requests_get_an_error_frame_and_a_new_connection_is_served(
    policy, io, client, obs_files, expected
):
    with running(policy, io) as (server, wrapped):
        out = client("errors", server.url, [obs_files[SCENES[0]]])
    lines = {
        "missing_key": "PolicyInputError: observation lacks ['observation/state']",
        "wrong_dtype": "PolicyInputError: observation/image must be uint8",
        "long_prompt": "PolicyInputError: prompt: prompt 'pick pick",
    }
    for name, line in lines.items():
        message = out[name]
        assert message is not None and message.startswith("Error in inference server:\n" + line), message
        assert "Traceback (most recent call last)" in message
        assert out[f"{name}_closed"] == [1011, CLOSE_REASON]
    assert "over tokenizer max_length=48" in out["long_prompt"]
    _close(out["new_connection"]["actions"], expected[SCENES[0]])
    assert wrapped.batches == [1]  # the bad requests never reached the model


def test_non_msgpack_bytes_and_text_frames_are_errors(policy, io, prompts, expected):
    with running(policy, io) as (server, wrapped):
        for frame, line in (
            (b"\xc1\xc1 not msgpack", "WireError: not a msgpack message"),
            ("a text frame", "WireError: expected a binary frame, got str"),
        ):
            with connect(server.url) as ws:
                assert unpackb(ws.recv()) == json.loads(json.dumps(policy.metadata))
                ws.send(frame)
                text = ws.recv(timeout=30)
                assert isinstance(text, str) and text.startswith(line) and "Traceback" in text, text
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=30)
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, CLOSE_REASON)
        with connect(server.url) as ws:
            ws.recv()
            ws.send(packb(_obs(io, prompts, SCENES[1])))
            result = unpackb(ws.recv(timeout=60))
    _close(result["actions"], expected[SCENES[1]])
    assert wrapped.batches == [1]


def test_healthz_over_plain_http(policy, io):
    with running(policy, io) as (server, _):
        http_url = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{http_url}/healthz", timeout=10) as response:
            assert (response.status, response.read()) == (200, b"OK\n")
        with pytest.raises(urllib.error.HTTPError) as other:  # any other path is a WebSocket endpoint
            urllib.request.urlopen(f"{http_url}/", timeout=10)
        assert 400 <= other.value.code < 500


def test_slow_inference_starves_neither_keepalive_nor_other_clients(policy, io, client, obs_files, expected):
    """The first run sleeps 3 s; keepalive pings every 0.5 s on both sides (1 s timeout) drop a connection
    whose event loop stalls that long, as openpi's server does (issue #717: it infers on the loop)."""
    files = [obs_files[SCENES[0]], obs_files[SCENES[1]]]
    with running(policy, io, delays=[3.0], ping_interval=0.5, ping_timeout=1.0) as (server, wrapped):
        cmd = client.command("concurrent", server.url, files, connect_after=[0, 1.0], ping=0.5)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wrapped.running.wait(60), "the first request never reached the policy"
            start = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=2) as response:
                assert response.status == 200
            healthz_s = time.monotonic() - start
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    first, second = json.loads(stdout.splitlines()[-1])["clients"]
    assert "error" not in first and "error" not in second, (first, second)
    assert healthz_s < 1.0 and second["connect_s"] < 1.0, (healthz_s, second)  # answered mid-inference
    assert first["infer_s"] > 2.5  # it really waited through the slow run, pinging all along
    _close(first["actions"], expected[SCENES[0]])
    _close(second["actions"], expected[SCENES[1]])


@pytest.mark.parametrize("max_batch", [8, 2])
def test_concurrent_clients_are_micro_batched(policy, io, client, obs_files, expected, max_batch):
    # A long window: the batcher still closes the batch as soon as every open connection has a request.
    with running(policy, io, max_batch=max_batch, batch_window_ms=2000) as (server, wrapped):
        out = client("concurrent", server.url, [obs_files[s] for s in SCENES], barrier=True)
    results = out["clients"]
    assert all("error" not in r for r in results), results
    assert sum(wrapped.batches) == len(SCENES) and max(wrapped.batches) == min(max_batch, len(SCENES))
    sizes = [r["policy_timing"]["batch_size"] for r in results]
    assert max(sizes) > 1 and max(sizes) <= max_batch, sizes
    for scene, result in zip(SCENES, results, strict=True):  # each client got its own observation's answer
        _close(result["actions"], expected[scene], atol=1e-5)


class Failing(Wrapped):
    """A server-side failure (not the client's): run() raises for any batch holding the prompt "boom"."""

    def run(self, requests):
        self.batches.append(len(requests))
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("boom in the model")
        return self.policy.run(requests)


def test_a_failing_request_in_a_batch_fails_alone(policy, io, prompts, expected):
    wrapped = Failing(policy, io["noise/pi0"])
    server = PolicyServer(wrapped, "127.0.0.1", 0, ServerOptions(batch_window_ms=2000)).start()
    good, bad = _obs(io, prompts, SCENES[0]), _obs(io, prompts, SCENES[0]) | {"prompt": "boom"}
    barrier, answers = threading.Barrier(2), {}

    def ask(name: str, obs: dict) -> None:
        with connect(server.url) as ws:
            ws.recv()
            barrier.wait(timeout=30)
            ws.send(packb(obs))
            answers[name] = ws.recv(timeout=60)
            if name == "bad":  # the server closes it after the error frame
                with contextlib.suppress(ConnectionClosed):
                    ws.recv(timeout=30)
                answers["bad_close"] = (ws.close_code, ws.close_reason)

    threads = [threading.Thread(target=ask, args=a) for a in (("good", good), ("bad", bad))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.stop()
    assert wrapped.batches == [2, 1, 1]  # the batch, then each request alone
    _close(unpackb(answers["good"])["actions"], expected[SCENES[0]])
    assert isinstance(answers["bad"], str) and answers["bad"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: boom in the model" in answers["bad"]
    assert answers["bad_close"] == (1011, CLOSE_REASON)


# ---------------------------------------------------------------------- launch/serve.py


def _main_rc(argv: list[str]) -> int:
    try:
        return load_script("launch/serve.py").main(argv)
    except SystemExit as exit_:  # argparse errors
        return exit_.code


def test_serve_cli_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ok = ["--checkpoint", str(checkpoint), "--tokenizer", str(TOKENIZER), "--host", "127.0.0.1"]
    cases = [
        ([], "the following arguments are required: --checkpoint"),
        (["--checkpoint", str(tmp_path / "nope")], "does not exist"),
        (["--checkpoint", str(tmp_path)], f"serve error: {tmp_path}"),  # no weights: PolicyLoadError
        (["--checkpoint", str(checkpoint), "--host", "127.0.0.1"], "pass tokenizer_path (--tokenizer)"),
        ([*ok, "--port", "70000"], "--port 70000 is not a port"),
        ([*ok, "--port", "eight"], "argument --port: invalid int value"),
        ([*ok, "--port", str(busy.getsockname()[1])], f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}"),
        ([*ok, "--max-batch", "0"], "--max-batch must be >= 1"),
        ([*ok, "--guidance", "strong"], "--guidance must be a number or 'none'"),
        ([*ok, "--guidance", "-1"], "--guidance -1 must be a finite number >= 0"),
        ([*ok, "--guidance", "inf"], "--guidance inf must be a finite number >= 0"),
    ]
    try:
        for argv, message in cases:
            assert _main_rc(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    finally:
        busy.close()


def test_served_policy_samples_with_the_guidance_training_and_eval_use(checkpoint, io, prompts):
    """A cfg-trained checkpoint (its two condition rows differ) must be served as launch/eval.py and the
    training rollouts sample it (w = 1.0: the positive condition), not as the plain model."""
    policy = load_policy(checkpoint, tokenizer_path=TOKENIZER, device="cpu")
    assert policy.guidance == 1.0 and policy.metadata["guidance"] == 1.0
    with torch.no_grad():
        policy.model.cond_embed.weight[1].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    obs, noise = _obs(io, prompts, SCENES[0]), io["noise/pi0"]
    served = policy.infer(obs, noise)["actions"]
    plain = dataclasses.replace(policy, guidance=None).infer(obs, noise)["actions"]
    assert np.abs(served - plain).max() > 1e-3  # the condition matters for this policy
    request = policy.prepare(obs, noise)  # the images at the model's resolution
    batch = policy.processor.batch(request.images[None], request.state[None], [request.prompt], device="cpu")
    with torch.no_grad():  # what rollouts (rl/rollout.make_pi0_policy_fn) sample with rollout.guidance 1.0
        sampled = policy.model.sample_actions(batch, torch.from_numpy(request.noise)[None], guidance=1.0)
    rollout = policy.processor.decode_actions(sampled, request.state[None])[0]
    _close(served, rollout, atol=1e-5)


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


def test_serve_cli_is_listening_when_it_says_so(checkpoint, client, obs_files):
    """openpi-client 0.1.2 does not retry: connecting the moment the line appears must work."""
    cmd = [sys.executable, "launch/serve.py", "--checkpoint", str(checkpoint), "--tokenizer", str(TOKENIZER)]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    log, port = [], None
    try:
        deadline = time.monotonic() + 180
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(queue.Empty):
                log.append(lines.get(timeout=1))
                found = re.search(r"serving .* on ws://127\.0\.0\.1:(\d+)", log[-1])
                port = int(found.group(1)) if found else None
        assert port, "".join(log)
        out = client("infer", f"ws://127.0.0.1:{port}", [obs_files[SCENES[0]]])
        assert np.asarray(out["results"][0]["actions"]).shape == (8, 7)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    time.sleep(0.2)  # the reader thread drains the last lines
    while not lines.empty():
        log.append(lines.get())
    text = "".join(log)
    assert "connection open: 127.0.0.1:" in text and "after 1 requests, closed by client" in text, text
