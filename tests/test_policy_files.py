"""What a checkpoint carries beside its weights reaches every path that runs it: replan_steps and the action
horizon of its policy.json (training rollouts, launch/eval.py, a policy server's metadata), a discrete-state
prompt through the server's Policy, and a policy server that misbehaves (not a server, an error frame, a
closed connection) reported in one line by `launch/eval.py --policy-server`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file, save_file
from websockets.sync.server import serve

from ript_ds.build import build_components, replan_steps
from ript_ds.config import ConfigError, load_config
from ript_ds.env.base import Observation, TaskSpec
from ript_ds.eval.checkpoint import server_replan_steps
from ript_ds.eval.remote import remote_policy_fn
from ript_ds.model.arch import PI0Arch
from ript_ds.model.convention import PolicyConvention
from ript_ds.model.normalization import NormStats
from ript_ds.model.pi0 import PI0Policy
from ript_ds.model.pi05 import make_policy
from ript_ds.model.processing import build_tiny_tokenizer
from ript_ds.model.weights import from_canonical, missing_convention_hint, save_canonical
from ript_ds.serving import load_policy
from ript_ds.serving.client import RemotePolicy, ServerError
from ript_ds.serving.msgpack_numpy import packb

PROMPTS = ["pick up the red block", "stack them"]


def _checkpoint(tmp_path, convention: PolicyConvention | None, model_type: str = "pi0"):
    policy = make_policy(PI0Arch.tiny(model_type=model_type))
    ckpt = save_canonical(policy, tmp_path / "ckpt", NormStats.identity(8, 7), convention)
    # the bins as words, so a state-in-prompt differs by tokens (a word model maps unseen words to unk)
    bins = "Task: x, State: " + " ".join(str(i) for i in range(256)) + ";\nAction: "
    build_tiny_tokenizer(ckpt, [*PROMPTS, bins], vocab_size=400)
    return ckpt


def _cfg(tmp_path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", *overrides])


# ------------------------------------------------------------------------------------------ replan_steps
def test_replan_steps_come_from_the_config_else_the_convention_else_5():
    conv = PolicyConvention(replan_steps=3, image_slots=(), source="x")
    assert replan_steps(None, None) == 5 and replan_steps(None, conv) == 3 and replan_steps(7, conv) == 7


def test_training_rollouts_execute_the_checkpoints_replan_steps(tmp_path):
    ckpt = _checkpoint(tmp_path, PolicyConvention(replan_steps=3, image_slots=(), source="x"))
    assert build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}")).replan_every == 3
    assert (
        build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}", "rollout.replan_every=2")).replan_every
        == 2
    )
    assert build_components(_cfg(tmp_path)).replan_every == 5  # no checkpoint: openpi's client's 5


@pytest.mark.parametrize(
    ("convention", "overrides", "message"),
    [
        (PolicyConvention(action_horizon=50, image_slots=(), source="p.json"), (), "says action_horizon 50"),
        (PolicyConvention(replan_steps=9, image_slots=(), source="p.json"), (), "policy.json replan_steps=9"),
        (None, ("rollout.replan_every=9",), "rollout.replan_every=9 is more than the 8 actions"),
    ],
)
def test_a_horizon_the_weights_do_not_have_is_one_config_error(tmp_path, convention, overrides, message):
    ckpt = _checkpoint(tmp_path, convention)  # tiny: chunks of 8
    with pytest.raises(ConfigError, match=message) as err:
        build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}", *overrides))
    assert "\n" not in str(err.value)


def test_eval_replans_as_the_checkpoint_says_and_records_it(tmp_path, monkeypatch):
    calls: list[int] = []
    original = PI0Policy.sample_actions

    def counting(self, batch, *args, **kwargs):
        calls.append(batch.batch_size)
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(PI0Policy, "sample_actions", counting)
    ckpt = _checkpoint(tmp_path, PolicyConvention(replan_steps=2, image_slots=(), source="x"))
    eval_cli = load_script("launch/eval.py")
    argv = ["--checkpoint", str(ckpt), "--suite", "synthetic", "--tasks", "0", "--episodes-per-task", "1"]
    argv += ["--max-steps", "6", "--num-envs", "1", "--out", str(tmp_path / "o")]
    assert eval_cli.main(argv) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["protocol"]["replan_steps"] == 2
    assert len(calls) == 3  # 6 steps (no early success of a random policy this short), 2 per chunk
    calls.clear()
    assert eval_cli.main([*argv, "--replan-steps", "3", "--out", str(tmp_path / "o3")]) == 0
    assert (
        len(calls) == 2
        and json.loads((tmp_path / "o3" / "results.json").read_text())["protocol"]["replan_steps"] == 3
    )


def test_server_metadata_gives_the_replan_steps_unless_the_flag_does():
    assert server_replan_steps(None, {"policy": {"replan_steps": 4}}) == 4
    assert server_replan_steps(2, {"policy": {"replan_steps": 4}}) == 2
    assert server_replan_steps(None, {}) == 5  # openpi's own server sends no convention


# ------------------------------------------------------------------------------------------ discrete state
def test_a_discrete_state_policy_is_served_with_the_state_in_its_prompt(tmp_path):
    conv = PolicyConvention(model_type="pi05", discrete_state_input=True, max_token_len=64, source="x")
    ckpt = _checkpoint(tmp_path, conv, model_type="pi05")
    policy = load_policy(ckpt, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # adaptive norms start at zero: make the prompt matter
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noise = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)

    def act(state: np.ndarray) -> np.ndarray:
        obs = {"observation/image": image, "observation/wrist_image": image, "observation/state": state}
        return policy.infer(obs | {"prompt": PROMPTS[0]}, noise)["actions"]

    low, high = np.full(8, -0.5), np.full(8, 0.5)
    tokens = [policy.processor.tokenize(PROMPTS[0], s)[0] for s in (low, high)]
    assert not np.array_equal(*tokens)  # the bins are in the prompt
    assert np.abs(act(low) - act(high)).max() > 1e-4  # and reach the network (pi0.5 has no state token)


# ------------------------------------------------------------------------------------------ a bad server
@contextmanager
def _ws_server(handler) -> Iterator[int]:
    server = serve(handler, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.socket.getsockname()[1]
    finally:
        server.shutdown()


def _failing(ws) -> None:
    """openpi's server on an exception in infer: the traceback as a text frame, then close 1011."""
    ws.send(packb({}))
    ws.recv()
    ws.send('Traceback (most recent call last):\n  File "x", line 1\nValueError: the policy broke')
    ws.close(1011, "Internal server error")


def _hanging_up(ws) -> None:
    ws.send(packb({}))
    ws.recv()
    ws.close()


def _garbage(ws) -> None:
    ws.send(b"\xc1 not msgpack")


class _Http(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


@contextmanager
def _http_server() -> Iterator[int]:
    """Something on the port that is not a websocket server."""
    http = HTTPServer(("127.0.0.1", 0), _Http)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield http.server_address[1]
    finally:
        http.shutdown()


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (_http_server, "cannot reach a policy server"),
        (lambda: _ws_server(_failing), "failed the request: ValueError: the policy broke"),
        (lambda: _ws_server(_hanging_up), "closed the connection"),
        (lambda: _ws_server(_garbage), "not openpi msgpack"),
    ],
)
def test_remote_policy_turns_every_server_failure_into_one_line(server, message):
    with server() as port, pytest.raises(ServerError, match=message) as err:
        RemotePolicy("127.0.0.1", port, open_timeout=5, timeout=5).infer({"prompt": "x"})
    assert "\n" not in str(err.value), str(err.value)


def _eval_rc(argv, capsys) -> tuple[int, str]:
    rc = load_script("launch/eval.py").main(argv)
    return rc, capsys.readouterr().err


def test_eval_against_a_failing_server_is_one_line_and_exit_2(tmp_path, capsys):
    import libero  # noqa: F401  (the libero extra: a broken install fails, never skips)

    base = ["--suite", "libero_goal", "--tasks", "0", "--num-envs", "1", "--out", str(tmp_path / "o")]
    with _ws_server(_hanging_up) as port:
        rc, err = _eval_rc(
            ["--policy-server", f"127.0.0.1:{port}", *base, "--episodes-per-task", "51"], capsys
        )
        assert rc == 2 and "fewer than 51 init states" in err and err.count("\n") == 1, err
    with _ws_server(_failing) as port:
        argv = ["--policy-server", f"127.0.0.1:{port}", *base, "--episodes-per-task", "1"]
        rc, err = _eval_rc([*argv, "--max-steps", "2", "--camera-size", "64", "--image-size", "32"], capsys)
    assert rc == 2, err
    line = [x for x in err.splitlines() if x.startswith("eval error:")]
    assert line and "ValueError: the policy broke" in line[0] and "Traceback" not in err, err
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_foreign_checkpoint_without_a_convention_is_warned_about(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path, None)
    with caplog.at_level("WARNING"):
        build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}"))
    assert "no policy.json" not in caplog.text  # ours: absolute actions are what its run trained
    weights = ckpt / "model.safetensors"  # rewritten with openpi PyTorch's names: what users bring
    state = load_file(str(weights))
    state.pop("cond_embed.weight")  # ours only
    save_file({from_canonical(k, "openpi-pytorch"): v for k, v in state.items()}, str(weights))
    assert "tools/policy_convention.py" in missing_convention_hint(ckpt)
    for load in (
        lambda: build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}")),
        lambda: load_policy(ckpt),
    ):
        caplog.clear()
        with caplog.at_level("WARNING"):
            load()
        assert "has no policy.json" in caplog.text and "--openpi-config pi0_libero --write" in caplog.text


class _Replying:
    """A connected client whose server answers every request with `actions`."""

    address = "127.0.0.1:1"

    def __init__(self, actions):
        self.actions = actions

    def infer(self, obs):
        return {"actions": self.actions}


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        (np.zeros((10, 32)), r"shape \(10, 32\); LIBERO needs \[H, 7\] with H >= 5"),
        (np.zeros((4, 7)), r"H >= 5 \(the replan steps"),
        (np.full((10, 7), np.nan), "non-finite actions"),
        ([[1.0, 2.0], [3.0]], "not a numeric array"),
    ],
)
def test_a_servers_chunk_that_cannot_be_executed_is_one_server_error(actions, message):
    obs = Observation(images=np.zeros((2, 8, 8, 3), dtype=np.uint8), state=np.zeros(8, dtype=np.float32))
    task = TaskSpec("libero_goal", 0, "t", "open the drawer", 10, 1)
    policy_fn = remote_policy_fn([_Replying(actions)], replan_steps=5)
    with pytest.raises(ServerError, match=message):
        policy_fn([obs], [task], [None])
    ok = remote_policy_fn([_Replying(np.ones((10, 7)))], replan_steps=5)([obs], [task], [None])
    assert ok.shape == (1, 10, 7) and ok.dtype == np.float32


def test_a_state_prompt_that_can_outgrow_the_token_limit_is_refused_before_the_run(tmp_path):
    """The discrete-state prompt's length depends on the state: checked for every bin before any rollout."""
    conv = PolicyConvention(model_type="pi05", discrete_state_input=True, max_token_len=12, source="x")
    ckpt = _checkpoint(tmp_path, conv, model_type="pi05")
    with pytest.raises(ConfigError, match="over tokenizer max_length=12") as err:
        build_components(_cfg(tmp_path, f"model.checkpoint={ckpt}"))
    assert "\n" not in str(err.value)
