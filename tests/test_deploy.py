"""Deployment without llama.cpp (``make test``): ``serve`` and ``loadtest`` refuse bad inputs in one line with exit 2
and say how to install llama-cpp-python; the model router falls back to the dense model when the pruned one raises
or returns non-finite logits; the load test keeps its bounds (duration, per-request timeout) against a stub server;
``/metrics`` counts what happened. With llama.cpp: tests/test_deploy_llama.py (``make test-optional``)."""
import json
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import labutils as lu
from labutils.cli import main
from labutils.core.loading import embedded_gguf_path
from labutils.deploy import engine, router
from labutils.deploy.loadtest import LoadTestResult, load_test
from labutils.deploy.metrics import ServerMetrics, parse_metrics
from labutils.deploy.router import FallbackLlama, NoModel, Served
from labutils.deploy.server import resolve_model

ROOT = Path(__file__).parent.parent


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys, argv, *needles) -> str:
    """Run the command: exit 2, nothing on stdout, one line on stderr holding every needle."""
    assert run(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def no_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp → ImportError, installed or not


def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_serve_without_llama_cpp_says_how_to_install(capsys, no_llama_cpp):
    one_error_line(capsys, ["serve", "default"], "make setup-deploy", "llama-cpp-python==0.3.36")


def test_requirements_deploy_pins_the_version_the_message_names():
    pins = (ROOT / "requirements-deploy.txt").read_text()
    assert engine.LLAMA_CPP_PYTHON.replace("llama-cpp-python", "llama-cpp-python[server]") in pins


@pytest.mark.parametrize("argv, needles", [
    (["serve", "no/such.gguf"], ["MODEL 'no/such.gguf': no such file"]),
    (["serve", "default", "--fallback", "missing.gguf"], ["--fallback 'missing.gguf': no such file"]),
    (["serve", "default", "--port", "80"], ["--port must be an integer from 1024 to 65535"]),
    (["serve", "default", "--port", "x"], ["argument --port: invalid int value"]),
    (["serve", "default", "--threads", "0"], ["--threads"]),
    (["serve", "default", "--ctx", "-5"], ["--ctx"]),
])
def test_serve_bad_inputs_are_one_line(capsys, no_llama_cpp, argv, needles):
    one_error_line(capsys, argv, *needles)


def test_serve_refuses_a_file_that_is_not_gguf_and_a_folder_that_is_not_a_lab_output(capsys, tmp_path,
                                                                                   no_llama_cpp):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    one_error_line(capsys, ["serve", str(tmp_path / "model.gguf")], "is not a GGUF file")
    one_error_line(capsys, ["serve", str(tmp_path)], "is a folder but not a lab output")


def test_serve_refuses_a_port_in_use(capsys, no_llama_cpp):
    with busy_port() as sock:
        one_error_line(capsys, ["serve", "default", "--port", str(sock.getsockname()[1])], "already in use")


def test_default_is_the_embedded_dense_gguf(tmp_path):
    assert resolve_model("default", "MODEL", tmp_path) == embedded_gguf_path()


@pytest.mark.parametrize("argv, needles", [
    (["loadtest", "http://example.com:8080"], ["allowed only http://127.0.0.1:PORT"]),
    (["loadtest", "https://127.0.0.1:8080"], ["allowed only http://127.0.0.1:PORT"]),
    (["loadtest", "http://127.0.0.1"], ["allowed only http://127.0.0.1:PORT"]),
    (["loadtest", "http://127.0.0.1:9", "--clients", "0"], ["--clients must be an integer from 1 up to 64"]),
    (["loadtest", "http://127.0.0.1:9", "--clients", "65"], ["--clients must be an integer from 1 up to 64"]),
    (["loadtest", "http://127.0.0.1:9", "--requests", "0"], ["--requests"]),
    (["loadtest", "http://127.0.0.1:9", "--requests", "2001"], ["--requests"]),
    (["loadtest", "http://127.0.0.1:9", "--max-tokens", "513"], ["--max-tokens"]),
    (["loadtest", "http://127.0.0.1:9", "--timeout", "0"], ["--timeout must be a number of seconds"]),
    (["loadtest", "http://127.0.0.1:9", "--duration", "nan"], ["--duration must be a number of seconds"]),
    (["loadtest", "http://127.0.0.1:9", "--clients", "two"], ["argument --clients: invalid int value"]),
])
def test_loadtest_bad_inputs_are_one_line(capsys, argv, needles):
    one_error_line(capsys, argv, *needles)


def test_loadtest_without_a_server_is_one_line(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    one_error_line(capsys, ["loadtest", f"http://127.0.0.1:{port}"], "no lab server answers /metrics")


class Stub(BaseHTTPRequestHandler):
    """A server that answers like the lab's: /metrics with a memory figure, completions after ``delay`` seconds."""

    delay = 0.0
    rss = [100e6]

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = f"# HELP x\nprocess_resident_memory_bytes {self.rss[0]}\n".encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        self.rss[0] += 1e6
        body = json.dumps({"model": "pruned", "usage": {"completion_tokens": 4}}).encode()
        try:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
            pass


@pytest.fixture
def stub():
    def start(delay):
        handler = type("Handler", (Stub,), {"delay": delay, "rss": [100e6]})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_load_test_counts_answers_tokens_models_and_memory(stub):
    result = load_test(stub(0.01), clients=4, requests=12, max_tokens=4)
    assert (result.answered, result.errors, result.not_sent) == (12, 0, 0)
    assert result.by_model == {"pruned": 12} and result.completion_tokens == 48
    summary = result.summary()
    assert summary["p50 s"] <= summary["p95 s"] and summary["tokens/s"] > 0
    assert summary["server MiB peak"] >= summary["server MiB at start"]
    assert summary["server MiB at end"] == pytest.approx((100e6 + 12e6) / 2**20)


def test_load_test_stops_sending_after_its_duration(stub):
    start = time.perf_counter()
    result = load_test(stub(0.3), clients=2, requests=40, duration=0.5)
    assert time.perf_counter() - start < 5
    assert result.not_sent > 0 and result.answered + result.not_sent == 40 and result.errors == 0


def test_load_test_counts_a_request_over_its_timeout_as_an_error(stub):
    result = load_test(stub(1.5), clients=2, requests=2, timeout=0.3)
    assert result.errors == 2 and result.answered == 0 and "timed out" in result.first_error
    assert math.isnan(result.summary()["p50 s"])


class FakeLlama:
    """Stands in for llama_cpp.Llama: answers with its name, or raises ``fail``."""

    def __init__(self, name, fail=None):
        self.name, self.fail, self.calls = name, fail, 0

    def create_completion(self, **kwargs):
        self.calls += 1
        if self.fail:
            raise self.fail
        return {"model": "/path/x.gguf", "usage": {"completion_tokens": 3}, "choices": [{"text": self.name}]}

    def token_eos(self):
        return 2


def served(name, role, llama, problem=None):
    return Served(name, role, Path(f"{name}.gguf"), 0.5 if name == "pruned" else 0.0, 20.0, problem, llama)


def routed(primary, dense, monkeypatch, nan_for=()):
    monkeypatch.setattr(router, "last_logits", lambda llama: np.full(3, np.nan if llama in nan_for else 0.0))
    metrics = ServerMetrics()
    return FallbackLlama([served("pruned", "primary", primary), served("dense", "fallback", dense)], metrics), metrics


def test_the_pruned_model_answers_while_it_works(monkeypatch):
    llama, metrics = routed(FakeLlama("pruned"), FakeLlama("dense"), monkeypatch)
    assert llama(prompt="x")["model"] == "pruned"
    text = parse_metrics(metrics.text().decode())
    assert text['lab_requests_total{model="pruned"}'] == 1 and text["lab_fallbacks_total"] == 0
    assert llama.token_eos() == 2  # everything else goes to the first healthy model


def test_an_error_of_the_pruned_model_is_answered_by_the_dense_one(monkeypatch):
    primary, dense = FakeLlama("pruned", RuntimeError("llama_decode returned -3")), FakeLlama("dense")
    llama, metrics = routed(primary, dense, monkeypatch)
    assert [llama(prompt="x")["model"] for _ in range(2)] == ["dense", "dense"]
    text = parse_metrics(metrics.text().decode())
    assert text['lab_model_errors_total{model="pruned"}'] == 2 and text["lab_fallbacks_total"] == 2
    assert primary.calls == 2  # a raising model is tried again: the error may be passing


def test_non_finite_logits_take_the_pruned_model_out(monkeypatch):
    primary, dense = FakeLlama("pruned"), FakeLlama("dense")
    llama, _ = routed(primary, dense, monkeypatch, nan_for=(primary,))
    assert [llama(prompt="x")["model"] for _ in range(3)] == ["dense"] * 3
    assert primary.calls == 1 and "non-finite" in llama.models[0].problem


def test_a_bad_request_is_not_a_model_failure(monkeypatch):
    primary, dense = FakeLlama("pruned", ValueError("Requested tokens exceed context window")), FakeLlama("dense")
    llama, _ = routed(primary, dense, monkeypatch)
    with pytest.raises(ValueError, match="context window"):
        llama(prompt="x")
    assert dense.calls == 0


def test_no_model_left_is_unavailable(monkeypatch):
    llama, metrics = routed(FakeLlama("p", RuntimeError("x")), FakeLlama("d", RuntimeError("y")), monkeypatch)
    with pytest.raises(NoModel, match="every model failed"):
        llama(prompt="x")
    llama.models[0].problem = llama.models[1].problem = "damaged"
    with pytest.raises(NoModel, match="no healthy model: pruned: damaged; dense: damaged"):
        llama(prompt="x")
    assert parse_metrics(metrics.text().decode())["lab_unanswered_total"] == 2


def test_metrics_report_latency_quantiles_speed_sparsity_and_memory():
    metrics = ServerMetrics()
    metrics.model("pruned", "primary", 0.5, True, 40.0)
    for seconds in (1.0, 2.0, 3.0, 4.0):
        metrics.observe(seconds)
    metrics.answered("pruned", 30, 1.5, fallback=False)
    text = parse_metrics(metrics.text().decode())
    assert text['lab_request_latency_seconds{quantile="0.5"}'] == 2.5
    assert text["lab_tokens_per_second"] == 20.0
    assert text['lab_model_sparsity{model="pruned",role="primary"}'] == 0.5
    assert text["process_resident_memory_bytes"] > 0 and text["lab_peak_resident_memory_bytes"] > 0


def rows(engine, weights, values):
    """Engine-table rows: {model: (MB, perplexity, decode tok/s)}."""
    return pd.DataFrame([{"engine": engine, "weights": weights, "model": model, "weights MB": mb, "perplexity": ppl,
                          "prefill tok/s": 100.0, "decode tok/s": tps} for model, (mb, ppl, tps) in values.items()]
                        ).set_index(["engine", "weights", "model"])


def test_engine_table_relates_each_row_to_pytorch_and_to_the_dense_model():
    table = lu.engine_table(rows("PyTorch", "float32", {"dense": (540, 12.0, 10.0), "wanda 50%": (540, 30.0, 10.0)}),
                            rows("llama.cpp", "f16", {"dense": (270, 12.06, 70.0), "wanda 50%": (270, 30.0, 35.0)}))
    assert table.loc[("llama.cpp", "f16", "dense"), "vs PyTorch"] == pytest.approx(0.005)
    assert table.loc[("llama.cpp", "f16", "wanda 50%"), "decode × dense"] == pytest.approx(0.5)
    assert table.loc[("PyTorch", "float32", "wanda 50%"), "decode × dense"] == pytest.approx(1.0)


def fake_load(by_model, errors=0, memory=(700e6, 710e6), latencies=(1.0, 2.0)):
    return LoadTestResult(8, sum(by_model.values()) + errors, sum(by_model.values()), errors, 0, 4.0,
                          list(latencies), 100, dict(by_model), list(memory))


def evidence(**changes):
    engines = lu.engine_table(
        rows("PyTorch", "float32", {"dense": (540, 12.0, 10.0), "wanda 50%": (540, 30.0, 10.0)}),
        rows("llama.cpp", "q4_0", {"dense": (92, 15.0, 130.0), "wanda 50%": (92, 42.0, 128.0)}))
    base = dict(engines=engines, pruned="wanda 50%", quant="q4_0", sparsity=0.5007, target=0.5,
                repeats={"dense": 0.02, "wanda 50%": 0.05}, load=fake_load({"pruned": 32}),
                fallback=fake_load({"dense": 8}))
    return lu.DeployEvidence(**(base | changes))


def test_the_checklist_says_what_passed_and_what_did_not():
    passed = lu.checklist(evidence())["passed"]
    assert passed.to_dict() == {"accuracy": True, "sparsity": True, "output quality": True,
                                "sparse acceleration": False, "memory below dense": False, "latency SLA": True,
                                "stress test": True, "fallback": True}


@pytest.mark.parametrize("change, item", [
    (dict(accuracy=2.0), "accuracy"),
    (dict(sparsity=0.49), "sparsity"),
    (dict(repeats={"dense": 0.02, "wanda 50%": 0.5}), "output quality"),
    (dict(sla={"p50 s": 0.5, "p95 s": 10.0}), "latency SLA"),
    (dict(load=fake_load({"pruned": 31}, errors=1)), "stress test"),
    (dict(load=fake_load({"pruned": 32}, memory=(700e6, 800e6))), "stress test"),
    (dict(fallback=fake_load({"dense": 7, "pruned": 1})), "fallback"),
])
def test_each_checklist_item_fails_when_its_measurement_does(change, item):
    assert not lu.checklist(evidence(**change)).loc[item, "passed"]


def test_deploy_settings_refuse_bad_values():
    with pytest.raises(lu.BadInput, match="quant"):
        lu.DeploySettings(out="x", eval_seqlen=128, quants=("f16", "q5_k"))
    with pytest.raises(lu.BadInput, match="repeats"):
        lu.DeploySettings(out="x", eval_seqlen=128, repeats=0)


def test_a_damaged_copy_overwrites_one_tensor_and_nothing_else(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    writer.add_tensor("blk.0.ffn_down.weight", np.ones((4, 8), dtype=np.float16))
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((4, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = lu.damaged_copy(tmp_path / "tiny.gguf", tmp_path / "bad.gguf", "blk.0.ffn_down.weight")
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    assert np.isnan(tensors["blk.0.ffn_down.weight"]).all() and (tensors["blk.0.ffn_up.weight"] == 1).all()
    with pytest.raises(lu.BadInput, match="is not in"):
        lu.damaged_copy(tmp_path / "tiny.gguf", tmp_path / "bad2.gguf", "blk.9.attn_q.weight")
    assert not (tmp_path / "bad2.gguf").exists()
