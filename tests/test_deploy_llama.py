"""Deployment with llama.cpp (``make setup-deploy``; ``make test-optional`` runs these, ``make test`` does not): the
pruned model's perplexity in llama.cpp agrees with PyTorch's at f16, its zeros reach llama.cpp's tensors, and the
server starts, answers, falls back to the dense model for a damaged file, refuses a damaged file without a fallback,
survives a load test with flat memory, and always stops (Ctrl-C, the end of a ``with`` block, an error in it)."""
import json
import signal
import subprocess
import sys
import time
import urllib.request

import gguf
import pytest
import torch

import labutils as lu
from labutils.deploy import engine
from labutils.deploy.loadtest import load_test
from labutils.deploy.metrics import parse_metrics
from labutils.deploy.router import gguf_sparsity
from labutils.deploy.server import check_port, free_port, serving
from labutils.jobs.deployment import PERPLEXITY_TOLERANCE

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make setup-deploy builds it")
pytestmark = [pytest.mark.deploy, pytest.mark.slow]
EVAL_TOKENS = 1024


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(lab folder, its f16 GGUF, the PyTorch model): the default model, magnitude-pruned to 50 % (no
    calibration: seconds)."""
    profile = lu.get_profile(lu.DEFAULT_PROFILE)
    model, tokenizer = lu.load_model(profile, "cpu")
    lu.prune_model(model, lu.PruneSpec("magnitude", 0.5), progress=False)
    base = tmp_path_factory.mktemp("deploy")
    folder = lu.save_pruned(model, base / "magnitude-50", tokenizer, {"label": "magnitude 50%", "target": "50%"})
    return folder, lu.export_gguf(folder, base / "magnitude-50.gguf"), model, tokenizer


@pytest.fixture(scope="module")
def damaged(pruned, tmp_path_factory):
    """The pruned GGUF with one down_proj's bytes overwritten by 0xFF (float16 NaN): loads, computes NaN."""
    path = tmp_path_factory.mktemp("damaged") / "damaged.gguf"
    path.write_bytes(pruned[1].read_bytes())
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.3.ffn_down.weight")
    with open(path, "r+b") as f:
        f.seek(tensor.data_offset)
        f.write(b"\xff" * tensor.n_bytes)
    return path


def test_llama_cpp_perplexity_agrees_with_pytorch_at_f16(pruned):
    _, path, model, tokenizer = pruned
    profile = lu.get_profile(lu.DEFAULT_PROFILE)
    test = lu.test_tokens(profile, tokenizer, EVAL_TOKENS, vocab_size=model.config.vocab_size)
    ours = lu.perplexity(model, test, profile.eval_seqlen, progress=False)
    theirs = engine.gguf_perplexity(path, test, profile.eval_seqlen, progress=False)
    assert theirs == pytest.approx(ours, rel=PERPLEXITY_TOLERANCE)


def test_the_served_file_keeps_the_zeros(pruned):
    assert gguf_sparsity(pruned[1]) == pytest.approx(lu.model_sparsity(pruned[2])["linear_sparsity"], abs=1e-9)


def test_greedy_decoding_is_repeatable_and_measured(pruned):
    speeds = engine.decode_speeds({"a": pruned[1]}, list(range(100, 116)), 8, repeats=2, progress=False)
    assert len(speeds["a"].tokens) == 8 and speeds["a"].decode_tokens_per_s > 0
    (text, ids), = engine.gguf_generate(pruned[1], ["The capital of France is"], 8)
    assert isinstance(text, str) and 0 < len(ids) <= 8


def post(url, path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def metrics(url):
    with urllib.request.urlopen(url + "/metrics") as response:
        return parse_metrics(response.read().decode())


def test_serve_answers_and_reports(pruned):
    with serving(pruned[0], fallback="default") as server:
        chat = post(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 8, "temperature": 0})
        assert chat["model"] == "pruned" and chat["usage"]["completion_tokens"] > 0
        stream = urllib.request.urlopen(urllib.request.Request(
            server.url + "/v1/completions", data=json.dumps({"prompt": "The", "max_tokens": 4, "stream": True})
            .encode(), headers={"Content-Type": "application/json"})).read().decode()
        assert '"model": "pruned"' in stream or '"model":"pruned"' in stream
        result = load_test(server.url, clients=8, requests=16, max_tokens=8)
        assert result.errors == 0 and result.by_model == {"pruned": 16}
        rss = result.memory
        assert abs(rss[-1] / rss[0] - 1) <= 0.05  # flat: no growth per request
        page = metrics(server.url)
        assert page['lab_model_sparsity{model="pruned",role="primary"}'] == pytest.approx(0.5, abs=1e-3)
        assert page['lab_requests_total{model="pruned"}'] >= 18 and page["lab_fallbacks_total"] == 0
        assert page['lab_request_latency_seconds{quantile="0.95"}'] > 0
    assert server.process.poll() is not None  # stopped at the end of the block


def test_a_damaged_file_is_rejected_and_the_dense_model_answers(damaged):
    with serving(damaged, fallback="default") as server:
        with urllib.request.urlopen(server.url + "/health") as response:
            health = json.loads(response.read())
        assert not health["pruned"]["healthy"] and "NaN" in health["pruned"]["problem"]
        result = load_test(server.url, clients=4, requests=8, max_tokens=4)
        assert result.errors == 0 and result.by_model == {"dense": 8}
        page = metrics(server.url)
        assert page["lab_fallbacks_total"] == 8 and page['lab_model_healthy{model="pruned",role="primary"}'] == 0


def test_a_damaged_file_without_a_fallback_does_not_start(damaged):
    done = subprocess.run([sys.executable, "-m", "labutils", "serve", str(damaged), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "failed its start-up check" in lines[0] and "--fallback DENSE" in lines[0]


def test_an_error_in_the_with_block_stops_the_server():
    with pytest.raises(RuntimeError, match="boom"), serving("default") as server:
        raise RuntimeError("boom")
    assert server.process.poll() is not None


def test_ctrl_c_stops_the_server_and_frees_its_port():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "labutils", "serve", "default", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert process.stdout.read().rstrip().endswith("server stopped")
    finally:
        process.kill()
    check_port(port)  # free again: a new server may bind it (BadInput "already in use" otherwise)


def test_perplexity_of_a_model_with_nan_weights_is_an_error(damaged):
    with pytest.raises(lu.LabError, match="NaN"):
        engine.gguf_perplexity(damaged, torch.arange(100, 228), 64, progress=False)
