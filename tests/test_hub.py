"""push / info / extend against a local HTTP server speaking the Hub API subset huggingface_hub uses (no Hub here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import Hub
from huggingface_hub import ModelCard
from test_checkpoint import make_source, snapshot
from test_cli import NO_TORCH


@pytest.fixture
def hub(tmp_path):
    server = Hub().start()
    env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test_token",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    server.env = env
    yield server
    server.stop()


def cli(hub, *args, no_torch=True):
    command = [sys.executable, "-c", NO_TORCH, *args] if no_torch else [sys.executable, "-m", "longctx_hf.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=hub.env)


def test_push_folder_every_file_arrives_byte_identical(tmp_path, hub):
    src = make_source(tmp_path / "src")
    out = cli(hub, "extend", str(src), "--method", "yarn", "--factor", "4", "--output", str(tmp_path / "out"),
              "--push-to-hub", "someone/tiny-yarn", "--private")
    assert out.returncode == 0, out.stderr
    local = {str(p.relative_to(tmp_path / "out")): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    repo = hub.repos["someone/tiny-yarn"]
    assert repo["files"] == local  # every file, byte-identical, nothing more
    assert repo["private"]
    assert any(name.endswith(".safetensors") for name in local) and hub.lfs  # weights went through LFS
    hub_api_calls = [(path, auth) for method, path, auth in hub.requests if path.startswith("/api/")]
    assert hub_api_calls and all(auth == "Bearer hf_test_token" for _, auth in hub_api_calls)  # token from HF_TOKEN

    out = cli(hub, "push", str(tmp_path / "out"), "someone/tiny-yarn", "--commit-message", "second push")
    assert out.returncode == 0, out.stderr
    assert repo["messages"] == ["Upload context-extended checkpoint (longctx-hf)", "second push"]
    assert repo["private"]  # pushing again without --private leaves the existing repo as it was


def test_push_in_memory_model(tmp_path, hub):
    script = (
        "import sys; sys.path.insert(0, 'tests'); from models import tiny_model; "
        "from longctx_hf import extend_context, push_to_hub; "
        "model = extend_context(tiny_model(), 'ntk', 2); "
        "print(push_to_hub(model, 'someone/tiny-ntk', commit_message='hello').commit_url); "
        "model.save_pretrained(sys.argv[1])"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved")], capture_output=True, text=True,
                         timeout=300, env=hub.env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    files = hub.repos["someone/tiny-ntk"]["files"]
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        assert files[name] == (tmp_path / "saved" / name).read_bytes(), name
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "ntk" in card.data.tags
    assert 'from_pretrained("someone/tiny-ntk")' in card.text


def test_info_and_extend_from_a_repo_id(tmp_path, hub):
    src = make_source(tmp_path / "src")
    assert cli(hub, "push", str(src), "org/base-model").returncode == 0
    out = cli(hub, "info", "org/base-model", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pretrained_length"] == 256
    fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert fetched and all(path.endswith("/config.json") for path in fetched)  # info downloads only the config

    out = cli(hub, "extend", "org/base-model", "--method", "yarn", "--target-length", "100",
              "--output", str(tmp_path / "out"))
    assert out.returncode == 2 and "must exceed the pretrained length 256" in out.stderr
    fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert all(path.endswith("/config.json") for path in fetched)  # validated before downloading the weights
    assert not (tmp_path / "out").exists()

    out = cli(hub, "extend", "org/base-model", "--method", "pi", "--factor", "2", "--output", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert any(path.endswith(".safetensors") for method, path, _ in hub.requests if method == "GET")
    dst = tmp_path / "out"
    for path in snapshot(src):
        if path not in ("config.json", "README.md"):
            assert (dst / path).read_bytes() == (src / path).read_bytes(), path
            assert not (dst / path).is_symlink(), path  # real files, not links into the Hub cache
    card = ModelCard.load(dst / "README.md")
    assert card.data.base_model == "org/base-model" and card.data.license == "apache-2.0"

    out = cli(hub, "extend", "org/base-model", "--method", "pi", "--factor", "2", "--in-place")
    assert out.returncode == 2 and "local checkpoint folder" in out.stderr


def test_push_refuses_bad_input_before_any_request(tmp_path):
    from longctx_hf import push_to_hub

    with pytest.raises(ValueError, match="config.json"):
        push_to_hub(tmp_path, "someone/empty")
    with pytest.raises(ValueError, match="repo_id must look like"):
        push_to_hub(tmp_path, "not a repo id")
    with pytest.raises(TypeError, match="model_or_path"):
        push_to_hub(object(), "someone/thing")


def test_cli_checks_hub_options_before_writing_the_output(tmp_path, hub):
    """A bad --push-to-hub id, or --private without it, fails before the output exists and before any request."""
    src = make_source(tmp_path / "src")
    for extra, message in ((["--push-to-hub", "bad id"], "repo_id must look like 'owner/name'"),
                           (["--push-to-hub", "a/b/c"], "repo_id must look like 'owner/name'"),
                           (["--private"], "--private applies to the Hub repo of --push-to-hub")):
        out = cli(hub, "extend", str(src), "--method", "yarn", "--factor", "4", "--output", str(tmp_path / "out"),
                  *extra)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)
        assert not (tmp_path / "out").exists(), extra
    assert hub.requests == []


def test_extend_from_hub_fetches_one_weight_format_at_the_config_commit(tmp_path, hub):
    src = make_source(tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"the same weights, other format")
    (src / "original" / "consolidated.00.pth").write_bytes(b"meta format")
    (src / "model.Q4.gguf").write_bytes(b"llama.cpp format")
    assert cli(hub, "push", str(src), "org/many-formats").returncode == 0
    hub.requests.clear()
    out = cli(hub, "extend", "org/many-formats", "--method", "yarn", "--factor", "2", "--output", str(tmp_path / "out"),
              "--revision", "main")
    assert out.returncode == 0, out.stderr
    fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert any(path.endswith(".safetensors") for path in fetched)
    assert not [path for path in fetched if path.endswith((".bin", ".pth", ".gguf"))], fetched
    assert (tmp_path / "out" / "original" / "params.json").is_file()  # other files of subfolders still come
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    commit = hub.repos["org/many-formats"]["sha"]
    config_requests = [i for i, (_, path, _) in enumerate(hub.requests) if path.endswith("/resolve/main/config.json")]
    assert config_requests  # --revision reaches the config download
    later = [path for _, path, _ in hub.requests[config_requests[-1] + 1:]]
    assert later and all(commit in path for path in later if "/resolve/" in path or "/revision/" in path), later


def test_mistyped_local_path_says_both_readings(tmp_path, hub):
    out = cli(hub, "extend", "nothere/llama", "--method", "pi", "--factor", "2", "--output", str(tmp_path / "out"))
    assert out.returncode == 2
    assert "'nothere/llama' is not a local folder, and fetching it as a Hub repo id failed" in out.stderr
    assert not (tmp_path / "out").exists()
