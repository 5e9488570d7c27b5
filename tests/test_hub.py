"""Publishing and downloading MemControl repositories, offline: folders, a Hub cache layout, a loopback Hub."""

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from diffusers_memcontrol import Mask
from diffusers_memcontrol.hub.card import card_template_path
from diffusers_memcontrol.hub.publish import MemControlRepoError, download_memcontrol, publish, sanitize_metrics
from tests.test_loaders import (
    folder_files,
    make_tiny_pipeline,
    train_adapter,
    unet_inputs,
    unet_state,
    write_hf_cache,
)

PUBLISHED = {"mask.json", "adapter_config.json", "adapter_model.safetensors", "metrics.json", "pareto.png", "README.md"}
SECRET_CAPTION = "patient 4711 chest x-ray left lung"


pytestmark = pytest.mark.usefixtures("one_thread")  # SV-DIFF's per-layer SVDs: one thread (conftest)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """A training output folder: adapter, mask, metrics (with prompts) and private material that must stay home."""
    folder = tmp_path_factory.mktemp("output")
    pipe = make_tiny_pipeline()
    outputs = train_adapter(pipe.unet, folder)
    metrics = {
        "dataset": "tiny-digits",
        "fid": 12.5,
        "d_mem": 0.75,
        "test": {"fid": 14.25, "amd": 0.5},
        "fid_noise": 1.5,  # a noise estimate and the ceiling are references, not the model's results
        "ceiling": {"fid": 3.25, "agreement": 0.99},
        "trainable_params": 999,
        "caption_dropout": 0.1,
        "dmem_prompts": [SECRET_CAPTION],
        "validation_captions": [SECRET_CAPTION],
        "per_prompt": [{"prompt": SECRET_CAPTION, "d_mem": 3.0}],
        "pareto_front": [{"bits": "1010", "fid": 10.0, "d_mem": 1.0}],
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "pareto.png").write_bytes(b"\x89PNG fake pareto")
    (folder / "validation.png").write_bytes(b"\x89PNG generated sample")
    (folder / "summary.json").write_text(json.dumps({"validation_prompts": [SECRET_CAPTION]}))
    (folder / "optimizer.bin").write_bytes(b"pickle")
    (folder / "samples").mkdir()
    (folder / "samples" / "dmem_000.png").write_bytes(b"\x89PNG memorized sample")
    (folder / "samples" / "captions.txt").write_text(SECRET_CAPTION)
    (folder / "memorization.png").write_bytes(b"\x89PNG training images")  # private: never published
    (folder / "final" / "full-none").mkdir(parents=True)
    (folder / "final" / "full-none" / "dmem_generations.safetensors").write_bytes(b"training images")
    (folder / "final" / "full-none" / "memorization.png").write_bytes(b"\x89PNG training images")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"checkpoint")
    (folder / "checkpoint-10" / "notes.txt").write_text(SECRET_CAPTION)
    return folder, outputs


def _all_text(folder) -> str:
    return "\n".join(content.decode("latin-1") for content in _tree(folder).values())


def _tree(folder) -> dict:
    """The published files (publish's own record of them, which is never uploaded, left out)."""
    from diffusers_memcontrol.hub.publish import PUBLICATION_RECORD

    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name == PUBLICATION_RECORD:
                continue
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = Path(path).read_bytes()
    return out


# ----------------------------------------------------------------------------------------------------------------
# publish to a folder, load back
# ----------------------------------------------------------------------------------------------------------------
def test_dry_run_publishes_only_allow_listed_files_and_loads_back(output_dir, tmp_path):
    folder, outputs = output_dir
    repo = tmp_path / "repo"
    assert publish(folder, "org/memcontrol-svdiff", dry_run=True, local_dir=repo) == str(repo)
    assert set(_tree(repo)) == PUBLISHED
    assert SECRET_CAPTION not in _all_text(repo)
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics["fid"] == 12.5 and metrics["caption_dropout"] == 0.1 and metrics["pareto_front"][0]["bits"] == "1010"
    assert not {"dmem_prompts", "validation_captions"} & set(metrics)
    assert metrics["per_prompt"] == [{"d_mem": 3.0}]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".memcontrol")]  # no staging folder left behind

    pipe = make_tiny_pipeline()
    pipe.load_memcontrol_adapter(str(repo))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*unet_inputs()).sample, outputs, atol=1e-5, rtol=0)


def test_card_renders_and_its_yaml_parses(output_dir, tmp_path):
    folder, _ = output_dir
    repo = tmp_path / "repo"
    publish(folder, "org/memcontrol-svdiff", dry_run=True, local_dir=repo, base_model="org/tiny-sd")
    text = (repo / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "text-to-image"
    card = ModelCard.load(repo / "README.md")
    data = card.data
    assert {"memcontrol", "svdiff", "text-to-image"} <= set(data.tags)
    assert data.base_model == "org/tiny-sd"
    mask = Mask.load(repo)
    assert data.memcontrol["bits"] == list(mask.bits) and data.memcontrol["positions"] == list(mask.positions)
    assert data.memcontrol["method"] == "svdiff" and data.memcontrol["layout"] == "blocks"
    from safetensors.torch import load_file

    n_params = sum(v.numel() for v in load_file(repo / "adapter_model.safetensors").values())
    assert data.memcontrol["trainable_parameters"] == n_params
    results = {(r.metric_name, r.metric_value, r.dataset_split) for r in data.eval_results}
    assert results == {("fid", 12.5, None), ("d_mem", 0.75, None), ("test/fid", 14.25, "test"),
                       ("test/amd", 0.5, "test")}
    assert all(r.task_type == "text-to-image" and r.dataset_name == "tiny-digits" for r in data.eval_results)
    assert data.model_name == "memcontrol-svdiff"
    assert "pipe.load_memcontrol_adapter(\"org/memcontrol-svdiff\"" in card.text
    assert "--mask org/memcontrol-svdiff" in card.text
    assert "MemControl: Mitigating Memorization in Diffusion Models via Automated Parameter Selection" in card.text
    assert "Dutt, Raman" in card.text and "## Privacy" in card.text
    assert mask.bitstring in card.text


def test_local_base_model_paths_stay_out_of_the_card(output_dir, tmp_path):
    folder, _ = output_dir
    publish(folder, "org/x", dry_run=True, local_dir=tmp_path / "repo", base_model=str(tmp_path))
    assert ModelCard.load(tmp_path / "repo" / "README.md").data.base_model is None
    assert str(tmp_path) not in (tmp_path / "repo" / "README.md").read_text()


def test_include_samples_opts_in(output_dir, tmp_path):
    folder, _ = output_dir
    repo = tmp_path / "repo"
    publish(folder, "org/x", dry_run=True, local_dir=repo, include_samples=True)
    files = set(_tree(repo))
    assert PUBLISHED | {"validation.png", "summary.json", "samples/dmem_000.png", "samples/captions.txt"} == files
    assert json.loads((repo / "metrics.json").read_text())["dmem_prompts"] == [SECRET_CAPTION]
    assert "with** `include_samples=True`" in (repo / "README.md").read_text()


def test_mask_only_repository(output_dir, tmp_path):
    folder, _ = output_dir
    repo = tmp_path / "repo"
    publish(folder, "org/mask", dry_run=True, local_dir=repo, include_adapter=False)
    assert set(_tree(repo)) == PUBLISHED - {"adapter_config.json", "adapter_model.safetensors"}
    card = ModelCard.load(repo / "README.md")
    assert "memcontrol-mask" in card.data.tags and card.data.memcontrol["has_adapter"] is False
    assert card.data.memcontrol["trainable_parameters"] == 999  # from metrics.json
    assert "load_memcontrol_adapter" not in card.text
    assert download_memcontrol(repo, require_adapter=False) == str(repo)
    with pytest.raises(MemControlRepoError, match="mask-only repository"):
        download_memcontrol(repo)


def test_dry_run_replaces_an_earlier_publication_atomically(output_dir, tmp_path):
    folder, _ = output_dir
    repo = tmp_path / "repo"
    publish(folder, "org/x", dry_run=True, local_dir=repo)
    publish(folder, "org/x", dry_run=True, local_dir=repo, include_adapter=False)
    assert "adapter_model.safetensors" not in os.listdir(repo)
    assert sorted(os.listdir(tmp_path)) == ["repo"]
    other = tmp_path / "not-a-publication"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        publish(folder, "org/x", dry_run=True, local_dir=other)
    assert os.listdir(other) == ["thesis.tex"]
    with pytest.raises(ValueError, match="must not be, contain or lie inside output_dir"):
        publish(folder, "org/x", dry_run=True, local_dir=folder)
    with pytest.raises(ValueError, match="pass local_dir"):
        publish(folder, "org/x", dry_run=True)


def test_publish_refusals(tmp_path, output_dir):
    source, _ = output_dir
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(MemControlRepoError, match="has no mask.json"):
        publish(folder, "org/x", dry_run=True, local_dir=tmp_path / "repo")
    for name in ("mask.json", "adapter_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(MemControlRepoError, match="only safetensors are published"):
        publish(folder, "org/x", dry_run=True, local_dir=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(ValueError, match="not a Hub repository id"):
        publish(source, "../escape", dry_run=True, local_dir=tmp_path / "repo")


def test_sanitize_metrics_keeps_numbers_drops_texts():
    metrics = {"prompts": ["a"], "captions": "b", "dmem_prompts": [["c"]], "image_paths": ["/data/x.png"],
               "caption_dropout": 0.1, "fid": 3.0, "nested": {"validation_prompts": ["d"], "amd": 1.0}}
    assert sanitize_metrics(metrics) == {"caption_dropout": 0.1, "fid": 3.0, "nested": {"amd": 1.0}}


def test_template_ships_at_top_level():
    path = card_template_path()
    assert path.replace(os.sep, "/").endswith("hub_cards/memcontrol_card.md")
    assert "{{ card_data }}" in Path(path).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face cache layout, local_files_only
# ----------------------------------------------------------------------------------------------------------------
def test_download_from_cache_layout(output_dir, tmp_path):
    folder, _ = output_dir
    repo = tmp_path / "repo"
    publish(folder, "org/cached", dry_run=True, local_dir=repo)
    snapshot = write_hf_cache(tmp_path / "cache", "org/cached", folder_files(repo))
    got = download_memcontrol("org/cached", cache_dir=tmp_path / "cache", local_files_only=True)
    assert os.path.samefile(got, snapshot)
    with pytest.raises(Exception, match="(?i)cannot find an appropriate cached snapshot"):
        download_memcontrol("org/absent", cache_dir=tmp_path / "cache", local_files_only=True)
    write_hf_cache(tmp_path / "cache", "org/no-mask", {k: v for k, v in folder_files(repo).items() if k != "mask.json"})
    with pytest.raises(MemControlRepoError, match="has no mask.json"):
        download_memcontrol("org/no-mask", cache_dir=tmp_path / "cache", local_files_only=True)


def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        download_memcontrol(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        download_memcontrol("./missing")


# ----------------------------------------------------------------------------------------------------------------
# a loopback Hub: the endpoints create_repo, upload_folder, model_info and snapshot_download use
# ----------------------------------------------------------------------------------------------------------------
class FakeHub:
    """Records what arrives through huggingface_hub and serves it back, on 127.0.0.1."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id, files, private=True):
        self.repos[repo_id] = {"private": private, "files": dict(files), "sha": self._sha(repo_id, files)}

    @staticmethod
    def _sha(*parts):
        return hashlib.sha1(repr(parts).encode()).hexdigest()

    @staticmethod
    def _blob_id(content):
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def _reply(self, request, status, payload=None, body=b"", headers=None, head=False):
        if payload is not None:
            body = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        request.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        if not head:
            request.wfile.write(body)

    def handle(self, request, method):
        url = urlparse(request.path)
        path = unquote(url.path)
        self.requests.append((method, path))
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        missing = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo_id in self.repos:
                return self._reply(request, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            self.add_repo(repo_id, {}, private=data.get("visibility") == "private" or data.get("private") is True)
            self.repos[repo_id]["create_payload"] = data
            return self._reply(request, 200, {"url": f"{self.url}/{repo_id}"})
        if method == "POST" and path == "/api/validate-yaml":  # upload_folder checks the card's metadata first
            content = json.loads(body)["content"]
            self.validated.append(yaml.safe_load(content.split("---")[1]))
            return self._reply(request, 200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
        if m and method == "POST":
            repo_id, action, _ = m.groups()
            if repo_id not in self.repos:
                return self._reply(request, 404, {"error": "Repository not found"}, headers=missing)
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(request, 200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
            repo = self.repos[repo_id]
            commit = {"repo_id": repo_id, "header": None, "files": {}}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    commit["header"] = item["value"]
                elif item["key"] == "file":
                    commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    return self._reply(request, 400, {"error": f"unsupported {item['key']}"})
            self.commits.append(commit)
            repo["files"].update(commit["files"])
            repo["sha"] = self._sha(repo_id, sorted(repo["files"]), len(self.commits))
            return self._reply(request, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{repo['sha']}",
                                              "commitOid": repo["sha"]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if m and method == "GET":
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._reply(request, 404, {"error": "Repository not found"}, headers=missing)
            return self._reply(request, 200, {"id": m.group(1), "sha": repo["sha"], "private": repo["private"],
                                              "siblings": [{"rfilename": n} for n in sorted(repo["files"])]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m and method == "GET":
            repo = self.repos[m.group(1)]
            return self._reply(request, 200, [{"type": "file", "path": n, "size": len(c), "oid": self._blob_id(c)}
                                              for n, c in sorted(repo["files"].items())])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("HEAD", "GET"):
            repo = self.repos.get(m.group(1))
            content = repo["files"].get(m.group(3)) if repo else None
            if content is None:
                return self._reply(request, 404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"},
                                   head=method == "HEAD")
            headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{self._blob_id(content)}"'}
            return self._reply(request, 200, body=content, headers=headers, head=method == "HEAD")
        return self._reply(request, 404, {"error": f"not served: {method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # huggingface_hub reads HF_ENDPOINT at import: patch the constants derived from it too
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # the fake Hub is on loopback: these tests run online even where HF_HUB_OFFLINE=1 (as in CI)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.close()


def test_upload_through_loopback_hub_and_download_back(output_dir, fake_hub, tmp_path):
    folder, outputs = output_dir
    url = publish(folder, "org/memcontrol-svdiff", token="hf_test")  # endpoint from HF_ENDPOINT
    assert url == f"{fake_hub.url}/org/memcontrol-svdiff"
    repo = fake_hub.repos["org/memcontrol-svdiff"]
    assert repo["private"] is True and repo["create_payload"]["name"] == "memcontrol-svdiff"
    assert set(repo["files"]) == PUBLISHED
    assert len(fake_hub.commits) == 1 and set(fake_hub.commits[0]["files"]) == PUBLISHED
    uploaded = b"\n".join(repo["files"].values())
    assert SECRET_CAPTION.encode() not in uploaded
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) or "sample" in name for name in repo["files"])
    assert ModelCard(repo["files"]["README.md"].decode()).data.memcontrol["method"] == "svdiff"
    assert fake_hub.validated[0]["library_name"] == "diffusers"

    # publishing again (exist_ok) with an explicit endpoint: a second commit, same files
    publish(folder, "org/memcontrol-svdiff", token="hf_test", endpoint=fake_hub.url, commit_message="again")
    assert len(fake_hub.commits) == 2 and fake_hub.commits[1]["header"]["summary"] == "again"

    local = download_memcontrol("org/memcontrol-svdiff", cache_dir=tmp_path / "cache", endpoint=fake_hub.url)
    assert set(os.listdir(local)) == PUBLISHED - {"pareto.png"}  # JSON, safetensors and the card only
    assert any(m == "GET" and "/resolve/" in p for m, p in fake_hub.requests)
    pipe = make_tiny_pipeline()
    pipe.load_memcontrol_adapter("org/memcontrol-svdiff", cache_dir=tmp_path / "cache", local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*unet_inputs()).sample, outputs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("files, match", [
    ({"mask.json": b"{}", "adapter_config.json": b"{}", "../evil.json": b"{}"}, "path traversal"),
    ({"mask.json": b"{}", "/etc/cron.d/x.json": b"{}"}, "path traversal"),
    ({"mask.json": b"{}", "adapter_config.json": b"{}", "adapter_model.bin": b"x"}, "only safetensors are loaded"),
    ({"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"}, "has no mask.json"),
])
def test_remote_refusals_before_any_download(fake_hub, tmp_path, files, match):
    fake_hub.add_repo("org/bad", files)
    pipe = make_tiny_pipeline()
    before = unet_state(pipe.unet)
    with pytest.raises(MemControlRepoError, match=match):
        pipe.load_memcontrol_adapter("org/bad", cache_dir=str(tmp_path / "cache"))
    assert not any("/resolve/" in p for _, p in fake_hub.requests)
    assert not (tmp_path / "cache").exists() or not any(
        f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if not f.endswith(".lock"))
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_unreachable_hub_falls_back_to_the_cache(output_dir, tmp_path):
    folder, _ = output_dir
    repo = tmp_path / "repo"
    publish(folder, "org/cached", dry_run=True, local_dir=repo)
    snapshot = write_hf_cache(tmp_path / "cache", "org/cached", folder_files(repo))
    closed = "http://127.0.0.1:9"  # nothing listens on the discard port
    got = download_memcontrol("org/cached", cache_dir=tmp_path / "cache", endpoint=closed)
    assert os.path.samefile(got, snapshot)


# ----------------------------------------------------------------------------------------------------------------
# what a publication records: the Hub URL in the run's summary, the base model in the card
# ----------------------------------------------------------------------------------------------------------------
def test_publish_saves_hub_url_into_the_runs_summary(output_dir, fake_hub, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(output_dir[0], run)
    (run / "summary.json").write_text(json.dumps({"validation_prompts": [SECRET_CAPTION]}))  # as the trainer wrote it
    publish(run, "org/x", dry_run=True, local_dir=tmp_path / "repo")
    assert "hub_url" not in json.loads((run / "summary.json").read_text())  # a dry run uploads nothing
    url = publish(run, "org/x", token="hf_test")
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {"validation_prompts": [SECRET_CAPTION], "hub_url": url} and url.endswith("/org/x")
    assert "summary.json" not in fake_hub.repos["org/x"]["files"]  # recorded at home, never uploaded


@pytest.mark.parametrize("recorded, hub_id, shown", [
    ("org/sd-base", "org/sd-base", 'from_pretrained("org/sd-base")'),
    (None, None, "from_pretrained(tiny_base_path(), safety_checker=None)"),
    ("/data/models/my-sd15", None, 'from_pretrained("my-sd15")'),
])
def test_card_names_the_base_model_the_run_recorded(output_dir, tmp_path, recorded, hub_id, shown):
    import shutil

    from diffusers_memcontrol.hub.card import TINY_BASE_NAME

    run = tmp_path / "run"
    shutil.copytree(output_dir[0], run)
    (run / "training_config.json").write_text(json.dumps({"run": {"pretrained_model_name_or_path": recorded}}))
    publish(run, "org/x", dry_run=True, local_dir=tmp_path / "repo")
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.base_model == hub_id  # only Hub ids: the Hub links an adapter to its base through it
    assert card.data.memcontrol["base_model"] == (recorded.rsplit("/", 1)[-1] if recorded and not hub_id
                                                  else recorded or TINY_BASE_NAME)
    assert shown in card.text and "BASE_MODEL" not in card.text
    assert "/data/models" not in card.text  # a local path never leaves the machine


def test_trainer_push_to_hub_records_url_and_tiny_base(fake_hub, tmp_path, monkeypatch):
    """The real trainer (tiny base, 2 steps) publishing to the loopback Hub: summary.json keeps the URL, the card
    names the shipped tiny base and its usage loads it."""
    import subprocess
    import sys

    from diffusers_memcontrol.hub.card import TINY_BASE_NAME

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "diffusers_memcontrol.cli", "train", "--max_train_steps", "2",
                    "--train_batch_size", "4", "--max_train_samples", "32", "--dmem_size", "4",
                    "--num_validation_images", "0", "--no_progress", "--push_to_hub", "--hub_model_id", "org/run",
                    "--output_dir", str(out)], check=True, capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hub_url"] == f"{fake_hub.url}/org/run"
    card = ModelCard(fake_hub.repos["org/run"]["files"]["README.md"].decode())
    assert card.data.memcontrol["base_model"] == TINY_BASE_NAME and card.data.base_model is None
    assert "from_pretrained(tiny_base_path(), safety_checker=None)" in card.text
