"""MemControl masks and adapters as Hugging Face Hub artifacts: `publish` a training output, `download_memcontrol` it back.

A MemControl repository holds `mask.json`, optionally the adapter (`adapter_config.json` + `adapter_model.safetensors`,
peft format), `metrics.json` and `pareto.png` when present, and a `README.md` model card rendered from
`hub_cards/memcontrol_card.md`. Publishing is allow-list based: nothing else from the output folder (training images,
captions, prompts, generated samples, checkpoints) is copied unless `include_samples=True`, and pickle files never
are. Downloading fetches JSON and safetensors only and refuses pickle weights and file names that would leave the
repository folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

from ..constants import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AUDIT_FILE,
    CARD_FILE,
    DMEM_GENERATIONS_FILE,
    MASK_FILE,
    MEMORIZATION_FIGURE,
    METRICS_FILE,
    PARETO_FIGURE,
    PIPELINE_INDEX_FILE,
    RUN_ARGS_FILE,
    SUMMARY_FILE,
    TRAINING_CONFIG_FILE,
)
from ..files import file_digest, folder_bytes, replace_folder, reporting_full_disk, usual_mode, write_json_atomic
from ..tuners import Mask
from .card import HUB_ID, audit_card_section, read_json, recorded_base_model, render_card
from .pipelines import is_pipeline_folder, publishable_files

logger = logging.getLogger(__name__)

# what download_memcontrol fetches from a Hub repository: exact top-level names (fnmatch's `*` would also match nested
# files, so a hostile repository could force unbounded downloads), never pickles
DOWNLOAD_PATTERNS = [MASK_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METRICS_FILE, CARD_FILE]
# written by publish into local_dir (never uploaded): the files of that publication and their digests, so a later
# publish replaces the folder only when it still holds nothing but them
PUBLICATION_RECORD = ".memcontrol-publication.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# extra files copied with include_samples=True (images and text; never pickles, never checkpoints)
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".txt", ".json", ".jsonl", ".csv", ".md")
# files holding training images (figures.py) or run arguments (which may hold prompts and paths): never published,
# even with include_samples=True
PRIVATE_FILES = (MEMORIZATION_FIGURE, DMEM_GENERATIONS_FILE, RUN_ARGS_FILE, TRAINING_CONFIG_FILE)
# metrics.json keys whose textual values may hold training data (prompts, captions, file names)
_PRIVATE_KEY = re.compile(r"prompt|caption|text|image|sample|file|path|token", re.IGNORECASE)


class MemControlRepoError(ValueError):
    """A folder or Hub repository that is not a loadable, safe MemControl artifact."""


# ----------------------------------------------------------------------------------------------------------------
# card template
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# privacy helpers
# ----------------------------------------------------------------------------------------------------------------
def _holds_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, dict):
        return any(_holds_text(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_text(v) for v in value)
    return False


def sanitize_metrics(metrics: Any) -> Any:
    """Drop every metrics entry whose key names prompts/captions/images/files and whose value holds text.

    Numbers stay (e.g. `caption_dropout: 0.1`), so aggregate figures are kept while the texts that could identify
    training data (the D_mem prompts, validation captions, image paths) never leave the machine.
    """
    if isinstance(metrics, dict):
        clean = {k: sanitize_metrics(v) for k, v in metrics.items()}
        return {k: v for k, v in clean.items() if not (_PRIVATE_KEY.search(str(k)) and _holds_text(v))}
    if isinstance(metrics, list):
        return [sanitize_metrics(v) for v in metrics]
    return metrics


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def check_repo_file_names(names: list[str], source: str) -> None:
    """Refuse repository file names that are absolute or climb out of the repository folder (path traversal)."""
    for name in names:
        parts = re.split(r"[\\/]", name)
        if (not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts
                or os.path.isabs(name)):
            raise MemControlRepoError(
                f"Refusing {source}: file name {name!r} would leave the repository folder (path traversal)."
            )


def _check_contents(names: list[str], source: str, require_adapter: bool) -> None:
    """Checks shared by remote listings and local folders: a mask, and safetensors (never pickle) weights."""
    top = {n for n in names if "/" not in n and "\\" not in n}
    if MASK_FILE not in top:
        raise MemControlRepoError(
            f"{source} has no {MASK_FILE}: it is not a MemControl repository (publish one with "
            "diffusers_memcontrol.hub.publish.publish)."
        )
    pickles = sorted(n for n in top if _is_pickle(n))
    if ADAPTER_WEIGHTS_FILE not in top:
        if pickles:
            raise MemControlRepoError(
                f"{source} holds pickle weights {pickles} instead of {ADAPTER_WEIGHTS_FILE}: only safetensors are "
                "loaded (pickle files can run arbitrary code). Convert them with safetensors.torch.save_file."
            )
        if require_adapter:
            raise MemControlRepoError(
                f"{source} is a mask-only repository (no {ADAPTER_WEIGHTS_FILE}): there is no adapter to load. Use it "
                "to fine-tune with `--mask` instead."
            )
    elif ADAPTER_CONFIG_FILE not in top:
        raise MemControlRepoError(f"{source} has {ADAPTER_WEIGHTS_FILE} but no {ADAPTER_CONFIG_FILE}.")
    if pickles:
        logger.warning("%s also holds pickle files %s; they are ignored (only safetensors are loaded).", source,
                       pickles)


def _validate_folder(folder: str, root: str, source: str, require_adapter: bool) -> None:
    names = sorted(os.listdir(folder))
    check_repo_file_names(names, source)
    _check_contents(names, source, require_adapter)
    real_root = os.path.realpath(root)
    for name in (MASK_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CARD_FILE):
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            raise MemControlRepoError(
                f"Refusing {source}: {name} points outside the repository folder to {real} (path traversal)."
            )
        if not os.path.isfile(real):
            raise MemControlRepoError(f"Refusing {source}: {name} is not a regular file.")
    try:
        mask = Mask.load(os.path.join(folder, MASK_FILE))
    except (ValueError, KeyError, TypeError) as error:
        raise MemControlRepoError(f"{source}: {MASK_FILE} is not a valid MemControl mask: {error}") from error
    config_path = os.path.join(folder, ADAPTER_CONFIG_FILE)
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (ValueError, UnicodeDecodeError) as error:
            raise MemControlRepoError(f"{source}: {ADAPTER_CONFIG_FILE} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise MemControlRepoError(f"{source}: {ADAPTER_CONFIG_FILE} is not a JSON object.")
        if config.get("mask") is not None and Mask.from_dict(config["mask"]) != mask:
            raise MemControlRepoError(f"{source}: {MASK_FILE} and the mask in {ADAPTER_CONFIG_FILE} disagree.")


# ----------------------------------------------------------------------------------------------------------------
# download
# ----------------------------------------------------------------------------------------------------------------
def download_memcontrol(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    require_adapter: bool = True,
    endpoint: str | None = None,
) -> str:
    """Fetch a MemControl repository (or check a local folder) and return its local folder, refusing unsafe content.

    Only JSON, safetensors and the card are downloaded. Raises `MemControlRepoError` for a repository without
    `mask.json`, with pickle weights instead of safetensors, or with file names that leave the repository folder.
    """
    source = os.fspath(repo_id_or_path)
    if os.path.isdir(source):
        folder = os.path.abspath(source)
        _validate_folder(folder, folder, f"Folder {source!r}", require_adapter)
        return folder
    if os.path.isfile(source):
        raise MemControlRepoError(f"{source!r} is a file: pass the folder holding {MASK_FILE} (or a Hub repo id).")
    if source.startswith((".", "/", "~")) or os.path.isabs(source) or not HUB_ID.match(source):
        raise FileNotFoundError(f"{source!r} is neither an existing folder nor a Hub repository id (org/name).")

    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download

    label = f"Hub repository {source!r}" + (f" (revision {revision})" if revision else "")
    if not local_files_only and not constants.is_offline_mode():
        # refuse before downloading anything: the listing names every file of the revision
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(source, revision=revision, token=token)
        except (httpx2.TransportError, ConnectionError) as error:  # Hub unreachable: snapshot_download uses the cache
            logger.warning("Could not list %s (%s); trying the local cache.", label, error)
        else:
            names = [s.rfilename for s in (info.siblings or [])]
            check_repo_file_names(names, label)
            _check_contents(names, label, require_adapter)
    folder = snapshot_download(
        source,
        revision=revision,
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        local_files_only=local_files_only,
        token=token,
        allow_patterns=DOWNLOAD_PATTERNS,
        endpoint=endpoint,
    )
    # a cached snapshot links into the repository's cache folder (<cache>/models--org--name/blobs)
    storage = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
    _validate_folder(folder, storage, label, require_adapter)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# publish
# ----------------------------------------------------------------------------------------------------------------
def _find_mask(output_dir: str) -> Mask:
    try:
        return Mask.load(output_dir)
    except FileNotFoundError:
        raise MemControlRepoError(f"{output_dir!r} has no {MASK_FILE} (nor best_mask.json, nor a mask in "
                                  f"{ADAPTER_CONFIG_FILE}): nothing to publish.") from None


def _copy_samples(output_dir: str, staging: str, taken: set[str]) -> list[str]:
    """Copy images and text files of `output_dir` (include_samples=True); never pickles, hidden files or checkpoints."""
    copied = []
    root = os.path.realpath(output_dir)
    for dirpath, dirnames, filenames in os.walk(output_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.startswith("checkpoint"))
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, output_dir).replace(os.sep, "/")
            if rel in taken or filename.startswith(".") or filename in PRIVATE_FILES:
                continue
            if _is_pickle(filename):
                logger.warning("Not publishing pickle file %s (only safetensors are published).", rel)
                continue
            if not filename.lower().endswith(SAMPLE_SUFFIXES):
                continue
            real = os.path.realpath(path)
            if os.path.commonpath([real, root]) != root:
                logger.warning("Not publishing %s: it links outside %s.", rel, output_dir)
                continue
            os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
            shutil.copyfile(path, os.path.join(staging, rel))
            copied.append(rel)
    return copied


def _assemble(output_dir: str, staging: str, repo_id: str, include_adapter: bool, include_samples: bool,
              base_model: str | None) -> list[str]:
    """Write the repository files into `staging`; return their names."""
    config_path = os.path.join(output_dir, ADAPTER_CONFIG_FILE)
    weights_path = os.path.join(output_dir, ADAPTER_WEIGHTS_FILE)
    adapter_config = read_json(config_path) if os.path.isfile(config_path) else {}
    mask = _find_mask(output_dir)
    if adapter_config.get("mask") and Mask.from_dict(adapter_config["mask"]) != mask:
        raise MemControlRepoError(f"{output_dir!r}: {MASK_FILE} and the mask in {ADAPTER_CONFIG_FILE} disagree.")
    pickles = sorted(n for n in os.listdir(output_dir) if _is_pickle(n) and n.startswith("adapter_model"))
    publish_adapter = False
    if include_adapter:
        if os.path.isfile(weights_path):
            if not adapter_config:
                raise MemControlRepoError(f"{output_dir!r} has {ADAPTER_WEIGHTS_FILE} but no {ADAPTER_CONFIG_FILE}.")
            publish_adapter = True
        elif pickles:
            raise MemControlRepoError(
                f"{output_dir!r} holds pickle weights {pickles}: only safetensors are published. Save the adapter "
                "with diffusers_memcontrol.hub.adapters.save_adapter (safetensors) or pass include_adapter=False."
            )
        elif adapter_config:
            raise MemControlRepoError(f"{output_dir!r} has {ADAPTER_CONFIG_FILE} but no {ADAPTER_WEIGHTS_FILE}.")

    files = [MASK_FILE]
    mask.save(os.path.join(staging, MASK_FILE))
    publish_pipeline = include_adapter and is_pipeline_folder(output_dir)  # a full fine-tune: its whole pipeline
    for name in publishable_files(output_dir, PICKLE_SUFFIXES) if publish_pipeline else []:
        os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
        shutil.copyfile(os.path.join(output_dir, name), os.path.join(staging, name))
        files.append(name)
    if publish_adapter:
        shutil.copyfile(config_path, os.path.join(staging, ADAPTER_CONFIG_FILE))
        shutil.copyfile(weights_path, os.path.join(staging, ADAPTER_WEIGHTS_FILE))
        files += [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    metrics: dict = {}
    metrics_path = os.path.join(output_dir, METRICS_FILE)
    if os.path.isfile(metrics_path):
        metrics = read_json(metrics_path)
        if not include_samples:
            metrics = sanitize_metrics(metrics)
        write_json_atomic(os.path.join(staging, METRICS_FILE), metrics)
        files.append(METRICS_FILE)
        if not isinstance(metrics, dict):
            metrics = {}
    has_pareto = os.path.isfile(os.path.join(output_dir, PARETO_FIGURE))
    if has_pareto:
        shutil.copyfile(os.path.join(output_dir, PARETO_FIGURE), os.path.join(staging, PARETO_FIGURE))
        files.append(PARETO_FIGURE)
    if include_samples:
        files += _copy_samples(output_dir, staging, set(files) | {CARD_FILE})
    card = render_card(
        repo_id, mask, adapter_config=adapter_config if publish_adapter else {},
        weights_path=os.path.join(staging, ADAPTER_WEIGHTS_FILE) if publish_adapter else None,
        metrics=metrics, base_model=base_model or recorded_base_model(output_dir), has_pareto=has_pareto,
        include_samples=include_samples, has_pipeline=publish_pipeline,
    )
    audit_path = os.path.join(output_dir, "audit", AUDIT_FILE)
    if os.path.isfile(audit_path):  # `memcontrol publish --audit`: the audit's figures, never its images or captions
        card.text += audit_card_section(read_json(audit_path))
    card.save(os.path.join(staging, CARD_FILE))
    files.append(CARD_FILE)
    return files


def _folder_files(folder: str) -> dict[str, str]:
    """Every file under `folder` (relative name -> SHA-256), the publication record excluded; links count as foreign."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if os.path.islink(path):
                found[rel] = "link"
            elif name in filenames and rel != PUBLICATION_RECORD:
                found[rel] = file_digest(path)
    return found


def _record_publication(staging: str) -> None:
    """Write the publication record (its files and their digests) into `staging`."""
    write_json_atomic(os.path.join(staging, PUBLICATION_RECORD),
                      {"format": "memcontrol-publication/1", "files": _folder_files(staging)})


def _is_earlier_publication(folder: str) -> bool:
    """Whether `folder` holds nothing but the files of an earlier publication, unchanged (per its record; a folder
    published before the record existed: only the fixed publication file names, with a mask)."""
    files = _folder_files(folder)
    record_path = os.path.join(folder, PUBLICATION_RECORD)
    if os.path.isfile(record_path) and not os.path.islink(record_path):
        try:
            record = read_json(record_path)
            return isinstance(record, dict) and record.get("files") == files
        except (OSError, ValueError):
            return False
    known = {MASK_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METRICS_FILE, PARETO_FIGURE, CARD_FILE}
    return MASK_FILE in files and all(name in known and digest != "link" for name, digest in files.items())


def _place_atomically(staging: str, local_dir: str, output_dir: str) -> None:
    """Move the finished `staging` folder to `local_dir` with renames only, so `local_dir` is never half written.

    An existing `local_dir` is replaced only when it is empty or holds nothing but an earlier publication's files."""
    target = os.path.realpath(local_dir)
    source = os.path.realpath(output_dir)
    if target == source or os.path.commonpath([target, source]) in (target, source):
        raise ValueError(f"local_dir {local_dir!r} must not be, contain or lie inside output_dir {output_dir!r}.")
    usual_mode(staging)  # mkdtemp made it 0700
    if os.path.lexists(local_dir) and (not os.path.isdir(local_dir) or os.path.islink(local_dir)):
        raise FileExistsError(f"local_dir {local_dir!r} exists and is not a folder.")
    if os.path.lexists(local_dir) and os.listdir(local_dir) and not _is_earlier_publication(local_dir):
        raise FileExistsError(f"local_dir {local_dir!r} holds files that are not an earlier MemControl publication's "
                              "(or they were changed since); refusing to replace it. Pass a new or empty folder.")
    replace_folder(staging, local_dir)


def _record_hub_url(output_dir: str, url: str) -> None:
    """Add `hub_url` to the run's summary.json (the trainer writes it before publishing), keeping everything else."""
    path = os.path.join(output_dir, SUMMARY_FILE)
    summary = read_json(path) if os.path.isfile(path) else {}
    if not isinstance(summary, dict):
        logger.warning("%s is not a JSON object; not recording hub_url %s in it.", path, url)
        return
    write_json_atomic(path, {**summary, "hub_url": url})


def _removed_size(folder: str) -> int:
    """Bytes of the files under `folder`, which is then removed (a staging folder whose write ran out of space)."""
    size = folder_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return size


def publish(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    revision: str | None = None,
    include_adapter: bool = True,
    include_samples: bool = False,
    dry_run: bool = False,
    local_dir: str | os.PathLike | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
) -> str:
    """Publish a MemControl output folder (mask, adapter, metrics, card) to the Hub, or with `dry_run` to `local_dir`.

    Only allow-listed files are published, so training images, captions, prompts and samples stay private unless
    `include_samples=True`; the repository is private by default. Returns the repository URL, or the local folder
    for a dry run.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"Output folder {output_dir!r} does not exist.")
    if dry_run and local_dir is None:
        raise ValueError("dry_run=True writes the repository folder to local_dir only: pass local_dir.")
    if not HUB_ID.match(repo_id):
        raise ValueError(f"repo_id {repo_id!r} is not a Hub repository id (org/name).")
    parent = os.path.dirname(os.path.abspath(local_dir)) if local_dir is not None else None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".memcontrol-publish-", dir=parent)
    try:
        with reporting_full_disk(os.path.abspath(local_dir) if local_dir is not None else os.path.dirname(staging),
                                 lambda: _removed_size(staging), at_least=True):
            files = _assemble(output_dir, staging, repo_id, include_adapter, include_samples, base_model)
            _record_publication(staging)
            logger.info("MemControl repository %s: %s", repo_id, files)
            folder = staging
            if local_dir is not None:
                _place_atomically(staging, os.fspath(local_dir), output_dir)
                folder = os.path.abspath(local_dir)
        if dry_run:
            return folder

        from huggingface_hub import HfApi

        kind = "pipeline" if PIPELINE_INDEX_FILE in files else "adapter" if ADAPTER_WEIGHTS_FILE in files else "mask"
        api = HfApi(endpoint=endpoint, token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            token=token,
            ignore_patterns=[PUBLICATION_RECORD],
            commit_message=commit_message or f"Publish MemControl {kind}",
        )
        _record_hub_url(output_dir, str(url))
        return str(url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
