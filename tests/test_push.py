"""push: the real huggingface_hub client against a stand-in Hub on 127.0.0.1 (tests/hubserver.py)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_peft_adapter
from hubserver import FakeHub
from salora_merge.cli import main
from salora_merge.errors import InputError
from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge
from salora_merge.publishing.push import push_folder

TOKEN = "hf_test_writer_token_0123456789"


@pytest.fixture()
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub({TOKEN: "alice", "hf_other_user_token": "bob"}) as server:
        yield server


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push-src")
    adapter = make_peft_adapter(tiny_model_dir, root / "adapter")
    run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], root / "merged", MergeOptions(shard_size="20KB"))
    return root / "merged"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_all(hub: FakeHub, repo_id: str, folder: Path, revision: str | None, token, cache: Path) -> None:
    """Download every file of ``folder`` back through hf_hub_download and compare hashes."""
    from huggingface_hub import hf_hub_download

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        name = path.relative_to(folder).as_posix()
        got = hf_hub_download(repo_id, name, revision=revision, endpoint=hub.endpoint, token=token,
                              cache_dir=str(cache))
        assert _sha(Path(got)) == _sha(path), name


def test_push_merged_model_and_download_every_file_back(hub, merged_dir, tmp_path):
    result = CliRunner().invoke(main, ["push", str(merged_dir), "--repo-id", "alice/tiny-merged",
                                       "--endpoint", hub.endpoint])
    assert result.exit_code == 0, result.output
    assert "Pushed model folder" in result.output and TOKEN not in result.output
    shards = list(merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    # Card validated before any upload; safetensors went through LFS; one commit.
    paths = hub.paths()
    assert paths.index("/api/validate-yaml") < paths.index("/api/models/alice/tiny-merged/preupload/main")
    assert len(hub.paths("PUT")) == len(shards)
    assert hub.paths("POST").count("/api/models/alice/tiny-merged/commit/main") == 1
    _download_all(hub, "alice/tiny-merged", merged_dir, None, False, tmp_path / "cache")


def test_push_adapter_private_and_on_a_branch(hub, tiny_model_dir, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    from salora_merge.calibration.run import CalibrationOptions
    from salora_merge.realignment.run import run_realign

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    safety_out = tmp_path / "realigned"
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"harmful request {i}" for i in range(6)))

    run_realign(str(tiny_model_dir), str(adapter), safety_out,
                calibration=CalibrationOptions(prompts=str(prompts), rank=3, max_new_tokens=4, device="cpu"))
    result = push_folder(safety_out, "alice/tiny-adapter", private=True, revision="v1", endpoint=hub.endpoint)
    assert result.kind == "adapter" and result.pr_url is None
    assert "/api/models/alice/tiny-adapter/branch/v1" in hub.paths("POST")
    assert hub.repos["alice/tiny-adapter"].private
    assert hub.repos["alice/tiny-adapter"].branches["main"] == {}  # committed to v1 only
    _download_all(hub, "alice/tiny-adapter", safety_out, "v1", TOKEN, tmp_path / "cache")
    from huggingface_hub import hf_hub_download

    with pytest.raises(RepositoryNotFoundError):  # private: no download without a token
        hf_hub_download("alice/tiny-adapter", "adapter_config.json", revision="v1", endpoint=hub.endpoint,
                        token=False, cache_dir=str(tmp_path / "anon"))
    # A second push as a pull request.
    pr = push_folder(safety_out, "alice/tiny-adapter", create_pr=True, endpoint=hub.endpoint,
                     commit_message="Realigned adapter")
    assert pr.pr_url and pr.pr_url.endswith("/discussions/1")
    _download_all(hub, "alice/tiny-adapter", safety_out, "refs/pr/1", TOKEN, tmp_path / "cache2")


def test_invalid_card_is_rejected_before_any_upload(hub, merged_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(merged_dir, broken)
    card = (broken / "README.md").read_text()
    # Locally invalid YAML: refused with no request at all.
    (broken / "README.md").write_text(card.replace("library_name: transformers", "library_name: [transformers"))
    with pytest.raises(InputError, match="README.md: the front matter is not valid YAML"):
        push_folder(broken, "alice/broken", endpoint=hub.endpoint)
    assert hub.log == []
    # Valid YAML the Hub rejects (unknown licence): refused by validate-yaml, before any file is sent.
    (broken / "README.md").write_text(card.replace("tags:", "license: not-a-licence\ntags:", 1))
    result = CliRunner().invoke(main, ["push", str(broken), "--repo-id", "alice/broken", "--endpoint", hub.endpoint])
    assert result.exit_code == 1
    assert "rejected the card's metadata" in result.output and "not-a-licence" in result.output
    assert "re-run: salora-merge push" in result.output
    assert not any("preupload" in p or "commit" in p for p in hub.paths()) and hub.paths("PUT") == []


def test_wrong_token_is_rejected_with_a_clear_message(hub, merged_dir, monkeypatch):
    bad = "hf_wrong_token_do_not_print"
    monkeypatch.setenv("HF_TOKEN", bad)
    result = CliRunner().invoke(main, ["push", str(merged_dir), "--repo-id", "alice/x", "--endpoint", hub.endpoint])
    assert result.exit_code == 1
    assert "rejected the token (HTTP 401)" in result.output and "HF_TOKEN" in result.output
    assert bad not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert hub.repos == {}


def test_no_write_rights_and_bad_folders(hub, merged_dir, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="may not write to bob/model"):
        push_folder(merged_dir, "bob/model", endpoint=hub.endpoint)
    with pytest.raises(InputError, match="neither a model folder"):
        push_folder(tmp_path, "alice/empty", endpoint=hub.endpoint)
    with pytest.raises(InputError, match="--repo-id 'no-slash'"):
        push_folder(merged_dir, "no-slash", endpoint=hub.endpoint)
    monkeypatch.setattr("salora_merge.hf.hub.saved_token", lambda: None)
    with pytest.raises(InputError, match="no Hugging Face token: set HF_TOKEN"):
        push_folder(merged_dir, "alice/x", endpoint=hub.endpoint)


def test_unreachable_hub_says_what_to_rerun(merged_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match="nothing was committed; re-run: salora-merge push"):
        push_folder(merged_dir, "alice/x", endpoint=f"http://127.0.0.1:{port}")
